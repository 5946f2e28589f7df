"""XLA's program for a GPU, compiled on a machine without one: how many kernels of each kind a
UNet step or a VAE decode launches, and which ones only rearrange parameters.

jax compiles for a GPU it does not have through a compile-only device (`jax.experimental.
topologies`) described by a target config: the chip's figures that XLA's GPU compiler reads
(`TARGETS`). That needs jax's CUDA plugin for the installed jaxlib (`jax-cuda12-plugin` and
`jax-cuda12-pjrt` of the same version, about 500 MB; no CUDA libraries, no driver), which is not
a jaxdiff dependency: install it in a separate environment, as docs/benchmarks.md says. Without
a device XLA runs no autotuning (its matrix-product tilings are defaults, some split-K), and
cuDNN's own refusals of a graph at compile time are not seen; the program's structure (its
fusions, cuDNN calls, layout changes, the memory it plans) is the GPU compiler's. `summarize`
reads the compiled program's text (`Compiled.as_text()`), so it works on any such text.

The program is the one jaxdiff runs on a GPU: `layers.attention` takes its GPU path (cuDNN's
fused attention where jax allows its head size), and the parameters are placed as
`jaxdiff.sharding.put_params` places them on a GPU (`default_layout=True`: as before it).
"""

from __future__ import annotations

import math
import re
from collections import Counter

# XLA's GpuTargetConfigProto text: the chip's figures, an H100 SXM's and an H200's from their
# data sheets (132 SMs, compute capability 9.0, 50 MB of L2); CUDA 12.8 and cuDNN 9.10 stand in
# for the runtime, which the device machine's jax 0.11.2 may not match.
_DEVICE_INFO = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _DEVICE_INFO.format(
        bandwidth=3_350_000_000_000, memory=85_520_809_984, name="NVIDIA H100 80GB HBM3"
    ),
    "h200": _DEVICE_INFO.format(
        bandwidth=4_800_000_000_000, memory=150_754_820_096, name="NVIDIA H200"
    ),
}
CUDNN_VERSION = 91000  # the target's, for jax's check of cuDNN's attention

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)")
# Instructions that launch nothing.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


def _nbytes(shape: str) -> int:
    return sum(
        _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", shape)
    )


def _kind(op: str, line: str) -> str:
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        name = target.group(1) if target else "?"
        if "cudnn$conv" in name:
            return "cuDNN convolution"
        if "cudnn$fmha" in name:
            return "cuDNN attention"
        if "gemm" in name.lower() or "cublas" in name.lower():
            return "cuBLAS matrix product"
        return f"custom call {name}"
    if op == "fusion":
        kind = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(\w+)", line)
        kind = kind.group(1) if kind else "?"
        if "gemm" in kind:
            return "Triton matrix product"
        if kind == "__triton":
            return "Triton fusion (norms, softmax)"
        return "XLA fusion (elementwise, reductions, copies)"
    return op


def summarize(hlo_text: str) -> dict:
    """The entry computation of a compiled program's text, read as the GPU runs it: each
    instruction that is not free (a parameter, bitcast, tuple) is one kernel launch or copy.

    Returns `kernels` ({kind: count}), `total` (their sum), and `relayouts`: the kernels whose
    inputs are all parameters, with the bytes they write: work that depends only on the
    weights (a transpose of a convolution kernel, a concatenation of weights for one merged
    matrix product), done again on every call of the program.
    """
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in this program text")
    parameters: set[str] = set()
    kernels: Counter = Counter()
    relayouts: list[tuple[str, str, int]] = []
    for line in hlo_text[start:].splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        if op == "parameter":
            parameters.add(name)
        if op in _FREE:
            continue
        kind = _kind(op, line)
        kernels[kind] += 1
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        if operands and all(o in parameters for o in operands):
            relayouts.append((name, kind, _nbytes(shape)))
    return {"kernels": dict(kernels), "total": sum(kernels.values()), "relayouts": relayouts}


def compile_case(
    preset: str, batch: int, *, vae: bool = False, target: str = "h200", default_layout=False
):
    """A UNet step (`vae=False`; the preset's latent size) or a VAE decode to `batch` images of
    the preset's size, in bfloat16, compiled for `target` without a device: (the compiled
    program, its memory analysis). Raises RuntimeError where jax has no CUDA plugin."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from jaxdiff.models import layers
    from jaxdiff.models.build import abstract_params, module_for
    from jaxdiff.models.presets import PRESETS
    from jaxdiff.sharding import CONV_KERNEL_LAYOUTS

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=TARGETS[target], topology="1x1x1"
        )
    except Exception as error:  # no plugin, or one for another jaxlib
        raise RuntimeError(
            "compiling for a GPU without one needs jax's CUDA plugin for this jaxlib "
            f"(jax-cuda12-plugin and jax-cuda12-pjrt {jax.__version__}): {error}"
        ) from None
    mesh = topologies.make_mesh(topology, (1,), ("gpu",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    order = None if default_layout else CONV_KERNEL_LAYOUTS["gpu"]

    def placed(path, leaf):
        where = sharding
        if order and getattr(path[-1], "key", None) == "kernel" and len(leaf.shape) == 4:
            from jax.experimental.layout import Format, Layout

            where = Format(Layout(major_to_minor=order), sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

    config = PRESETS[preset].vae if vae else PRESETS[preset].unet
    module = module_for(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map_with_path(placed, abstract_params(config, jnp.bfloat16))
    if vae:
        size = PRESETS[preset].unet.sample_size
        inputs = jax.ShapeDtypeStruct((batch, size, size, 4), jnp.bfloat16, sharding=sharding)

        def program(p, z):
            return module.apply({"params": p}, z, method="decode")

    else:
        size = config.sample_size
        inputs = {
            k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=sharding)
            for k, v in module.dummy_inputs(batch, size, size).items()
        }
        inputs["timesteps"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)

        def program(p, x):
            return module.apply({"params": p}, **x)

    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    # What jax and jaxdiff would ask a device: the target's cuDNN and compute capability (9.0),
    # and, for `layers.attention`, jax's own limits on cuDNN's head size on Hopper (the VAE's
    # 512 goes to XLA's attention) in place of the probe compile.
    patches = [
        (layers, "_backend", lambda: "gpu"),
        (layers, "_cudnn_compiles", lambda part, t, s, n, dim, *_: dim % 8 == 0 and dim <= 256),
        (cudnn_attention, "check_cudnn_version", lambda: CUDNN_VERSION),
        (cudnn_attention, "check_compute_capability", lambda c: _capability(c) <= (9, 0)),
        (cudnn_attention, "is_cuda_compute_capability_equal", lambda c: _capability(c) == (9, 0)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        lowered = jax.jit(program).trace(params, inputs).lower(lowering_platforms=("cuda",))
        compiled = lowered.compile()
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    return compiled, compiled.memory_analysis()


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))
