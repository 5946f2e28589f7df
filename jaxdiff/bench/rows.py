"""The benchmark's rows and their PyTorch peers (diffusers, transformers, torch).

Each row measures with `jaxdiff.bench.harness` and returns its `Result`s; `ROWS` names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from unittest import mock

from jaxdiff.bench.harness import (
    Context,
    Result,
    Row,
    _have_peer,
    measure_jax,
    measure_jax_back_to_back,
    measure_torch,
    measure_torch_back_to_back,
    time_calls,
)
from jaxdiff.bench.memory import MEM_FRACTION, max_batch_sampling

# ----------------------------------------------------------------------------- the peers


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
    return CLIPTokenizer.from_pretrained(
        str(Path(__file__).parents[1] / "assets" / "clip_tokenizer")
    )


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
    """Random parameters on the device, convolution kernels in the order its convolutions read
    (`put_params`), as the pipelines place them; kept for the next case of the same model (SDXL's
    take half a minute to draw on the host)."""
    import jax

    from jaxdiff.models.build import random_params
    from jaxdiff.sharding import put_params

    params = random_params(config, 0, param_dtype=_dtypes(dtype_name)[1])
    return put_params(params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


# UNet calls a UNet row's back-to-back case dispatches before it waits: a sampler's steps.
UNET_BACK_TO_BACK = 10


def unet_step(ctx: Context, preset: str, batch: int, size: int, dtype_name: str, row: str):
    """One UNet forward (one sampling step) at `size`x`size` latents.

    Each side in two cases: each call waited for, and `UNET_BACK_TO_BACK` calls dispatched one
    after another and waited for once (per call), as a sampler run step by step calls it (for
    jax, the host's work on a call, handing hundreds of parameter arrays to the runtime, then
    overlaps the device's work on the last; jaxdiff's own samplers run every step in one
    program).
    """
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
    results = measure_jax_back_to_back(
        ctx, step, (params, inputs), calls=UNET_BACK_TO_BACK, row=row, case=case, low_precision=low
    )
    del params
    if ctx.compare and _have_peer():
        torch, device, tdtype = _torch_setup(ctx)
        unet = _torch_unet(config, device, tdtype).eval()
        x, t, c, added = _torch_unet_inputs(torch, config, batch, size, device, tdtype)

        def peer():
            with torch.no_grad():
                return unet(x, t, c, added_cond_kwargs=added).sample

        results += measure_torch_back_to_back(
            ctx, peer, calls=UNET_BACK_TO_BACK, row=row, case=case, impl="diffusers"
        )
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


def text_to_image(
    ctx: Context,
    preset: str,
    batch: int,
    steps: int,
    dtype_name: str,
    row: str,
    step_by_step: bool = False,
):
    """The whole text-to-image call: tokenize, encode, `steps` Euler steps with CFG, decode.

    step_by_step: also time the path of `jaxdiff generate`'s progress bar, one call per sampler
    step (the bar's drawing left out, as the peer's is)."""
    from jaxdiff.convert.diffusers import random_pipeline
    from jaxdiff.pipelines import StableDiffusion, progress

    weights = random_pipeline(preset, seed=0)
    pipe = StableDiffusion(weights, dtype=dtype_name)
    prompt = "a photograph of an astronaut riding a horse"
    px = pipe.native_size
    case = f"{preset} text-to-image b{batch} {px}x{px} {steps} euler steps cfg {dtype_name}"

    def measure(impl, with_progress):
        def run():
            return pipe.generate(
                prompt, steps=steps, batch=batch, sampler="euler", progress=with_progress
            )

        start = time.perf_counter()
        run()
        first_s = time.perf_counter() - start
        timing = time_calls(run, runs=ctx.runs, warmup=max(ctx.warmup - 1, 0))
        return Result.from_timing(
            row,
            case,
            impl,
            timing,
            compile_s=first_s - timing.median_ms / 1e3,
            items=batch,
            note="compile_s: first call less the median; host to host, PNG not written",
        )

    results = [measure("jaxdiff", False)]
    if step_by_step:

        @contextlib.contextmanager
        def silent(**_):
            yield lambda: None

        with mock.patch.object(progress, "bar", silent):
            results.append(measure("jaxdiff, one call per step", True))
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


def _train_config(preset: str, resolution: int, batch: int, dtype_name: str, remat: bool):
    from jaxdiff.train.config import TrainConfig

    return TrainConfig(
        model=preset,
        resolution=resolution,
        batch_size=batch,
        compute_dtype=dtype_name,
        remat=remat,
        mesh_data=1,
        mesh_fsdp=1,
    )


def _jaxdiff_train_step(
    preset: str, resolution: int, batch: int, dtype_name: str, remat=False, data: int = 1
):
    """The adapter to jaxdiff.train: (jitted step, initial state, host batch, key), on the first
    `data` devices, the batch split across them (data parallel).

    The batch holds cached latents (the VAE posterior's moments), as `cache_latents` gives, and
    for SDXL the second tokenizer's ids and the size ids of a square image at `resolution`.
    """
    import jax
    import numpy as np

    from jaxdiff import sharding as shd
    from jaxdiff.models.build import random_params
    from jaxdiff.train.data import sdxl_time_ids
    from jaxdiff.train.loop import fresh_state, prepare
    from jaxdiff.train.step import jit_train_step

    mesh = _one_device_mesh() if data == 1 else shd.make_mesh(data, 1, jax.devices()[:data])
    cfg = dataclasses.replace(
        _train_config(preset, resolution, batch, dtype_name, remat), mesh_data=data
    )
    run = prepare(cfg, mesh)
    # The trained components start from weights drawn on the host (`random_params`, as the other
    # rows' models), not from the train state's initializer: the row times the step, and that
    # initializer compiles a kernel per random draw (on an H200, SD 1.5's had not compiled after
    # 100 s; docs/benchmarks.md, session 11).
    pretrained = {name: random_params(run.setup.configs[name]) for name in run.pretrained}
    state = fresh_state(dataclasses.replace(run, pretrained=pretrained))
    step = jit_train_step(run.setup, run.state_shardings, mesh)
    h, w, c = run.setup.latent_shape
    rng = np.random.default_rng(0)
    host = {
        "latents": rng.standard_normal((batch, h, w, 2 * c)).astype(np.float32),
        "input_ids": rng.integers(0, 49406, (batch, 77)).astype(np.int32),
    }
    if run.setup.sdxl:
        host["input_ids_2"] = rng.integers(0, 49406, (batch, 77)).astype(np.int32)
        time_ids = sdxl_time_ids(resolution, resolution, resolution, flip=False)
        host["time_ids"] = np.tile(time_ids, (batch, 1))
    return step, state, shd.shard_batch(host, mesh), jax.random.key(0), run


# Steps a train row's back-to-back case dispatches before it waits.
TRAIN_BACK_TO_BACK = 4


def train_step(
    ctx: Context, preset: str, resolution: int, batch: int, dtype_name: str, row, remat=False
):
    """One optimizer update (AdamW, grad clip, EMA) on cached latents; images/s. With `remat`,
    the UNet's blocks are rematerialized (the peer: diffusers' gradient checkpointing).

    Each side in two cases: each step waited for, and `TRAIN_BACK_TO_BACK` steps dispatched one
    after another and waited for once (per step), as a training loop runs them: jaxdiff.train's
    dispatches a step before it reads the last one's metrics, so the host's work on a step (for
    jax, handing the state's thousands of arrays to the runtime) overlaps the device's.

    The peer runs first here: jax's allocator keeps what it has grown to, and both train steps
    together may not fit one GPU.

    On a CPU split into several devices (`--xla-flags cpu-cores`: one per core), the same two
    cases again with the batch split across all of them ("data parallel over N CPU devices"),
    against the same peer: XLA runs a program's kernels mostly one at a time, and a device per
    core runs a share of the batch on each core at once.
    """
    case = f"{preset} train b{batch} {resolution}px cached latents {dtype_name}"
    case += " remat" if remat else ""
    peer = []
    if ctx.compare and _have_peer():
        from jaxdiff.train.loop import prepare

        cfg = _train_config(preset, resolution, batch, "float32", remat)
        peer = _torch_train(ctx, prepare(cfg, _one_device_mesh()), batch, row=row, case=case)
        _release_torch_memory()
    import jax

    low = dtype_name != "float32"
    ours = []
    devices = jax.device_count()
    split = jax.default_backend() == "cpu" and devices > 1 and batch % devices == 0
    for data in (1, devices) if split else (1,):
        step, state, batch_arrays, key, _ = _jaxdiff_train_step(
            preset, resolution, batch, dtype_name, remat, data
        )
        ours += measure_jax_back_to_back(
            ctx,
            step.jitted,
            step.arguments(state, batch_arrays, key),  # the state's frozen weights not donated
            calls=TRAIN_BACK_TO_BACK,
            carry=True,
            row=row,
            case=case,
            items=batch,
            low_precision=low,
            impl="jaxdiff" if data == 1 else f"jaxdiff, data parallel over {data} CPU devices",
        )
        del step, state, batch_arrays
    return [*ours, *peer]


def _one_device_mesh():
    import jax

    from jaxdiff import sharding as shd

    return shd.make_mesh(1, 1, jax.devices()[:1])


def _release_torch_memory():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_train(ctx: Context, run, batch: int, *, row: str, case: str) -> list[Result]:
    """The PyTorch peer of the train step, as diffusers' train_text_to_image.py (and
    train_text_to_image_sdxl.py) does it: frozen CLIP text encoder(s), DDPM noise, the UNet, MSE
    to the noise, backward, clip to norm 1, AdamW, EMA of the weights; bf16 autocast on CUDA,
    float32 on the CPU; gradient checkpointing where the run has `remat`."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch, device, _ = _torch_setup(ctx)
    cfg = run.cfg
    configs = run.setup.configs
    unet = _torch_unet(configs["unet"], device, torch.float32).train()
    if cfg.remat:
        unet.enable_gradient_checkpointing()
    names = ("text_encoder", "text_encoder_2") if run.setup.sdxl else ("text_encoder",)
    encoders = []
    for name in names:
        model_cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        tcfg = CLIPTextConfig(**configs[name].to_transformers(), attn_implementation="sdpa")
        with device:
            encoders.append(model_cls(tcfg).to(device).requires_grad_(False))
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
    ids = [torch.randint(0, 49406, (batch, 77), generator=g).to(device) for _ in encoders]
    px = float(cfg.resolution)
    time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]] * batch, device=device)
    cuda = device.type == "cuda"

    def encode():
        if not run.setup.sdxl:
            return encoders[0](ids[0])[0], None
        outs = [enc(i, output_hidden_states=True) for enc, i in zip(encoders, ids, strict=True)]
        context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        return context, {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}

    def step():
        mean, logvar = moments.chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scaling
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            context, added = encode()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(unet.parameters()), 1.0 - cfg.ema_decay)
        return loss

    return measure_torch_back_to_back(
        ctx, step, calls=TRAIN_BACK_TO_BACK, row=row, case=case, impl="diffusers+torch", items=batch
    )


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


# One load in a fresh process: imports first, then the load timed, with the process's memory
# (/proc/self/status) sampled every 10 ms on a thread; one JSON line on stdout.
_LOAD_CHILD = r"""
import json, sys, threading, time

impl, folder = sys.argv[1], sys.argv[2]
FIELDS = {"RssAnon": "anon", "VmRSS": "resident"}


def memory():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in FIELDS:
                out[FIELDS[key]] = int(line.split()[1]) * 1024
    return out


if impl == "jaxdiff":
    import jax
    from jaxdiff.pipelines import load
else:
    import torch
    from diffusers import DiffusionPipeline
peak, done = memory(), threading.Event()


def sample():
    while not done.wait(0.01):
        for k, v in memory().items():
            peak[k] = max(peak.get(k, 0), v)


threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if impl == "jaxdiff":
    jax.block_until_ready(load(folder).params)
else:
    DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
seconds = time.perf_counter() - start
done.set()
for k, v in memory().items():
    peak[k] = max(peak.get(k, 0), v)
print(json.dumps({"seconds": seconds, "peak_anon": peak["anon"], "peak_resident": peak["resident"]}))
"""


def model_load(ctx: Context, preset: str, row: str):
    """A diffusers-format folder of `preset` (random weights, float32, written once) loaded until
    the parameters are ready to compute with, each load in a fresh process: seconds, and the
    process's peak anonymous memory as `memory_bytes` (its peak resident memory, with the mapped
    weight files, in the note). diffusers' `from_pretrained` maps the files and computes on the
    mapping, so its anonymous memory stays small; jaxdiff's parameters are the anonymous memory.
    Linux only (/proc)."""
    import json
    import statistics
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from jaxdiff.convert import save_pipeline
    from jaxdiff.convert.diffusers import random_pipeline

    impls = ["jaxdiff"] + (["diffusers"] if ctx.compare and _have_peer() else [])
    case = f"{preset} folder load, float32, to parameters ready"
    results = []
    with tempfile.TemporaryDirectory(prefix="jaxdiff-load-") as tmp:
        folder = Path(tmp) / preset
        save_pipeline(random_pipeline(preset, seed=0), folder)
        for impl in impls:
            runs = []
            for i in range(ctx.warmup + ctx.runs):
                out = subprocess.run(
                    [sys.executable, "-c", _LOAD_CHILD, impl, str(folder)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"the {impl} load exited with {out.returncode}: {last}")
                if i >= ctx.warmup:  # warm-ups fill the page cache
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            times = [1e3 * r["seconds"] for r in runs]
            anon = max(r["peak_anon"] for r in runs)
            resident = max(r["peak_resident"] for r in runs)
            results.append(
                Result(
                    row,
                    case,
                    impl,
                    round(statistics.median(times), 3),
                    [round(t, 3) for t in times],
                    memory_bytes=anon,
                    peer=impl != "jaxdiff",
                    note=f"memory: peak anonymous; peak resident {resident / 2**30:.2f} GiB",
                )
            )
    return results


# A train step's state, per parameter: the weight, its EMA and its two Adam moments.
_MOMENTS = ("params", "ema", "mu", "nu")


def dispatch_micro(ctx: Context, row: str, preset: str = "sd15"):
    """What a call costs per parameter array: a program that reads one element of each of the
    UNet's parameter arrays (SD 1.5's 686; one element each here), against the same elements in
    one array. On a GPU, where the runtime tracks each buffer of a call, the difference is what a
    UNet step call pays for taking its parameters one array each: on an H200 one SD 1.5 UNet call
    at b2 took 11.3 ms, a step of the sampler's scan (its parameters passed once) at most 8.2.
    The UNet's own tree of them (nested dicts) costs its flattening on top of the flat list, and
    a fourth case places its convolution kernels as `put_params` does on a GPU: jax checks each
    one's layout on every call.

    Then a train step's state: the weights, their EMA and two Adam moments (four arrays a
    parameter), each updated and handed back, donated, as the train step does; the same with
    each of the EMA's and moments' small leaves (at most `SMALL_LEAF` elements: biases, norm
    scales) in one array per tree; and with the EMA and each moment one array (689 arrays for
    SD 1.5): candidate layouts. SD 1.5's train step took 104.5 ms on an H200 each step waited
    for, 85.6 back to back, against 77.2 ms of device time (session 17), and its traced calls
    spent about 40 ms each on the host in jax's and the runtime's work array by array (session
    19); on this CPU a program that updates 2,744 one-element arrays took 11 ms a call, 686 of
    them 2.2 ms (session 18): what a call pays per array it hands back."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.build import abstract_params
    from jaxdiff.models.presets import PRESETS
    from jaxdiff.sharding import put_params
    from jaxdiff.train.state import SMALL_LEAF

    abstract = abstract_params(PRESETS[preset].unet)
    n = len(jax.tree_util.tree_leaves(abstract))
    each = [jnp.full((1,), i, jnp.float32) for i in range(n)]
    packed = jnp.arange(n, dtype=jnp.float32)
    # The same tree with each 4-D kernel a [1, 1, 2, 2] array, placed as the pipelines place
    # them on a GPU: a call's cost for checking the layout of those arrays.
    shaped = jax.tree_util.tree_map(
        lambda a: np.zeros((1, 1, 2, 2) if len(a.shape) == 4 else (1,), np.float32), abstract
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = put_params(shaped, device, "cpu")  # the default order everywhere
    laid = put_params(shaped, device, "gpu")
    kernels = sum(len(a.shape) == 4 for a in jax.tree_util.tree_leaves(abstract))

    def read_each(arrays):
        return jnp.stack([a.reshape(-1)[0] for a in jax.tree_util.tree_leaves(arrays)]).sum()

    small = {i for i, a in enumerate(jax.tree_util.tree_leaves(abstract)) if a.size <= SMALL_LEAF}

    def state(packed: str):
        trees = {name: [jnp.full((1,), i, jnp.float32) for i in range(n)] for name in _MOMENTS}
        for name in _MOMENTS[1:]:  # the weights stay one array each: the model's operands
            if packed == "small":
                large = [a for i, a in enumerate(trees[name]) if i not in small]
                trees[name] = [*large, jnp.zeros((len(small),), jnp.float32)]
            elif packed == "all":
                trees[name] = [jnp.zeros((n,), jnp.float32)]
        return trees

    def update(state):
        new = jax.tree_util.tree_map(lambda a: a + 1, state)
        return new, new["params"][0]

    def state_case(packed: str):
        trees = state(packed)
        arrays = len(jax.tree_util.tree_leaves(trees))
        what = {
            "none": "",
            "small": f", the small leaves of 3 in one array each ({len(small)})",
            "all": ", 3 of them one array each",
        }[packed]
        return measure_jax(
            ctx,
            update,
            (trees,),
            row=row,
            case=f"{preset} train state: {arrays} arrays updated, donated{what}, a call",
            donate_argnums=(0,),
            carry=True,
        )

    return [
        measure_jax(ctx, read_each, (each,), row=row, case=f"{preset} unet: {n} arrays, a call"),
        measure_jax(ctx, jnp.sum, (packed,), row=row, case=f"{preset} unet: {n} values in 1 array"),
        measure_jax(
            ctx, read_each, (tree,), row=row, case=f"{preset} unet: its tree of {n}, a call"
        ),
        measure_jax(
            ctx,
            read_each,
            (laid,),
            row=row,
            case=f"{preset} unet: its tree of {n}, {kernels} in the GPU's kernel layout, a call",
        ),
        state_case(packed="none"),
        state_case(packed="small"),
        state_case(packed="all"),
    ]


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


def _rows() -> dict[str, Row]:
    def row(name, device, help, fn, **kw):
        return name, Row(name, device, help, fn, **kw)

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
                "tiny preset text-to-image, 25 Euler steps, b1 (one program; one call per step)",
                lambda c, r: text_to_image(c, "tiny", 1, 25, "float32", r, step_by_step=True),
            ),
            # SD 1.5's sampling step on a laptop-class CPU: minutes on 2 cores, so only by name.
            row(
                "sd15-unet-cpu",
                "opt-in",
                "SD 1.5 UNet step, b1, 512px, float32 (for the CPU; minutes)",
                lambda c, r: unet_step(c, "sd15", 1, 64, "float32", r),
            ),
            # A call's cost per parameter array (the profile phase of scripts/gpu_bench.sh).
            row(
                "dispatch",
                "opt-in",
                "a call of SD 1.5's UNet parameter arrays (686), against one array",
                lambda c, r: dispatch_micro(c, r),
            ),
            # Loading SD 1.5 from a folder on a CPU: time and memory, a process per load.
            row(
                "sd15-load-cpu",
                "opt-in",
                "SD 1.5 folder load, float32, to parameters ready (fresh process; memory)",
                lambda c, r: model_load(c, "sd15", r),
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
            # images/s at a batch that fills a GPU better: XLA plans 38.5 GiB for the step on an
            # H100 (scripts/gpu_program.py sd15 32 --train --target h100).
            row(
                "sd15-train-b32",
                "gpu",
                "SD 1.5 train step, b32, 512px, cached latents",
                lambda c, r: train_step(c, "sd15", 512, 32, "bfloat16", r),
            ),
            # The float32 weights, gradients, AdamW moments and EMA of SDXL's 2.6 B UNet
            # parameters are 51 GB, and the frozen text encoders 3 GB more: too close to jax's
            # default pool (75% of an 80 GB GPU), so this row raises it as the max-batch rows do,
            # where it runs on its own.
            row(
                "sdxl-train",
                "gpu",
                "SDXL train step with remat, b4, 1024px, cached latents",
                lambda c, r: train_step(c, "sdxl", 1024, 4, "bfloat16", r, remat=True),
                mem_fraction=MEM_FRACTION,
            ),
            # Last: they grow jax's memory pool to its limit, and jax keeps what it has grown to.
            row(
                "sd15-max-batch",
                "gpu",
                "SD 1.5 text-to-image, largest batch on one device, 512px, 25 Euler steps",
                lambda c, r: max_batch_sampling(c, "sd15", 512, 25, "bfloat16", r),
                mem_fraction=MEM_FRACTION,
            ),
            row(
                "sdxl-max-batch",
                "gpu",
                "SDXL text-to-image, largest batch on one device, 1024px, 25 Euler steps",
                lambda c, r: max_batch_sampling(c, "sdxl", 1024, 25, "bfloat16", r),
                mem_fraction=MEM_FRACTION,
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
