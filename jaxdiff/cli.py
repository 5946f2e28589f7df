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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        command = self.prog.removeprefix("jaxdiff").strip()
        raise UsageError(f"{command}: {message}" if command else message)


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

    weights = random_pipeline(args.preset, seed=args.seed)
    out = save_pipeline(weights, args.out, overwrite=args.force, dtype=_np_dtype(args.dtype))
    print(f"wrote {out}")


def cmd_convert(args) -> None:
    """Re-write a diffusers folder (fp16 variant, shards) as plain safetensors in a chosen dtype."""
    from jaxdiff.convert import load_pipeline, save_pipeline

    weights = load_pipeline(args.model, variant=args.variant)
    out = save_pipeline(weights, args.out, overwrite=args.force, dtype=_np_dtype(args.dtype))
    print(f"wrote {out}")


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
    s.add_argument("--seed", type=int, default=0)
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
    return p


def main(argv=None) -> int:
    from jaxdiff.convert.diffusers import WeightsError

    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except (UsageError, WeightsError, ConfigError) as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
