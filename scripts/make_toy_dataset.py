"""Writes the toy dataset of the tiny configs: colored squares and disks with captions.

python scripts/make_toy_dataset.py OUT_DIR [--count 64] [--size 32] [--seed 0]
"""

from jaxdiff.cli import ScriptParser
from jaxdiff.train.data import write_toy_dataset

if __name__ == "__main__":
    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_toy_dataset(a.out, a.count, a.size, a.seed))
