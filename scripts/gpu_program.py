"""XLA's GPU program for a UNet step, VAE decode or train step, compiled without a GPU.

python scripts/gpu_program.py sd15 2 [--vae | --train [--remat]] [--target h200|h100]
    [--default-layout] [--hlo F]

Needs jax's CUDA plugin for the installed jaxlib, in an environment of its own (not a jaxdiff
dependency; about 500 MB, no CUDA libraries):

    python3 -m venv --system-site-packages /tmp/gpu-aot
    /tmp/gpu-aot/bin/pip install jax-cuda12-plugin==JAXLIB jax-cuda12-pjrt==JAXLIB
    /tmp/gpu-aot/bin/python scripts/gpu_program.py sd15 2

Prints the kernels the program launches per call, by kind, with the bytes their operands and
results hold (what they move if each reads its operands whole); those that read only parameters
(work that depends on the weights alone, redone on every call); and the memory XLA plans
(`jaxdiff.bench.gpu_program`): for `--train` (jaxdiff.train's step on cached latents at the
preset's size, bfloat16 compute; `--remat` as the `sdxl-train` row), whether it fits the target.
`--default-layout` places convolution kernels (for `--train`, with their Adam moments and EMA)
in the default order, as jaxdiff did before `put_params` and `jaxdiff.sharding.placements`;
`--hlo F` writes the program's text to F. Without autotuning XLA may find no Triton tiling for a
small matrix product; `XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` hands them to cuBLAS.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before jax starts: no device to look for, and no check of CUDA libraries that are not needed.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

from jaxdiff.cli import ScriptParser  # noqa: E402


def main() -> None:
    from jaxdiff.bench.gpu_program import TARGETS, compile_case, summarize
    from jaxdiff.bench.harness import memory_of
    from jaxdiff.models.presets import PRESETS

    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", help="a preset's name: sd15, sdxl, tiny, ...")
    p.add_argument("batch", type=int)
    p.add_argument("--vae", action="store_true", help="the VAE decode instead of the UNet step")
    p.add_argument("--train", action="store_true", help="the train step instead of the UNet's")
    p.add_argument("--remat", action="store_true", help="with --train: rematerialize blocks")
    p.add_argument("--target", default="h200", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--default-layout", action="store_true")
    p.add_argument("--hlo", help="write the compiled program's text here")
    args = p.parse_args()
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r} (one of: {', '.join(sorted(PRESETS))})")
    if args.target not in TARGETS:
        p.error(f"unknown target {args.target!r} (one of: {', '.join(TARGETS)})")
    if args.batch < 1:
        p.error("batch must be >= 1")
    if args.vae and args.train or args.remat and not args.train:
        p.error("--vae and --train exclude each other; --remat goes with --train")
    import jax

    try:
        compiled, memory = compile_case(
            args.preset,
            args.batch,
            vae=args.vae,
            train=args.train,
            remat=args.remat,
            target=args.target,
            default_layout=args.default_layout,
        )
    except jax.errors.JaxRuntimeError as error:  # e.g. no Triton tiling without autotuning
        first = str(error).strip().splitlines()[0][:300]
        hint = "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false hands matrix products to cuBLAS"
        print(f"gpu_program.py: XLA did not compile it ({hint}): {first}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as error:
        print(f"gpu_program.py: {error}".splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None
    text = compiled.as_text()
    if args.hlo:
        Path(args.hlo).write_text(text)
    summary = summarize(text)
    what = "VAE decode" if args.vae else "train step" if args.train else "UNet step"
    what += " with remat" if args.remat else ""
    layout = "default" if args.default_layout else "put_params'"
    print(f"{args.preset} {what}, b{args.batch}, bfloat16, {args.target}, kernel layout {layout}")
    print("| kernels | count | operands and results, GB |\n|---|---|---|")
    for kind, count in sorted(summary["kernels"].items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {count} | {summary['bytes'][kind] / 1e9:.2f} |")
    print(f"| total | {summary['total']} | {sum(summary['bytes'].values()) / 1e9:.2f} |")
    relayouts = summary["relayouts"]
    written = sum(n for *_, n in relayouts) / 1e6
    print(f"kernels reading only parameters: {len(relayouts)}, writing {written:.1f} MB per call")
    gib = 2**30
    peak = memory_of(compiled)
    print(
        f"memory: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, outputs "
        f"{memory.output_size_in_bytes / gib:.2f} GiB ({memory.alias_size_in_bytes / gib:.2f} in "
        f"the donated arguments' buffers), temporaries {memory.temp_size_in_bytes / gib:.2f} GiB: "
        f"{peak / gib:.2f} GiB planned at once"
    )


if __name__ == "__main__":
    main()
