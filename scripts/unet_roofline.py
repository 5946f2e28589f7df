"""The floor of a UNet step on a GPU, from its traced program (no GPU needed).

python scripts/unet_roofline.py sd15 2 [--size 64] [--matmul-tflops 664] [--bandwidth-tbs 4.3]

Per kind of op (3x3 and 1x1 convolutions, matrix products, attention), its FLOPs and fewest bytes
(`jaxdiff.bench.op_breakdown`: operands read once, results written once) in bfloat16, and a floor
time: the larger of FLOPs at the matrix rate and bytes at the memory bandwidth, op by op; attention
at the matrix rate alone, since a fused (flash) kernel keeps its logits on chip. The defaults are
the ceilings measured on an H200 (/work/shared/peer/BASELINE.md: a bf16 8192^3 product through
jax, 664 TFLOP/s; the device library's KINDS.md: a device-to-device copy, 4.3 TB/s). Norms,
activations and residual additions are left out, so the floor is below what any program reaches.
Attention is traced through XLA's formulation (the CPU's blocked one and cuDNN's have the same
products), which names its products as batched matrix products.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdiff.cli import ScriptParser  # noqa: E402


def floor_table(preset: str, batch: int, size: int, matmul_tflops: float, bandwidth_tbs: float):
    """[(kind, ops, GFLOP, GB, floor ms)], costliest floor first (attention's GB: None), and the
    total row."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.bench import op_breakdown
    from jaxdiff.models import layers
    from jaxdiff.models.build import abstract_params, module_for
    from jaxdiff.models.presets import PRESETS

    config = PRESETS[preset].unet
    module = module_for(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = abstract_params(config, jnp.bfloat16)
    inputs = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)
        for k, v in module.dummy_inputs(batch, size, size).items()
    }
    inputs["timesteps"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    backend, layers._backend = layers._backend, lambda: "xla"  # XLA's attention formulation
    try:
        jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, **x))(params, inputs)
    finally:
        layers._backend = backend
    peak, bandwidth = matmul_tflops * 1e12, bandwidth_tbs * 1e12
    rows = []
    for kind, r in op_breakdown(jaxpr).items():
        seconds, gb = r["flops"] / peak, None
        if kind != "attention":  # attention's bytes here are XLA's logits, not a fused kernel's
            seconds, gb = max(seconds, r["bytes"] / bandwidth), r["bytes"] / 1e9
        rows.append((kind, int(r["ops"]), r["flops"] / 1e9, gb, seconds * 1e3))
    rows.sort(key=lambda row: -row[4])
    total = ("total", *(sum(row[i] or 0 for row in rows) for i in range(1, 5)))
    return rows, total


def main() -> None:
    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", help="a preset's name: sd15, sdxl, tiny, ...")
    p.add_argument("batch", type=int)
    p.add_argument("--size", type=int, default=None, help="latent size (default: the preset's)")
    p.add_argument("--matmul-tflops", type=float, default=664.0)
    p.add_argument("--bandwidth-tbs", type=float, default=4.3)
    args = p.parse_args()
    from jaxdiff.models.presets import PRESETS

    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r} (one of: {', '.join(sorted(PRESETS))})")
    if args.batch < 1 or (args.size is not None and args.size < 1):
        p.error("batch and --size must be >= 1")
    size = args.size or PRESETS[args.preset].unet.sample_size
    rows, total = floor_table(args.preset, args.batch, size, args.matmul_tflops, args.bandwidth_tbs)
    print(f"{args.preset} UNet, b{args.batch}, {size}x{size} latent, bfloat16")
    print("| op | count | GFLOP | GB | floor ms |\n|---|---|---|---|---|")
    for kind, ops, gflop, gb, ms in [*rows, total]:
        print(f"| {kind} | {ops} | {gflop:.1f} | {'-' if gb is None else f'{gb:.2f}'} | {ms:.2f} |")


if __name__ == "__main__":
    main()
