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
fused attention where jax allows it), and the parameters are placed as
`jaxdiff.sharding.put_params` places them on a GPU, a train state as `jaxdiff.train` places it
(`default_layout=True`: the default order everywhere, as before). A
train step's memory analysis is XLA's plan for the target: whether it fits the card, before a
device is spent on it.
"""

from __future__ import annotations

import contextlib
import functools
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

    Returns `kernels` ({kind: count}), `total` (their sum), `bytes` ({kind: the bytes its
    kernels' operands and results hold}: what they would read and write if each read its
    operands whole, an upper bound on the traffic, with a floor of bytes / bandwidth), and
    `relayouts`: the kernels whose inputs are all parameters, with the bytes they write: work
    that depends only on the weights (a transpose of a convolution kernel, a concatenation of
    weights for one merged matrix product), done again on every call of the program.
    """
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in this program text")
    parameters: set[str] = set()
    sizes: dict[str, int] = {}
    kernels: Counter = Counter()
    moved: Counter = Counter()
    relayouts: list[tuple[str, str, int]] = []
    for line in hlo_text[start:].splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        sizes[name] = _nbytes(shape)
        if op == "parameter":
            parameters.add(name)
        if op in _FREE:
            continue
        kind = _kind(op, line)
        kernels[kind] += 1
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        moved[kind] += sizes[name] + sum(sizes.get(o, 0) for o in operands)
        if operands and all(o in parameters for o in operands):
            relayouts.append((name, kind, sizes[name]))
    return {
        "kernels": dict(kernels),
        "total": sum(kernels.values()),
        "bytes": dict(moved),
        "relayouts": relayouts,
    }


def compile_case(
    preset: str,
    batch: int,
    *,
    vae: bool = False,
    train: bool = False,
    remat: bool = False,
    target: str = "h200",
    default_layout=False,
):
    """A UNet step (the preset's latent size), a VAE decode to `batch` images of the preset's
    size (`vae`), or a train step of the UNet on `batch` cached latents at the preset's size
    (`train`, with `remat`: jaxdiff.train's step, as the bench's train rows run it), in
    bfloat16, compiled for `target` without a device: (the compiled program, its memory
    analysis). Raises RuntimeError where jax has no CUDA plugin."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from jaxdiff.models.build import abstract_params, module_for
    from jaxdiff.models.presets import PRESETS
    from jaxdiff.sharding import MESH_AXES, placement

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=TARGETS[target], topology="1x1x1"
        )
    except Exception as error:  # no plugin, or one for another jaxlib
        raise RuntimeError(
            "compiling for a GPU without one needs jax's CUDA plugin for this jaxlib "
            f"(jax-cuda12-plugin and jax-cuda12-pjrt {jax.__version__}): {error}"
        ) from None
    mesh = topologies.make_mesh(topology, (1, 1), MESH_AXES)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # As put_params places them on a GPU ("cpu": the default order, as before it).
    platform = "cpu" if default_layout else "gpu"

    def placed(path, leaf):
        where = placement(path, leaf.shape, sharding, platform)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

    with _as_on_the_target():
        if train:
            program, args = _train_program(preset, batch, remat, mesh, platform)
        else:
            config = PRESETS[preset].vae if vae else PRESETS[preset].unet
            module = module_for(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
            params = jax.tree_util.tree_map_with_path(placed, abstract_params(config, jnp.bfloat16))
            if vae:
                size = PRESETS[preset].unet.sample_size
                inputs = jax.ShapeDtypeStruct(
                    (batch, size, size, 4), jnp.bfloat16, sharding=sharding
                )

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

            program, args = jax.jit(program), (params, inputs)
        compiled = program.trace(*args).lower(lowering_platforms=("cuda",)).compile()
    return compiled, compiled.memory_analysis()


def _train_program(preset: str, batch: int, remat: bool, mesh, platform: str):
    """jaxdiff.train's jitted step and its abstract arguments (the state, `batch` cached
    latents at the preset's resolution, a key) on `mesh`, the state placed as on `platform`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.bench.rows import _train_config
    from jaxdiff.models.presets import PRESETS
    from jaxdiff.sharding import batch_sharding, placements, replicated
    from jaxdiff.train import state as st
    from jaxdiff.train.loop import prepare
    from jaxdiff.train.step import jit_train_step

    resolution = PRESETS[preset].unet.sample_size * 8
    run = prepare(_train_config(preset, resolution, batch, "bfloat16", remat), mesh)
    frozen = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        run.frozen,
        run.frozen_shardings,
    )
    h, w, c = run.setup.latent_shape
    rows = batch_sharding(mesh)
    data = {
        "latents": jax.ShapeDtypeStruct((batch, h, w, 2 * c), jnp.float32, sharding=rows),
        "input_ids": jax.ShapeDtypeStruct((batch, 77), jnp.int32, sharding=rows),
    }
    if run.setup.sdxl:
        data["input_ids_2"] = jax.ShapeDtypeStruct((batch, 77), jnp.int32, sharding=rows)
        data["time_ids"] = jax.ShapeDtypeStruct((batch, 6), jnp.float32, sharding=rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    # Each array's sharding, or its Format (a kernel's order), as `run.state_shardings`.
    state = st.assemble_state(placements(run.abstract, platform), run.frozen_shardings)
    abstract = jax.tree_util.tree_map(
        lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
        st.assemble_state(run.abstract, frozen),
        state,
    )
    return jit_train_step(run.setup, state, mesh), (abstract, data, key)


@contextlib.contextmanager
def _as_on_the_target():
    """What jax and jaxdiff would ask a device, answered for the target: its cuDNN and compute
    capability (9.0); `layers.attention`'s GPU path, and in place of its probe compile of cuDNN's
    attention, the same attention lowered for the target, where jax's own limits apply (the VAE's
    head of 512 and the backward of cross-attention over 77 tokens go to XLA's attention)."""
    import jax
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from jaxdiff.models import layers

    @functools.cache
    def lowers(*shape):
        fn, *args = layers.cudnn_probe(*shape)
        try:
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        except Exception:  # jax's refusal: XLA's attention, as on a device
            return ""
        return None

    patches = [
        (layers, "_backend", lambda: "gpu"),
        (layers, "_cudnn_error", lowers),
        (cudnn_attention, "check_cudnn_version", lambda: CUDNN_VERSION),
        (cudnn_attention, "check_compute_capability", lambda c: _capability(c) <= (9, 0)),
        (cudnn_attention, "is_cuda_compute_capability_equal", lambda c: _capability(c) == (9, 0)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        layers.clear_cudnn_probes()
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        layers.clear_cudnn_probes()


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))
