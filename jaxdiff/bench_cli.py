"""`jaxdiff bench`: the benchmark of jaxdiff/bench.py (the same flags as scripts/benchmark.py)."""

from __future__ import annotations


def cmd_bench(args) -> None:
    from jaxdiff import bench
    from jaxdiff.cli import UsageError

    try:
        doc = bench.main(args)
    except ValueError as e:
        raise UsageError(f"bench: {e}") from None
    if doc and doc["errors"]:
        raise SystemExit(1)


def register(subparsers) -> None:
    """Add the `bench` subcommand to `jaxdiff`'s subparsers."""
    from jaxdiff import bench

    s = subparsers.add_parser(
        "bench", help="time model steps, pipelines and training (against diffusers with --compare)"
    )
    bench.add_arguments(s)
    s.set_defaults(fn=cmd_bench)
