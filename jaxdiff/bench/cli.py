"""The benchmark's command line: `add_arguments` and `main`, and the `jaxdiff bench` subcommand.

`scripts/benchmark.py` and `jaxdiff bench` call them; both take the same flags.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from jaxdiff import atomic
from jaxdiff.bench.harness import (
    XLA_FLAG_SETS,
    Context,
    Result,
    Row,
    run,
    table,
    with_xla_flag_sets,
)
from jaxdiff.bench.rows import ROWS, select_rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help=f"rows to run, in order (default: the --device-rows set); one of: {', '.join(ROWS)}",
    )
    p.add_argument(
        "--device-rows",
        choices=["cpu", "gpu", "all"],
        default=None,
        help="the default set of rows (default: gpu on a GPU, cpu elsewhere)",
    )
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the diffusers/PyTorch peer (default: on for the cpu rows)",
    )
    p.add_argument("--json", default=None, help="write the report here (rewritten after each row)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="use a persistent compilation cache here (compile_s then counts cache hits)",
    )
    p.add_argument(
        "--xla-flags",
        nargs="+",
        choices=["default", *XLA_FLAG_SETS],
        default=["default"],
        metavar="SET",
        help="append these candidate sets to XLA_FLAGS before jax starts: 'gpu' (cuBLAS for "
        "every GEMM, the latency-hiding scheduler), 'graphs' (convolutions in CUDA graphs too), "
        "'nographs' (no CUDA graphs), 'nomerge' (no merged matrix products); 'default' adds "
        "none",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory the max-batch rows search within (default: the device's allocator "
        "limit; the CPU has none)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing each jax case, trace 3 more calls with jax's profiler into "
        "DIR/<row>-<case>.xplane.pb (scripts/profile_summary.py reads them)",
    )
    p.add_argument("--list", action="store_true", help="list the rows and exit")


def raise_memory_fraction(rows: list[Row]) -> None:
    """Let jax's GPU allocator take the largest `mem_fraction` of `rows` where every row asks
    for one (see jaxdiff.bench.memory.MEM_FRACTION), unless either fraction variable is set
    already: jax refuses both at once. Takes effect only before jax starts its GPU backend."""
    names = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not rows or not all(r.mem_fraction for r in rows) or any(map(os.environ.get, names)):
        return
    os.environ["XLA_CLIENT_MEM_FRACTION"] = str(max(r.mem_fraction for r in rows))


def main(args: argparse.Namespace) -> dict | None:
    """Run the benchmark from parsed `add_arguments` flags; print the table to stdout."""
    if args.list:
        for r in ROWS.values():
            print(f"{r.name:<14} {r.device:<6} {r.help}")
        return None
    if args.runs < 1 or args.warmup < 0:
        raise ValueError("--runs must be >= 1 and --warmup >= 0")
    if args.memory_gib is not None and not (math.isfinite(args.memory_gib) and args.memory_gib > 0):
        raise ValueError(f"--memory-gib must be a number > 0, got {args.memory_gib}")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.json:
        try:
            atomic.check_destination(args.json)
        except atomic.DestinationError as e:
            raise ValueError(f"--json {e}") from None
    for flag, folder in (("--profile", args.profile), ("--cache", args.cache)):
        if folder:  # the cache was asked for: running without it would time something else
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"{flag}: cannot create the folder {folder} ({e})") from None
    os.environ["XLA_FLAGS"] = with_xla_flag_sets(os.environ.get("XLA_FLAGS", ""), args.xla_flags)
    # jax must not take most of the GPU's memory up front: the torch peer shares the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # The default set depends on the backend, known once jax has started; a GPU's is "gpu".
    raise_memory_fraction(select_rows(args.rows, args.device_rows or "gpu"))
    import jax

    from jaxdiff import cpu_tuning

    cpu_tuning.configure_jax()
    if args.cache:  # the commands' own cache settings, so compile_s is what a user's run sees
        from jaxdiff import compilation_cache

        compilation_cache.enable(args.cache)
    device_rows = args.device_rows or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    rows = select_rows(args.rows, device_rows)
    compare = args.compare if args.compare is not None else device_rows == "cpu"
    threads = args.torch_threads or (os.cpu_count() if jax.default_backend() == "cpu" else None)
    budget = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    ctx = Context(
        runs=args.runs,
        warmup=args.warmup,
        compare=compare,
        torch_threads=threads,
        memory_budget=budget,
        profile=args.profile,
    )
    doc = run(rows, ctx, args.json)
    print(table([Result(**r) for r in doc["results"]]))
    if doc["errors"]:
        print("\nfailed rows: " + "; ".join(f"{k}: {v}" for k, v in doc["errors"].items()))
    return doc


def cmd_bench(args) -> None:
    from jaxdiff.cli import UsageError

    try:
        doc = main(args)
    except ValueError as e:
        raise UsageError(f"bench: {e}") from None
    if doc and doc["errors"]:
        raise SystemExit(1)


def register(subparsers) -> None:
    """Add the `bench` subcommand to `jaxdiff`'s subparsers."""
    s = subparsers.add_parser(
        "bench", help="time model steps, pipelines and training (against diffusers with --compare)"
    )
    add_arguments(s)
    s.set_defaults(fn=cmd_bench)
