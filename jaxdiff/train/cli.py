"""The `train` and `export` commands: parse, then call `jaxdiff.train`.

`register(subparsers)` adds them to the `jaxdiff` command; `python -m jaxdiff.train.cli` runs
them alone (the tests' subprocesses use it).
"""

from __future__ import annotations

import sys


def cmd_train(args) -> None:
    """Train from a config file; resumes when the work directory holds a checkpoint."""
    from jaxdiff.checkpoint import CheckpointError, NonFiniteError
    from jaxdiff.cli import UsageError, check_output
    from jaxdiff.train.config import ConfigError, load_config
    from jaxdiff.train.data import DataError

    overrides = list(args.set or [])
    for flag, key in (
        (args.steps, "steps"),
        (args.checkpoint_every, "checkpoint_every"),
        (args.seed, "seed"),
    ):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    check_output(args.workdir, folder=True)  # resumed where it holds a checkpoint

    # Before any other JAX work: joins the other processes of a multi-host run.
    from jaxdiff.train.loop import maybe_initialize_distributed, train

    maybe_initialize_distributed()
    # A second run of the same config, or a resume, loads the compiled step instead of compiling.
    from jaxdiff import compilation_cache, cpu_tuning

    cpu_tuning.configure_jax()
    compilation_cache.enable()
    try:
        result = train(cfg, args.workdir, progress=not args.no_progress)
    except (ConfigError, DataError, NonFiniteError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    if result.losses:
        print(f"step {result.final_step}: loss {result.losses[-1]:.4f}; workdir {result.workdir}")
    else:
        print(f"nothing to do: {result.workdir} is already at step {result.final_step}")


def cmd_export(args) -> None:
    """Write a training run's model as a diffusers-format folder."""
    from jaxdiff.checkpoint import CheckpointError
    from jaxdiff.cli import UsageError, check_output
    from jaxdiff.train.config import ConfigError
    from jaxdiff.train.loop import export

    check_output(args.out, folder=True, force=args.force)
    try:
        out = export(
            args.workdir, args.out, use_ema=not args.no_ema, step=args.step, overwrite=args.force
        )
    except (FileNotFoundError, FileExistsError, ConfigError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}")


def register(subparsers) -> None:
    """Adds `train` and `export` to the `jaxdiff` command's subparsers."""
    s = subparsers.add_parser("train", help="train a model from a config file in configs/")
    s.add_argument("config", help="a Python config file (configs/tiny.py)")
    s.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    s.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    s.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval")
    s.add_argument("--seed", type=int, default=None)  # checked with the config
    s.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)

    s = subparsers.add_parser("export", help="write a training run as a diffusers folder")
    s.add_argument("workdir", help="a training work directory")
    s.add_argument("out", help="the folder to create")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    s.add_argument("--step", type=int, default=None, help="a checkpoint step (default: latest)")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_export)


def main(argv=None) -> int:
    import argparse

    from jaxdiff.cli import UsageError

    parser = argparse.ArgumentParser(prog="jaxdiff")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except UsageError as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
