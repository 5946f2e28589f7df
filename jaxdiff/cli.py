"""The `jaxdiff` command: a thin layer that parses arguments and calls the library.

Every command reports bad input (a missing file, a corrupt checkpoint, an unknown option) as one
line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxdiff.models.config_io import ConfigError


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def seed_arg(text: str) -> int:
    """argparse's type for a seed: an integer in [0, MAX_SEED] (numpy's and jaxdiff's generators
    take no negative seed; larger ones would wrap onto smaller ones). Called only for a seed
    given, by commands that import jax anyway."""
    from jaxdiff.pipelines.stable_diffusion import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        command = self.prog.removeprefix("jaxdiff").strip()
        raise UsageError(f"{command}: {message}" if command else message)


class ScriptParser(argparse.ArgumentParser):
    """argparse for the programs in scripts/: a bad argument is one line on stderr ("NAME: error:
    ...") and exit status 2, as the `jaxdiff` command reports it, not argparse's usage block
    (`--help` still prints the usage). Importing this module does not start jax."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- commands


def cmd_params(args) -> None:
    """Parameter counts per component, from shapes alone (nothing is allocated)."""
    from jaxdiff.models.build import abstract_params
    from jaxdiff.models.layers import count_params

    if args.model:
        from jaxdiff.convert.diffusers import read_pipeline_configs

        components = read_pipeline_configs(args.model)
    else:
        from jaxdiff.models.presets import get_preset

        components = get_preset(args.preset).components()
    counts = {name: count_params(abstract_params(cfg)) for name, cfg in components.items()}
    print(json.dumps(counts))


def cmd_init(args) -> None:
    """A diffusers-format folder of a preset with random weights."""
    from jaxdiff.convert.diffusers import random_pipeline, save_pipeline

    check_output(args.out, folder=True, force=args.force)
    weights = random_pipeline(args.preset, seed=args.seed)
    out = save_pipeline(weights, args.out, overwrite=args.force, dtype=_np_dtype(args.dtype))
    print(f"wrote {out}")


def cmd_convert(args) -> None:
    """Re-write a diffusers folder (fp16 variant, shards) as plain safetensors in a chosen dtype."""
    from jaxdiff.convert import load_pipeline, save_pipeline

    check_output(args.out, folder=True, force=args.force)
    weights = load_pipeline(args.model, variant=args.variant)
    out = save_pipeline(weights, args.out, overwrite=args.force, dtype=_np_dtype(args.dtype))
    print(f"wrote {out}")


def cmd_samplers(args) -> None:
    from jaxdiff.samplers import describe

    names = describe()
    width = max(len(n) for n, _ in names)
    for name, text in names:
        print(f"{name:<{width}}  {text}")


def _add_generation_flags(s, *, image: bool = False) -> None:
    s.add_argument("prompt")
    s.add_argument(
        "--model", default=None, help="a diffusers-format folder (default: the bundled model)"
    )
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5; SDXL 5)")
    s.add_argument("--guidance-rescale", type=float, default=0.0)
    s.add_argument(
        "--sampler", default=None, help="see `jaxdiff samplers` (default: the model's scheduler)"
    )
    s.add_argument("--sigmas", choices=["default", "karras", "exponential"], default=None)
    s.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    s.add_argument("--clip-skip", type=int, default=None)
    s.add_argument("--seed", type=seed_arg, default=0, help="image i of a batch uses seed + i")
    if not image:
        s.add_argument("--width", type=int, default=None)
        s.add_argument("--height", type=int, default=None)
        s.add_argument("--latents", default=None, help="initial noise .npy, (batch, C, H/f, W/f)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--output-type", choices=["png", "npy"], default="png")
    s.add_argument("--out", default=None, help="output path (default out.png / out.npy)")
    s.add_argument("--force", action="store_true", help="overwrite existing output files")
    s.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default bfloat16 on GPU/TPU, float32 on CPU)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    # SDXL's micro-conditioning (diffusers' arguments of the same names).
    s.add_argument(
        "--original-size", type=_pair, default=None, help="SDXL: H,W (default: the size)"
    )
    s.add_argument("--crops-coords-top-left", type=_pair, default=(0, 0), help="SDXL: Y,X")
    s.add_argument("--target-size", type=_pair, default=None, help="SDXL: H,W (default: the size)")
    s.add_argument("--aesthetic-score", type=float, default=6.0, help="SDXL refiner")
    s.add_argument(
        "--negative-aesthetic-score", type=float, default=2.5, help="SDXL refiner, unconditional"
    )


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers A,B, got {text!r}") from None
    return a, b


def _generation_kwargs(args) -> dict:
    kw = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        sigmas=args.sigmas,
        eta=args.eta,
        clip_skip=args.clip_skip,
        seed=args.seed,
        batch=args.batch,
        progress=not args.no_progress,
        original_size=args.original_size,
        crops_coords_top_left=args.crops_coords_top_left,
        target_size=args.target_size,
        aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score,
    )
    for name in ("width", "height", "latents"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    return kw


def _check_inputs(args) -> None:
    """Input checks that need no model, done before anything is loaded or written."""
    from pathlib import Path

    from jaxdiff.pipelines.stable_diffusion import PipelineInputError, check_settings

    names = ("steps", "batch", "width", "height", "seed", "to_seed", "guidance")
    names += ("guidance_rescale", "eta", "clip_skip")
    try:
        check_settings(flags=True, **{k: getattr(args, k, None) for k in names})
    except PipelineInputError as e:
        raise UsageError(str(e)) from None
    if args.sampler is not None:
        from jaxdiff.samplers import SAMPLERS

        if args.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {strength}")
    for name in ("image", "mask", "latents"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).is_file():
            raise UsageError(f"--{name} {value}: no such file")


def check_output(path, *, folder: bool = False, force: bool = True) -> None:
    """A command's output checked before its work (`jaxdiff.atomic.check_destination`); with
    `force` False an existing one is refused too."""
    from pathlib import Path

    from jaxdiff.atomic import DestinationError, check_destination

    try:
        check_destination(path, folder=folder)
    except DestinationError as e:
        raise UsageError(str(e)) from None
    if not force and Path(path).exists():
        raise UsageError(f"{path}: already exists (pass --force to replace it)")


def _outputs(args) -> list:
    import os
    from pathlib import Path

    from jaxdiff.pipelines.images import output_paths

    suffix = "." + args.output_type
    out = args.out or f"out{suffix}"
    if out.endswith(("/", os.sep)) or Path(out).is_dir():  # not written as OUT.png beside it
        example = Path(out) / f"out{suffix}"
        raise UsageError(f"--out {out}: is a folder; give a file name, such as {example}")
    if args.output_type == "npy":
        paths = output_paths(out, 1, suffix)
    else:
        paths = output_paths(out, args.batch, suffix)
        if args.batch > 1:
            paths.append(paths[0].with_name(paths[0].name.rsplit("-", 1)[0] + "-grid.png"))
    for p in paths:
        check_output(p, force=args.force)
    return paths


def _pipeline(args):
    import jax

    from jaxdiff import compilation_cache, cpu_tuning
    from jaxdiff.pipelines import load

    cpu_tuning.configure_jax()
    compilation_cache.enable()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return load(args.model, dtype=dtype)


def _write(args, result, paths) -> None:
    from jaxdiff.pipelines.images import grid, save_npy, save_png

    if args.output_type == "npy":
        save_npy(paths[0], result.images)
    else:
        for i, image in enumerate(result.images):
            save_png(paths[i], image, result.parameters[i])
        if len(result.images) > 1:
            save_png(paths[-1], grid(result.images), result.parameters[0])
    for p in paths:
        print(f"wrote {p}")


def _run_generation(args, call) -> None:
    from jaxdiff.pipelines import PipelineInputError
    from jaxdiff.pipelines.images import ImageInputError

    _check_inputs(args)
    paths = _outputs(args)
    try:
        pipe = _pipeline(args)
        result = call(pipe)
    except (PipelineInputError, ImageInputError) as e:
        raise UsageError(str(e)) from None
    _write(args, result, paths)


def cmd_generate(args) -> None:
    def call(pipe):
        kw = _generation_kwargs(args)
        if args.refiner:
            from jaxdiff.pipelines import load

            kw.update(
                refiner=load(args.refiner, dtype=pipe.dtype), refiner_switch=args.refiner_switch
            )
        return pipe.generate(args.prompt, **kw)

    if args.refiner and not 0.0 < args.refiner_switch < 1.0:
        raise UsageError(f"--refiner-switch must be in (0, 1), got {args.refiner_switch}")
    _run_generation(args, call)


def cmd_img2img(args) -> None:
    _run_generation(
        args,
        lambda pipe: pipe.img2img(
            args.prompt, args.image, strength=args.strength, **_generation_kwargs(args)
        ),
    )


def cmd_inpaint(args) -> None:
    _run_generation(
        args,
        lambda pipe: pipe.inpaint(
            args.prompt, args.image, args.mask, strength=args.strength, **_generation_kwargs(args)
        ),
    )


def cmd_outpaint(args) -> None:
    try:
        extend = tuple(int(v) for v in args.extend.split(","))
    except ValueError:
        extend = ()
    if len(extend) != 4:
        raise UsageError(f"--extend takes LEFT,TOP,RIGHT,BOTTOM pixel counts, got {args.extend!r}")
    _run_generation(
        args,
        lambda pipe: pipe.outpaint(args.prompt, args.image, extend, **_generation_kwargs(args)),
    )


def cmd_interpolate(args) -> None:
    def call(pipe):
        kw = _generation_kwargs(args)
        kw.pop("batch")
        return pipe.interpolate(
            args.prompt, to_prompt=args.to_prompt, to_seed=args.to_seed, frames=args.frames, **kw
        )

    if args.frames < 2:
        raise UsageError(f"--frames must be >= 2, got {args.frames}")
    args.batch = args.frames
    _run_generation(args, call)


def _np_dtype(name):
    import numpy as np

    return {None: None, "float32": np.float32, "float16": np.float16}[name]


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from jaxdiff.models.presets import PRESETS

    p = _Parser(prog="jaxdiff", description="Latent diffusion in JAX and Flax.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("params", help="parameter counts per component, as JSON")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="a named model architecture")
    g.add_argument("--model", help="a diffusers-format model folder (reads only its configs)")
    s.set_defaults(fn=cmd_params)

    s = sub.add_parser(
        "init", help="write a diffusers-format folder of a preset with random weights"
    )
    s.add_argument("preset", choices=list(PRESETS))
    s.add_argument("out", help="the folder to create")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--dtype", choices=["float32", "float16"], default=None)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("convert", help="re-write a diffusers folder as plain safetensors")
    s.add_argument("model", help="a diffusers-format model folder")
    s.add_argument("out", help="the folder to create")
    s.add_argument("--variant", default=None, help="read this weights variant (e.g. fp16)")
    s.add_argument("--dtype", choices=["float32", "float16"], default=None)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("samplers", help="list the samplers, one per line")
    s.set_defaults(fn=cmd_samplers)

    s = sub.add_parser("generate", help="text-to-image")
    _add_generation_flags(s)
    s.add_argument("--refiner", default=None, help="an SDXL refiner folder that finishes the image")
    s.add_argument(
        "--refiner-switch",
        type=float,
        default=0.8,
        help="the fraction of the schedule the base model runs",
    )
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("img2img", help="image-to-image")
    _add_generation_flags(s, image=True)
    s.add_argument("--image", required=True)
    s.add_argument("--strength", type=float, required=True, help="0 keeps the image, 1 ignores it")
    s.set_defaults(fn=cmd_img2img)

    s = sub.add_parser("inpaint", help="repaint the white area of a mask")
    _add_generation_flags(s, image=True)
    s.add_argument("--image", required=True)
    s.add_argument("--mask", required=True, help="white = repaint, black = keep; the image's size")
    s.add_argument("--strength", type=float, default=1.0)
    s.set_defaults(fn=cmd_inpaint)

    s = sub.add_parser("outpaint", help="extend the canvas and paint the new area")
    _add_generation_flags(s, image=True)
    s.add_argument("--image", required=True)
    s.add_argument("--extend", required=True, help="LEFT,TOP,RIGHT,BOTTOM in pixels")
    s.set_defaults(fn=cmd_outpaint)

    s = sub.add_parser("interpolate", help="frames between two seeds and/or two prompts (slerp)")
    _add_generation_flags(s)
    s.add_argument(
        "--to-prompt", default=None, help="the prompt of the last frame (default: PROMPT)"
    )
    s.add_argument(
        "--to-seed",
        type=seed_arg,
        default=None,
        help="the seed of the last frame (default: --seed + 1)",
    )
    s.add_argument("--frames", type=int, default=8)
    s.set_defaults(fn=cmd_interpolate)

    from jaxdiff.bench.cli import register as register_bench
    from jaxdiff.data.cli import register as register_data
    from jaxdiff.train.cli import register as register_train

    register_train(sub)
    register_data(sub)
    register_bench(sub)
    return p


def main(argv=None) -> int:
    """The `jaxdiff` command. Run as a program (`argv` None), it first applies the CPU process
    settings of jaxdiff.cpu_tuning (huge pages, XLA flags)."""
    if argv is None:
        from jaxdiff.cpu_tuning import tune_process

        tune_process()
    from jaxdiff.convert.diffusers import WeightsError

    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except (UsageError, WeightsError, ConfigError) as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `jaxdiff samplers | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    # `python -m jaxdiff.cli`: run the imported module's main, not this `__main__` copy, whose
    # UsageError would be a different class from the one the subcommands raise.
    from jaxdiff.cli import main as module_main

    sys.exit(module_main())
