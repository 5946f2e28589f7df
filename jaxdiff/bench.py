"""Benchmarks of jaxdiff against diffusers (PyTorch): model steps, pipelines, training.

Random weights at the real sizes; nothing is downloaded. Two sets of rows:

- `cpu`: micro-benchmarks (self-attention over 4096 tokens, a 3x3 convolution) and the tiny
  preset's UNet step, train step and text-to-image, each next to its PyTorch peer in the same
  process (torch limited to `torch_threads` threads).
- `gpu`: the real sizes of issue 7 (SD 1.5 and SDXL UNet steps, VAE decode, text encoding,
  25-step text-to-image, the SD 1.5 train step), in bfloat16; with `compare`, diffusers in
  float16 with SDPA attention.

How a figure is made: a jax program is lowered and compiled first (`compile_s`; the persistent
compilation cache is off unless asked for, so this is a cold compile), then called `warmup`
times, then `runs` times, each call ending in `block_until_ready` (torch: `cuda.synchronize`);
the figure is the median. FLOPs are XLA's cost analysis of the compiled program; a GPU whose
dense bf16 peak is known gets model FLOPs utilization, anything else achieved GFLOP/s. XLA
counts a loop body once, so rows whose program loops (the blocked CPU attention, the sampler's
scan) give analytic FLOPs or none. `memory_bytes` is the compiled program's arguments, outputs
and temporaries (jax) or the CUDA allocator's peak (torch); CPU torch gives none.

`scripts/benchmark.py` and `jaxdiff bench` call `main`; docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

SCHEMA = "jaxdiff-bench/1"

# Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

# Candidates for one GPU, recorded with each run (`--xla-flags gpu`); not yet measured here.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_triton_gemm=false "  # cuBLAS/cuBLASLt for every GEMM (JAX-Toolbox default)
    "--xla_gpu_enable_latency_hiding_scheduler=true"  # overlaps async work with compute
)

# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Timing:
    median_ms: float
    runs_ms: list[float]


def time_calls(fn: Callable[[], object], *, runs: int, warmup: int, clock=time.perf_counter):
    """Call `fn` `warmup` times, then `runs` times timed; `fn` must wait for its own result."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append(1e3 * (clock() - start))
    return Timing(statistics.median(times), times)


@dataclasses.dataclass
class Result:
    """One measured case of one row, by one implementation."""

    row: str  # the row name, as `--rows` takes it
    case: str  # what was run: model, batch, size, dtype
    impl: str  # "jaxdiff", or the peer ("diffusers", "torch"), or a formulation's name
    median_ms: float
    runs_ms: list[float]
    compile_s: float | None = None
    flops: float | None = None  # per call
    flops_source: str | None = None  # "xla" (cost analysis) or "analytic"
    gflops_per_s: float | None = None
    mfu: float | None = None  # model FLOPs utilization, known GPUs only
    memory_bytes: int | None = None
    items_per_s: float | None = None  # images per second (train, text-to-image)
    peer: bool = False  # the reference implementation of its case
    vs_peer: float | None = None  # peer time / this time: > 1 is faster than the peer
    note: str = ""


def flops_of(compiled) -> float | None:
    """FLOPs per call from XLA's cost analysis (a dict, or a list of one per jax version)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends and versions have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


def memory_of(compiled) -> int | None:
    """Bytes of a compiled program: arguments + outputs + temporaries, less donated aliases."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(total)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def _rates(result: Result, device_kind: str, low_precision: bool) -> Result:
    if result.flops:
        per_s = result.flops / (result.median_ms / 1e3)
        result.gflops_per_s = round(per_s / 1e9, 2)
        peak = peak_tflops(device_kind) if low_precision else None
        if peak:
            result.mfu = round(per_s / (peak * 1e12), 4)
    return result


@dataclasses.dataclass
class Context:
    """Settings every row reads."""

    runs: int = 10
    warmup: int = 2
    compare: bool = True  # measure the PyTorch peer where a row has one
    torch_threads: int | None = None  # torch.set_num_threads on the CPU
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    @property
    def device_kind(self) -> str:
        import jax

        return jax.devices()[0].device_kind


def measure_jax(
    ctx: Context,
    fn,
    args: tuple,
    *,
    row: str,
    case: str,
    impl: str = "jaxdiff",
    carry: bool = False,
    items: int | None = None,
    flops: float | None = None,
    low_precision: bool = False,
    donate_argnums=(),
) -> Result:
    """Compile `fn(*args)` (a jitted function, or one to jit), then time it.

    carry: `fn` returns (new first argument, other outputs), as a train step with its state
        donated does; each call then feeds the new first argument to the next.
    flops: analytic FLOPs per call, for programs whose cost analysis counts a loop body once.
    """
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    state = list(args)

    def call():
        out = compiled(*state)
        if carry:
            state[0] = out[0]
        jax.block_until_ready(out)

    timing = time_calls(call, runs=ctx.runs, warmup=ctx.warmup)
    xla_flops = flops_of(compiled)
    result = Result(
        row,
        case,
        impl,
        round(timing.median_ms, 3),
        [round(t, 3) for t in timing.runs_ms],
        compile_s=round(compile_s, 2),
        flops=flops or xla_flops,
        flops_source=("analytic" if flops else "xla") if (flops or xla_flops) else None,
        memory_bytes=memory_of(compiled),
        items_per_s=round(items / (timing.median_ms / 1e3), 3) if items else None,
    )
    return _rates(result, ctx.device_kind, low_precision)


def measure_torch(
    ctx: Context,
    fn: Callable[[], object],
    *,
    row: str,
    case: str,
    impl: str,
    items: int | None = None,
    flops: float | None = None,
) -> Result:
    """Time an eager PyTorch call (the peer); its first call is reported as `compile_s`."""
    import torch

    cuda = torch.cuda.is_available()

    def call():
        fn()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    timing = time_calls(call, runs=ctx.runs, warmup=max(ctx.warmup - 1, 0))
    result = Result(
        row,
        case,
        impl,
        round(timing.median_ms, 3),
        [round(t, 3) for t in timing.runs_ms],
        compile_s=round(first_s, 2),
        flops=flops,
        flops_source="analytic" if flops else None,
        memory_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        items_per_s=round(items / (timing.median_ms / 1e3), 3) if items else None,
        peer=True,
        note="eager; compile_s is the first call",
    )
    return _rates(result, _torch_device_name() or "", True)


def _torch_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def with_peer_ratios(results: list[Result]) -> list[Result]:
    """Set `vs_peer` on every non-peer result whose (row, case) has a peer."""
    peers = {(r.row, r.case): r for r in results if r.peer}
    for r in results:
        p = peers.get((r.row, r.case))
        if p is not None and not r.peer:
            r.vs_peer = round(p.median_ms / r.median_ms, 3)
    return results


# ----------------------------------------------------------------------------- the peers


def _have_peer() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_setup(ctx: Context):
    """torch, its device and the peer's dtype: CUDA float16, or the CPU in float32."""
    import torch

    if ctx.torch_threads and not torch.cuda.is_available():
        torch.set_num_threads(ctx.torch_threads)
    if torch.cuda.is_available():
        return torch, torch.device("cuda"), torch.float16
    return torch, torch.device("cpu"), torch.float32


def _torch_unet(config, device, dtype):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    with device:
        unet = UNet2DConditionModel(**cfg)
    # SDPA is diffusers' default attention processor with torch 2.
    return unet.to(device=device, dtype=dtype)


def _torch_unet_inputs(torch, config, batch, size, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, 77, config.cross_dims[0], generator=g).to(device, dtype)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.randn(batch, 6, generator=g).to(device, dtype),
        }
    return x, t, ctx, added


def _clip_tokenizer():
    from pathlib import Path

    from transformers import CLIPTokenizer

    # The bundled vocabulary, with its tokenizer_config.json (77 tokens, pad = end of text).
    return CLIPTokenizer.from_pretrained(str(Path(__file__).parent / "assets" / "clip_tokenizer"))


# ----------------------------------------------------------------------------- the rows


def _dtypes(dtype_name: str):
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.dtype(dtype_name)
    # Parameters are stored in the compute dtype for inference (half the memory traffic in bf16);
    # norms, softmax and the VAE output still compute in float32 inside the modules.
    host = np.float32 if dtype == jnp.float32 else dtype
    return dtype, host, dtype != jnp.float32


@functools.lru_cache(maxsize=1)
def _device_params(config, dtype_name: str):
    """Random parameters on the device; kept for the next case of the same model (SDXL's take
    half a minute to draw on the host)."""
    import jax

    from jaxdiff.models.build import random_params

    return jax.device_put(random_params(config, 0, param_dtype=_dtypes(dtype_name)[1]))


def unet_step(ctx: Context, preset: str, batch: int, size: int, dtype_name: str, row: str):
    """One UNet forward (one sampling step) at `size`x`size` latents."""
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.build import module_for
    from jaxdiff.models.presets import PRESETS

    config = PRESETS[preset].unet
    dtype, _, low = _dtypes(dtype_name)
    module = module_for(config, dtype=dtype, param_dtype=dtype)
    params = _device_params(config, dtype_name)
    inputs = module.dummy_inputs(batch, size, size)
    rng = np.random.default_rng(0)
    inputs = {
        k: jnp.asarray(rng.standard_normal(v.shape, np.float32), dtype) for k, v in inputs.items()
    }
    inputs["timesteps"] = jnp.full((batch,), 500, jnp.int32)

    def step(params, inputs):
        return module.apply({"params": params}, **inputs)

    case = f"{preset} unet b{batch} {size}x{size} latent {dtype_name}"
    results = [measure_jax(ctx, step, (params, inputs), row=row, case=case, low_precision=low)]
    del params
    if ctx.compare and _have_peer():
        torch, device, tdtype = _torch_setup(ctx)
        unet = _torch_unet(config, device, tdtype).eval()
        x, t, c, added = _torch_unet_inputs(torch, config, batch, size, device, tdtype)

        def peer():
            with torch.no_grad():
                return unet(x, t, c, added_cond_kwargs=added).sample

        results.append(measure_torch(ctx, peer, row=row, case=case, impl="diffusers"))
        del unet
        _release_torch_memory()
    return results


def vae_decode(ctx: Context, preset: str, batch: int, size: int, dtype_name: str, row: str):
    """The VAE decoder from `size`x`size` latents to images."""
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.build import module_for
    from jaxdiff.models.presets import PRESETS

    config = PRESETS[preset].vae
    dtype, _, low = _dtypes(dtype_name)
    module = module_for(config, dtype=dtype, param_dtype=dtype)
    params = _device_params(config, dtype_name)
    z = np.random.default_rng(0).standard_normal((batch, size, size, config.latent_channels))
    z = jnp.asarray(z, dtype)

    def decode(params, z):
        return module.apply({"params": params}, z, method="decode")

    px = size * config.downsampling_factor
    case = f"{preset} vae decode b{batch} -> {px}x{px} {dtype_name}"
    results = [measure_jax(ctx, decode, (params, z), row=row, case=case, low_precision=low)]
    if ctx.compare and _have_peer():
        from diffusers import AutoencoderKL

        torch, device, tdtype = _torch_setup(ctx)
        cfg = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
        with device:
            vae = AutoencoderKL(**cfg).to(device=device, dtype=tdtype).eval()
        zt = torch.randn(batch, config.latent_channels, size, size).to(device, tdtype)

        def peer():
            with torch.no_grad():
                return vae.decode(zt).sample

        results.append(measure_torch(ctx, peer, row=row, case=case, impl="diffusers"))
    return results


def text_encode(ctx: Context, preset: str, component: str, batch: int, dtype_name: str, row):
    """A CLIP text encoder over `batch` prompts of 77 tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.build import module_for, random_params
    from jaxdiff.models.presets import PRESETS

    config = getattr(PRESETS[preset], component)
    dtype, host_dtype, low = _dtypes(dtype_name)
    module = module_for(config, dtype=dtype, param_dtype=dtype)
    params = jax.device_put(random_params(config, 0, param_dtype=host_dtype))
    ids = np.random.default_rng(0).integers(0, config.vocab_size - 2, (batch, 77))
    ids = jnp.asarray(ids, jnp.int32)

    def encode(params, ids):
        return module.apply({"params": params}, ids)

    case = f"{preset} {component} b{batch} x77 {dtype_name}"
    results = [measure_jax(ctx, encode, (params, ids), row=row, case=case, low_precision=low)]
    if ctx.compare and _have_peer():
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch, device, tdtype = _torch_setup(ctx)
        tcfg = config.to_transformers()
        cls = (
            CLIPTextModelWithProjection
            if tcfg["architectures"] == ["CLIPTextModelWithProjection"]
            else CLIPTextModel
        )
        tcfg = CLIPTextConfig(**tcfg, attn_implementation="sdpa")
        with device:
            model = cls(tcfg).to(device=device, dtype=tdtype).eval()
        ids_t = torch.as_tensor(np.array(ids), device=device)

        def peer():
            with torch.no_grad():
                return model(ids_t)[0]

        results.append(measure_torch(ctx, peer, row=row, case=case, impl="transformers"))
    return results


def text_to_image(ctx: Context, preset: str, batch: int, steps: int, dtype_name: str, row: str):
    """The whole text-to-image call: tokenize, encode, `steps` Euler steps with CFG, decode."""
    from jaxdiff.convert.diffusers import random_pipeline
    from jaxdiff.pipelines import StableDiffusion

    weights = random_pipeline(preset, seed=0)
    pipe = StableDiffusion(weights, dtype=dtype_name)
    prompt = "a photograph of an astronaut riding a horse"
    px = pipe.native_size

    def run():
        return pipe.generate(prompt, steps=steps, batch=batch, sampler="euler", progress=False)

    case = f"{preset} text-to-image b{batch} {px}x{px} {steps} euler steps cfg {dtype_name}"
    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    timing = time_calls(run, runs=ctx.runs, warmup=max(ctx.warmup - 1, 0))
    results = [
        Result(
            row,
            case,
            "jaxdiff",
            round(timing.median_ms, 3),
            [round(t, 3) for t in timing.runs_ms],
            compile_s=round(first_s - timing.median_ms / 1e3, 2),
            items_per_s=round(batch / (timing.median_ms / 1e3), 3),
            note="compile_s: first call less the median; host to host, PNG not written",
        )
    ]
    if ctx.compare and _have_peer():
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        peer_pipe = _torch_pipeline(ctx, weights, EulerDiscreteScheduler, StableDiffusionPipeline)

        def peer():
            return peer_pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=7.5,
                height=px,
                width=px,
                num_images_per_prompt=batch,
                output_type="np",
            ).images

        results.append(measure_torch(ctx, peer, row=row, case=case, impl="diffusers", items=batch))
    return results


def _torch_pipeline(ctx, weights, scheduler_cls, pipeline_cls):
    """A diffusers pipeline with random weights in the shapes of `weights`' configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch, device, tdtype = _torch_setup(ctx)
    configs = weights.configs
    vae_cfg = {k: v for k, v in configs["vae"].to_diffusers().items() if not k.startswith("_")}
    with device:
        unet = _torch_unet(configs["unet"], device, tdtype)
        vae = AutoencoderKL(**vae_cfg).to(device=device, dtype=tdtype)
        text = CLIPTextModel(
            CLIPTextConfig(**configs["text_encoder"].to_transformers(), attn_implementation="sdpa")
        ).to(device=device, dtype=tdtype)
    scheduler = scheduler_cls.from_config(
        {k: v for k, v in weights.scheduler_config.items() if k != "_class_name"}
    )
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _jaxdiff_train_step(preset: str, resolution: int, batch: int, dtype_name: str):
    """The adapter to jaxdiff.train: (jitted step, initial state, host batch, key).

    The batch holds cached latents (the VAE posterior's moments), as `cache_latents` gives.
    """
    import jax
    import numpy as np

    from jaxdiff import sharding as shd
    from jaxdiff.train.config import TrainConfig
    from jaxdiff.train.loop import fresh_state, prepare
    from jaxdiff.train.step import jit_train_step

    cfg = TrainConfig(
        model=preset,
        resolution=resolution,
        batch_size=batch,
        compute_dtype=dtype_name,
        mesh_data=1,
        mesh_fsdp=1,
    )
    mesh = _one_device_mesh()
    run = prepare(cfg, mesh)
    state = fresh_state(run)
    step = jit_train_step(run.setup, run.state_shardings, mesh)
    h, w, c = run.setup.latent_shape
    rng = np.random.default_rng(0)
    host = {
        "latents": rng.standard_normal((batch, h, w, 2 * c)).astype(np.float32),
        "input_ids": rng.integers(0, 49406, (batch, 77)).astype(np.int32),
    }
    return step, state, shd.shard_batch(host, mesh), jax.random.key(0), run


def train_step(ctx: Context, preset: str, resolution: int, batch: int, dtype_name: str, row):
    """One optimizer update (AdamW, grad clip, EMA) on cached latents; images/s.

    The peer runs first here: jax's allocator keeps what it has grown to, and both train steps
    together may not fit one GPU.
    """
    case = f"{preset} train b{batch} {resolution}px cached latents {dtype_name}"
    peer = []
    if ctx.compare and _have_peer():
        from jaxdiff.train.config import TrainConfig
        from jaxdiff.train.loop import prepare

        cfg = TrainConfig(model=preset, resolution=resolution, batch_size=batch)
        peer.append(_torch_train(ctx, prepare(cfg, _one_device_mesh()), batch, row=row, case=case))
        _release_torch_memory()
    step, state, batch_arrays, key, _ = _jaxdiff_train_step(preset, resolution, batch, dtype_name)
    low = dtype_name != "float32"
    ours = measure_jax(
        ctx,
        step,
        (state, batch_arrays, key),
        row=row,
        case=case,
        carry=True,
        items=batch,
        low_precision=low,
    )
    return [ours, *peer]


def _one_device_mesh():
    import jax

    from jaxdiff import sharding as shd

    return shd.make_mesh(1, 1, jax.devices()[:1])


def _release_torch_memory():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_train(ctx: Context, run, batch: int, *, row: str, case: str) -> Result:
    """The PyTorch peer of the train step, as diffusers' train_text_to_image.py does it:
    frozen CLIP text encoder, DDPM noise, the UNet, MSE to the noise, backward, clip to norm
    1, AdamW, EMA of the weights; bf16 autocast on CUDA, float32 on the CPU."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch, device, _ = _torch_setup(ctx)
    cfg = run.cfg
    configs = run.setup.configs
    unet = _torch_unet(configs["unet"], device, torch.float32).train()
    with device:
        text = CLIPTextModel(
            CLIPTextConfig(**configs["text_encoder"].to_transformers(), attn_implementation="sdpa")
        ).to(device)
    text.requires_grad_(False)
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(
        unet.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.adam_b1, cfg.adam_b2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    scheduler = DDPMScheduler.from_config(
        {k: v for k, v in run.base.scheduler_config.items() if k != "_class_name"}
    )
    scaling = configs["vae"].scaling_factor
    h, w, c = run.setup.latent_shape
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(batch, 2 * c, h, w, generator=g).to(device)
    ids = torch.randint(0, 49406, (batch, 77), generator=g).to(device)
    cuda = device.type == "cuda"

    def step():
        mean, logvar = moments.chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scaling
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            context = text(ids)[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(unet.parameters()), 1.0 - cfg.ema_decay)
        return loss

    return measure_torch(ctx, step, row=row, case=case, impl="diffusers+torch", items=batch)


def attention_micro(ctx: Context, row: str, batch=2, tokens=4096, heads=8, head_dim=40):
    """Self-attention over `tokens` tokens, float32: the formulations side by side."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.layers import attention

    rng = np.random.default_rng(0)
    shape = (batch, tokens, heads * head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
    flops = 4.0 * batch * heads * tokens * tokens * head_dim  # two products, 2 FLOPs per MAC

    def split(x):
        return x.reshape(batch, tokens, heads, head_dim)

    def dpa(q, k, v):
        return jax.nn.dot_product_attention(split(q), split(k), split(v))

    def einsum(q, k, v):
        logits = jnp.einsum("bthd,bshd->bhts", split(q), split(k)) / np.sqrt(head_dim)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), split(v))

    def chosen(q, k, v):
        return attention(q, k, v, num_heads=heads)

    case = f"self-attention b{batch} {tokens} tokens {heads}x{head_dim} float32"
    results = []
    for impl, fn in (
        ("jax.nn.dot_product_attention", dpa),
        ("einsum-softmax-einsum", einsum),
        ("jaxdiff", chosen),
    ):
        results.append(measure_jax(ctx, fn, (q, k, v), row=row, case=case, impl=impl, flops=flops))
    if ctx.compare and _have_peer():
        torch, device, _ = _torch_setup(ctx)

        def heads_first(x):
            return torch.as_tensor(np.array(split(x))).to(device).transpose(1, 2)

        qt, kt, vt = heads_first(q), heads_first(k), heads_first(v)

        def peer():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

        results.append(measure_torch(ctx, peer, row=row, case=case, impl="torch sdpa", flops=flops))
    return results


def conv_micro(ctx: Context, row: str, batch=2, size=64, channels=320):
    """One 3x3 convolution, float32, NHWC (jax) against NCHW (torch's default)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32) * 0.02)

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    case = f"conv 3x3 b{batch} {size}x{size} {channels}->{channels} float32"
    results = [measure_jax(ctx, conv, (x, kernel), row=row, case=case)]
    if ctx.compare and _have_peer():
        torch, device, _ = _torch_setup(ctx)
        xt = torch.as_tensor(np.array(x)).permute(0, 3, 1, 2).contiguous().to(device)
        wt = torch.as_tensor(np.array(kernel)).permute(3, 2, 0, 1).contiguous().to(device)

        def peer():
            with torch.no_grad():
                return torch.nn.functional.conv2d(xt, wt, padding=1)

        flops = results[0].flops
        results.append(
            measure_torch(ctx, peer, row=row, case=case, impl="torch conv2d", flops=flops)
        )
    return results


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    device: str  # "cpu" or "gpu": which default set it belongs to
    help: str
    run: Callable[[Context, str], list[Result]]  # (context, row name) -> results


def _rows() -> dict[str, Row]:
    def row(name, device, help, fn):
        return name, Row(name, device, help, fn)

    return dict(
        [
            row("attention", "cpu", "self-attention, 4096 tokens, 8x40 heads, b2", attention_micro),
            row("conv", "cpu", "3x3 conv, 320 channels, 64x64, b2", conv_micro),
            row(
                "tiny-unet",
                "cpu",
                "tiny preset UNet step, b2, 16x16 latent",
                lambda c, r: unet_step(c, "tiny", 2, 16, "float32", r),
            ),
            row(
                "tiny-train",
                "cpu",
                "tiny preset train step, b8, 32px, cached latents",
                lambda c, r: train_step(c, "tiny", 32, 8, "float32", r),
            ),
            row(
                "tiny-txt2img",
                "cpu",
                "tiny preset text-to-image, 25 Euler steps, b1",
                lambda c, r: text_to_image(c, "tiny", 1, 25, "float32", r),
            ),
            row(
                "sd15-unet",
                "gpu",
                "SD 1.5 UNet step, b2 and b16, 512px",
                lambda c, r: [
                    *unet_step(c, "sd15", 2, 64, "bfloat16", r),
                    *unet_step(c, "sd15", 16, 64, "bfloat16", r),
                ],
            ),
            row(
                "sdxl-unet",
                "gpu",
                "SDXL UNet step, b2 and b8, 1024px",
                lambda c, r: [
                    *unet_step(c, "sdxl", 2, 128, "bfloat16", r),
                    *unet_step(c, "sdxl", 8, 128, "bfloat16", r),
                ],
            ),
            row(
                "vae-decode",
                "gpu",
                "SD VAE decode to 512px and 1024px, b1",
                lambda c, r: [
                    *vae_decode(c, "sd15", 1, 64, "bfloat16", r),
                    *vae_decode(c, "sd15", 1, 128, "bfloat16", r),
                ],
            ),
            row(
                "text-encode",
                "gpu",
                "CLIP ViT-L (SD 1.5) and OpenCLIP bigG (SDXL), b2",
                lambda c, r: [
                    *text_encode(c, "sd15", "text_encoder", 2, "bfloat16", r),
                    *text_encode(c, "sdxl", "text_encoder_2", 2, "bfloat16", r),
                ],
            ),
            row(
                "sd15-txt2img",
                "gpu",
                "SD 1.5 text-to-image, 25 Euler steps, b1 and b8",
                lambda c, r: [
                    *text_to_image(c, "sd15", 1, 25, "bfloat16", r),
                    *text_to_image(c, "sd15", 8, 25, "bfloat16", r),
                ],
            ),
            row(
                "sd15-train",
                "gpu",
                "SD 1.5 train step, b8, 512px, cached latents",
                lambda c, r: train_step(c, "sd15", 512, 8, "bfloat16", r),
            ),
        ]
    )


ROWS = _rows()


def select_rows(names: list[str] | None, device_rows: str, rows=None) -> list[Row]:
    """The rows to run: `names` in the given order, else every row of the device set."""
    rows = ROWS if rows is None else rows
    if names:
        unknown = [n for n in names if n not in rows]
        if unknown:
            raise ValueError(f"unknown rows {', '.join(unknown)}; known: {', '.join(rows)}")
        return [rows[n] for n in names]
    return [r for r in rows.values() if device_rows == "all" or r.device == device_rows]


# ----------------------------------------------------------------------------- the report


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(ctx: Context) -> dict:
    import jax

    device = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "runs": ctx.runs,
        "warmup": ctx.warmup,
    }
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "transformers"):
        env[name] = _version(name)
    if _have_peer():
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["torch_device"] = _torch_device_name() or "cpu"
    return env


def report(env: dict, results: list[Result], errors: dict[str, str]) -> dict:
    return {
        "schema": SCHEMA,
        "environment": env,
        "results": [dataclasses.asdict(r) for r in with_peer_ratios(results)],
        "errors": errors,
    }


REQUIRED_RESULT_KEYS = {f.name for f in dataclasses.fields(Result)}


def validate(doc: dict) -> None:
    """Raise ValueError unless `doc` is a report of this schema."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema {doc.get('schema')!r} != {SCHEMA!r}")
    for key in ("environment", "results", "errors"):
        if key not in doc:
            raise ValueError(f"missing {key!r}")
    for key in ("date", "device_kind", "jax", "runs"):
        if key not in doc["environment"]:
            raise ValueError(f"environment lacks {key!r}")
    for r in doc["results"]:
        missing = REQUIRED_RESULT_KEYS - set(r)
        if missing:
            raise ValueError(f"result lacks {sorted(missing)}")
        if not r["median_ms"] > 0 or len(r["runs_ms"]) < 1:
            raise ValueError(f"result {r['row']}/{r['impl']} has no timing")


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    """A Markdown table of the results, the peer next to each jaxdiff figure."""
    head = (
        "| row | case | impl | median ms | compile s | GFLOP/s | MFU | memory MiB | items/s "
        "| vs peer |"
    )
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in with_peer_ratios(results):
        mem = None if r.memory_bytes is None else r.memory_bytes / 2**20
        lines.append(
            f"| {r.row} | {r.case} | {r.impl} | {r.median_ms:.2f} | {_fmt(r.compile_s, '.2f')} "
            f"| {_fmt(r.gflops_per_s, '.1f')} | {_fmt(r.mfu, '.1%')} | {_fmt(mem, '.0f')} "
            f"| {_fmt(r.items_per_s, '.2f')} | {_fmt(r.vs_peer, '.2f', '')}"
            f"{'x' if r.vs_peer else ''} |"
        )
    return "\n".join(lines)


def run(rows: list[Row], ctx: Context, json_path: str | None = None) -> dict:
    """Run `rows` in order; a row that fails is reported and the others go on.

    The JSON report is rewritten after every row, so a run cut short keeps what it measured.
    """
    env = environment(ctx)
    results: list[Result] = []
    errors: dict[str, str] = {}
    for row in rows:
        ctx.log(f"-- {row.name}: {row.help}")
        start = time.perf_counter()
        try:
            out = row.run(ctx, row.name)
            results.extend(out)
            for r in out:
                ctx.log(f"   {r.impl:<30} {r.case}: {r.median_ms:.2f} ms")
        except Exception as e:  # one failing row must not hide the others
            import traceback

            errors[row.name] = f"{type(e).__name__}: {e}"[:2000]
            ctx.log(traceback.format_exc(limit=6))
        ctx.log(f"   ({time.perf_counter() - start:.0f} s)")
        env["load_average_end"] = list(os.getloadavg())
        doc = report(env, results, errors)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(doc, f, indent=1)
    return report(env, results, errors)


# ----------------------------------------------------------------------------- command line


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
        choices=["default", "gpu"],
        default="default",
        help="'gpu' appends GPU_XLA_FLAGS to XLA_FLAGS (before jax starts)",
    )
    p.add_argument("--list", action="store_true", help="list the rows and exit")


def main(args: argparse.Namespace) -> dict | None:
    """Run the benchmark from parsed `add_arguments` flags; print the table to stdout."""
    if args.list:
        for r in ROWS.values():
            print(f"{r.name:<14} {r.device:<4} {r.help}")
        return None
    if args.runs < 1 or args.warmup < 0:
        raise ValueError("--runs must be >= 1 and --warmup >= 0")
    if args.xla_flags == "gpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GPU_XLA_FLAGS).strip()
    # jax must not take most of the GPU's memory up front: the torch peer shares the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    device_rows = args.device_rows or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    rows = select_rows(args.rows, device_rows)
    compare = args.compare if args.compare is not None else device_rows == "cpu"
    threads = args.torch_threads or (os.cpu_count() if jax.default_backend() == "cpu" else None)
    ctx = Context(runs=args.runs, warmup=args.warmup, compare=compare, torch_threads=threads)
    doc = run(rows, ctx, args.json)
    print(table([Result(**r) for r in doc["results"]]))
    if doc["errors"]:
        print("\nfailed rows: " + "; ".join(f"{k}: {v}" for k, v in doc["errors"].items()))
    return doc
