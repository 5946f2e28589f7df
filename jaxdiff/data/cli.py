"""The `jaxdiff make-shapes` and `jaxdiff eval-shapes` commands (wired in by `jaxdiff.cli`).

    jaxdiff make-shapes OUT [--n N] [--seed S] [--size 64] [--two-object-fraction F] [--force]
    jaxdiff eval-shapes [--model DIR] [--reference | --vae-reconstruction] [--n N] [--seed S]
                        [--worst PATH.png] [--steps N] [--guidance G] [--sampler NAME]

Without --model or --reference, eval-shapes scores the bundled model (`jaxdiff generate`'s
default), with `jaxdiff generate`'s default sampling settings.

`eval-shapes --reference` scores the dataset's own renderings of the prompts: a check of the
analyzer (every number should be 100.0) that needs no model. `--vae-reconstruction` scores those
renderings after a round trip through the model's VAE: the ceiling the autoencoder sets.
"""

from __future__ import annotations

from pathlib import Path

from jaxdiff.cli import UsageError, check_output, seed_arg


def cmd_make_shapes(args) -> None:
    """Write the procedural shapes dataset (held-out pairs excluded)."""
    from jaxdiff.data.shapes import MIN_IMAGE_SIZE, write_dataset

    if args.n < 1:
        raise UsageError(f"make-shapes: --n must be at least 1, not {args.n}")
    if args.size < MIN_IMAGE_SIZE or args.size % 8:
        raise UsageError(
            f"make-shapes: --size must be a multiple of 8, at least {MIN_IMAGE_SIZE}: {args.size}"
        )
    if not 0.0 <= args.two_object_fraction <= 1.0:
        raise UsageError(
            f"make-shapes: --two-object-fraction must be in [0, 1]: {args.two_object_fraction}"
        )
    check_output(args.out, folder=True)  # write_dataset refuses a non-empty one itself
    try:
        out = write_dataset(
            args.out,
            args.n,
            args.seed,
            size=args.size,
            two_object_fraction=args.two_object_fraction,
            overwrite=args.force,
        )
    except FileExistsError as e:
        raise UsageError(f"make-shapes: {e}") from None
    print(f"wrote {out} ({args.n} images)")


def cmd_eval_shapes(args) -> None:
    """Score a text-to-image model (or the reference renderer) on the shapes grammar."""
    from jaxdiff.eval.shapes import (
        evaluate,
        format_report,
        reference_generate_fn,
        save_worst_grid,
        vae_reconstruction_generate_fn,
    )

    if args.n < 1:
        raise UsageError(f"eval-shapes: --n must be at least 1, not {args.n}")
    if args.model is not None and args.reference:
        raise UsageError("eval-shapes: give at most one of --model DIR and --reference")
    if args.reference and args.vae_reconstruction:
        raise UsageError("eval-shapes: give at most one of --reference and --vae-reconstruction")
    sampling = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    sampling = {k: v for k, v in sampling.items() if v is not None}  # the rest: generate's
    if sampling and (args.reference or args.vae_reconstruction):
        flags = ", ".join(f"--{k}" for k in sampling)
        mode = "--reference" if args.reference else "--vae-reconstruction"
        raise UsageError(f"eval-shapes: {flags} set a model's sampling; not with {mode}")
    from jaxdiff.pipelines.stable_diffusion import PipelineInputError, check_settings

    try:  # before a model loads
        check_settings(flags=True, steps=args.steps, guidance=args.guidance)
    except PipelineInputError as e:
        raise UsageError(f"eval-shapes: {e}") from None
    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"eval-shapes: {args.model}: not a folder")
    if args.worst:
        check_output(args.worst)
    if args.reference:
        generate_fn = reference_generate_fn()
    elif args.vae_reconstruction:
        generate_fn = vae_reconstruction_generate_fn(args.model)
    else:
        from jaxdiff.pipelines import generate_fn_for_model
        from jaxdiff.samplers import SAMPLERS

        if args.sampler is not None and args.sampler not in SAMPLERS:
            raise UsageError(
                f"eval-shapes: unknown sampler {args.sampler!r}; see `jaxdiff samplers`"
            )
        generate_fn = generate_fn_for_model(args.model, **sampling)
    report = evaluate(generate_fn, args.n, args.seed, worst_k=16 if args.worst else 0)
    print(format_report(report))
    if args.worst:
        print(f"wrote {save_worst_grid(report, args.worst)}")


def register(subparsers) -> None:
    """Add make-shapes and eval-shapes to the `jaxdiff` subcommands."""
    s = subparsers.add_parser("make-shapes", help="write the procedural shapes dataset")
    s.add_argument("out", help="the folder to create")
    s.add_argument("--n", type=int, default=10000, help="number of images")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    s.add_argument("--two-object-fraction", type=float, default=0.5)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_make_shapes)

    s = subparsers.add_parser("eval-shapes", help="score a model on the shapes grammar")
    s.add_argument(
        "--model", default=None, help="a text-to-image model folder (default: the bundled model)"
    )
    s.add_argument(
        "--reference",
        action="store_true",
        help="score exact renderings of the prompts instead (checks the analyzer)",
    )
    s.add_argument(
        "--vae-reconstruction",
        action="store_true",
        help="score exact renderings after a round trip through the model's VAE (its ceiling)",
    )
    s.add_argument("--n", type=int, default=200, help="number of prompts")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--worst", default=None, help="write the worst cases as a PNG grid here")
    s.add_argument("--steps", type=int, default=None, help="default: jaxdiff generate's")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (as jaxdiff generate)")
    s.add_argument("--sampler", default=None, help="default: the model's scheduler")
    s.set_defaults(fn=cmd_eval_shapes)
