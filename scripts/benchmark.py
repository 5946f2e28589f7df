"""Benchmark jaxdiff against diffusers (PyTorch): see jaxdiff/bench/ and docs/benchmarks.md.

python scripts/benchmark.py                          # the rows of this device (cpu or gpu)
python scripts/benchmark.py --rows tiny-unet --json out.json
python scripts/benchmark.py --device-rows gpu --compare --json gpu.json
"""

import os
import sys

# jax must not preallocate most of a GPU when the torch peer shares it; set before jax starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxdiff.cpu_tuning import tune_process  # noqa: E402

if __name__ == "__main__":
    tune_process()  # before jax loads, as the `jaxdiff` command does

from jaxdiff import bench  # noqa: E402
from jaxdiff.cli import ScriptParser  # noqa: E402


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__.split("\n")[0])
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        doc = bench.main(args)
    except ValueError as e:
        parser.error(str(e))
    return 1 if doc and doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
