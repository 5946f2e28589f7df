"""Summarize traces that `scripts/benchmark.py --profile DIR` wrote (jaxdiff.bench.profile).

python scripts/profile_summary.py DIR/*.xplane.pb [--top N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdiff.cli import ScriptParser  # noqa: E402


def main() -> None:
    from jaxdiff.bench.profile import format_summary, summarize

    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", help=".xplane.pb files")
    p.add_argument("--top", type=int, default=15, help="names per line (default 15)")
    args = p.parse_args()
    for path in args.traces:
        if not Path(path).is_file():
            print(f"profile_summary.py: no such file: {path}", file=sys.stderr)
            raise SystemExit(2)
        try:
            summary = summarize(path, args.top)
        except Exception as e:  # a truncated or foreign file
            print(f"profile_summary.py: {path} is not a readable trace ({e})", file=sys.stderr)
            raise SystemExit(2) from None
        print(format_summary(summary))


if __name__ == "__main__":
    main()
