"""Text-to-image, image-to-image and inpainting for SD 1.x, 2.x and SDXL as one jitted function.

`denoise(params, inputs, plan, static)` is pure: it encodes the prompts, draws each image's noise
from its own seed, runs the sampler's `lax.scan` with classifier-free guidance around the UNet,
and decodes with the VAE. Everything that varies between calls without changing shapes (seeds,
guidance scale, prompts, images, strength's noise) is an array argument, so only the batch, the
size, the step count and the sampler recompile. With a progress bar, the same computation runs
as three programs instead (`denoise_begin`, `denoise_steps` called once per sampler step,
`denoise_finish`), so that the bar advances between steps without a host callback inside a
program (jax never caches a program with one). The host-side `StableDiffusion` object tokenizes,
validates, places the batch on every device (`jax.sharding`) and turns arrays into files.

Image i of a batch depends only on its seed, `seed + i` (A1111's convention), never on the batch
size or the device count: re-running one image alone with `seed + i` gives it again.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers
from jaxdiff.convert.diffusers import PipelineWeights, load_pipeline
from jaxdiff.models.build import logical_axes, module_for
from jaxdiff.models.clip_text import CLIPTextConfig
from jaxdiff.models.unet import CONTEXT_KV, UNetConfig, context_kv
from jaxdiff.models.vae import VAEConfig, scale_latents, unscale_latents
from jaxdiff.pipelines.conditioning import encode_sd, encode_sdxl, sdxl_time_ids
from jaxdiff.schedules import ScheduleConfig
from jaxdiff.sharding import (
    batch_sharding,
    make_mesh,
    param_shardings,
    put_params,
    replicated,
)
from jaxdiff.tokenizer import tokenize

# The sampler each diffusers scheduler class stands for: a folder's own scheduler is the default.
SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "plms",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}


class PipelineInputError(ValueError):
    """Bad input to a pipeline (a size, a strength, a mask); the message says which."""


MAX_SEED = 2**32 - 1  # seeds are uint32 (image i of a batch: seed + i)


def check_settings(*, flags: bool = False, **settings) -> None:
    """Raises PipelineInputError for a sampling setting out of its range; settings that are
    None or not given are not checked:

    - `steps`, `batch`, `width`, `height`: >= 1;
    - `guidance`, `guidance_rescale`, `eta`: finite, the last two >= 0; `clip_skip` >= 0;
    - `seed` (with `batch`: every image's seed + i a uint32, none wrapped onto another image's)
      and interpolation's `to_seed`: in [0, 2**32 - 1].

    With `flags`, names are written as the command's flags (`--clip-skip`): the `jaxdiff`
    command checks them before it loads a model."""

    def fail(key, rule):
        name = "--" + key.replace("_", "-") if flags else key
        raise PipelineInputError(f"{name} must be {rule}, got {settings[key]}")

    given = {k: v for k, v in settings.items() if v is not None}
    for key in ("steps", "batch", "width", "height"):
        if key in given and given[key] < 1:
            fail(key, ">= 1")
    for key in ("guidance", "guidance_rescale", "eta"):
        if key in given and not math.isfinite(given[key]):
            fail(key, "a finite number")
    for key in ("guidance_rescale", "eta", "clip_skip"):
        if key in given and given[key] < 0:
            fail(key, ">= 0")
    for key, images in (("seed", given.get("batch", 1)), ("to_seed", 1)):
        last = MAX_SEED - images + 1
        if key in given and not 0 <= given[key] <= last:
            fail(key, f"in [0, {last}]" + (f" for a batch of {images}" if images > 1 else ""))


# ----------------------------------------------------------------------------- the jitted core


@dataclasses.dataclass(frozen=True)
class Static:
    """What selects the computation (and the compiled program) beyond array shapes."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None
    text_encoder_2: CLIPTextConfig | None
    mode: str  # "text2img", "img2img", "inpaint" or "refine" (continue from given latents)
    guidance: bool  # classifier-free guidance: the UNet sees [negative; positive]
    zero_negative: bool  # SDXL's force_zeros_for_empty_prompt: zero negative embeddings
    clip_skip: int | None
    dtype: str  # compute dtype of every model
    latent_shape: tuple[int, int, int] = (0, 0, 0)  # [h, w, C] of the latents
    from_noise: bool = True  # start from pure noise (text2img, inpainting at strength 1)
    run_sampler: bool = True  # False when img2img's strength leaves no step (strength 0)
    decode: bool = True  # False returns latents (an SDXL base stage before the refiner)

    @property
    def sdxl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"


def encode_prompts(params, static: Static, ids, ids_2=None):
    """Token ids -> (context [B, T, D], pooled [B, P] or None) in the compute dtype."""
    dtype = jnp.dtype(static.dtype)
    if static.sdxl:
        encoders = [
            None if static.text_encoder is None else (params["text_encoder"], static.text_encoder),
            (params["text_encoder_2"], static.text_encoder_2),
        ]
        return encode_sdxl(encoders, [ids, ids_2], clip_skip=static.clip_skip, dtype=dtype)
    ctx = encode_sd(
        params["text_encoder"], static.text_encoder, ids, clip_skip=static.clip_skip, dtype=dtype
    )
    return ctx, None


def _image_keys(seeds):
    """One key per image from its own seed, split into (initial noise, VAE sampling, sampler)."""
    keys = jax.vmap(jax.random.key)(seeds)
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    return split[:, 0], split[:, 1], split[:, 2]


def _normal_per_image(keys, shape, dtype=jnp.float32):
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def _encode_images(params, static: Static, images, keys):
    """Pixels in [-1, 1] -> the diffusion model's latents, sampled from the posterior per image."""
    vae = module_for(static.vae, dtype=jnp.dtype(static.dtype))
    posterior = vae.apply({"params": params["vae"]}, images, method=vae.encode)
    eps = _normal_per_image(keys, posterior.mean.shape[1:])
    latents = posterior.mean + jnp.exp(0.5 * posterior.logvar) * eps
    return scale_latents(static.vae, latents)


def denoise_begin(params, inputs: dict, plan, static: Static):
    """Everything before the first sampler step: (the sampler's carry, what the steps read).

    inputs (B = batch):
        seeds [B] uint32; ids [B, T] and ids_2 (SDXL) int32, or context [B, T, D] / pooled [B, P]
        given directly (latent interpolation); neg_ids / neg_ids_2 or neg_context / neg_pooled
        with guidance; time_ids / neg_time_ids [B, 5 or 6] (SDXL); guidance, guidance_rescale,
        eta scalars; latents [B, h, w, C] optional initial noise (N(0, I), before the schedule's
        scaling); image [B, H, W, 3] in [-1, 1] (img2img, inpaint); mask [B, H, W, 1] in {0, 1},
        1 = repaint (inpaint).
    """
    init_keys, enc_keys, step_keys = _image_keys(inputs["seeds"])

    if "context" in inputs:
        ctx, pooled = inputs["context"], inputs.get("pooled")
    else:
        ctx, pooled = encode_prompts(params, static, inputs["ids"], inputs.get("ids_2"))
    time_ids = inputs.get("time_ids")
    if static.guidance:
        if static.zero_negative:
            neg_ctx = jnp.zeros_like(ctx)
            neg_pooled = None if pooled is None else jnp.zeros_like(pooled)
        elif "neg_context" in inputs:
            neg_ctx, neg_pooled = inputs["neg_context"], inputs.get("neg_pooled")
        else:
            neg_ctx, neg_pooled = encode_prompts(
                params, static, inputs["neg_ids"], inputs.get("neg_ids_2")
            )
        ctx = jnp.concatenate([neg_ctx, ctx])
        if pooled is not None:
            pooled = jnp.concatenate([neg_pooled, pooled])
        if time_ids is not None:
            time_ids = jnp.concatenate([inputs["neg_time_ids"], time_ids])

    latent_shape = static.latent_shape
    if "latents" in inputs:
        noise = inputs["latents"].astype(jnp.float32)
    else:
        noise = _normal_per_image(init_keys, latent_shape)

    image_latents = mask_latents = masked_image_latents = None
    if static.mode in ("img2img", "inpaint"):
        image = inputs["image"].astype(jnp.float32)
        if static.mode == "inpaint":
            mask = inputs["mask"].astype(jnp.float32)
            # diffusers: F.interpolate(mask, size=latent size), nearest neighbour.
            hh, ww = mask.shape[1:3]
            rows = (jnp.arange(latent_shape[0]) * hh) // latent_shape[0]
            cols = (jnp.arange(latent_shape[1]) * ww) // latent_shape[1]
            mask_latents = mask[:, rows][:, :, cols]
            if static.unet.in_channels == 9:
                masked_image_latents = _encode_images(
                    params, static, image * (mask < 0.5), enc_keys
                )
        image_latents = _encode_images(params, static, image, enc_keys)

    if not static.run_sampler:
        x_T = image_latents
    elif static.mode == "refine":  # an SDXL refiner stage continues the base's latents as they are
        x_T = inputs["init_latents"].astype(jnp.float32)
    elif static.from_noise:
        x_T = samplers.init_noise_sigma(plan) * noise
    else:
        x_T = samplers.img2img_latents(plan, image_latents, noise)
    cond = dict(
        ctx=ctx,
        pooled=pooled,
        time_ids=time_ids,
        guidance=inputs["guidance"],
        guidance_rescale=inputs["guidance_rescale"],
        eta=inputs["eta"],
        step_keys=step_keys,
        noise=noise,
        image_latents=image_latents,
        mask_latents=mask_latents,
        masked_image_latents=masked_image_latents,
    )
    return samplers.init_carry(plan, x_T), cond


def denoise_steps(params, cond: dict, carry, plan, static: Static, start, stop):
    """Sampler steps `start` to `stop - 1` with classifier-free guidance around the UNet.

    `start` and `stop` may be traced (one program for any range of steps: the chunks of a host
    loop that shows progress) or Python ints (one `lax.scan`)."""
    dtype = jnp.dtype(static.dtype)
    unet = module_for(static.unet, dtype=dtype)
    ctx, pooled, time_ids = cond["ctx"], cond["pooled"], cond["time_ids"]
    mask_latents, masked_image_latents = cond["mask_latents"], cond["masked_image_latents"]
    # The context's cross-attention keys and values, once for every step (`context_kv`).
    variables = {"params": params["unet"], CONTEXT_KV: context_kv(params["unet"], ctx, dtype)}

    def model_fn(x, t):  # x: [B, h, w, C] scaled as diffusers feeds its UNet
        if masked_image_latents is not None:  # 9-channel inpainting UNet
            x = jnp.concatenate(
                [x, mask_latents.astype(x.dtype), masked_image_latents.astype(x.dtype)], -1
            )
        if static.guidance:
            x = jnp.concatenate([x, x])
        extra = {}
        if static.sdxl:
            extra = dict(text_embeds=pooled, time_ids=time_ids)
        out = unet.apply(variables, x, t, ctx, **extra).astype(jnp.float32)
        if not static.guidance:
            return out
        uncond, cond_out = jnp.split(out, 2)
        guided = uncond + cond["guidance"] * (cond_out - uncond)
        # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 16.
        axes = tuple(range(1, guided.ndim))
        std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
        std_guided = jnp.std(guided, axis=axes, keepdims=True)
        rescaled = guided * (std_cond / std_guided)
        r = cond["guidance_rescale"]
        return r * rescaled + (1.0 - r) * guided

    post_step = None
    if static.mode == "inpaint" and static.unet.in_channels != 9:

        def post_step(x, index):
            # Ordinary UNets inpaint by putting the known region back, re-noised to the next
            # step's level, after every step (diffusers' StableDiffusionInpaintPipeline).
            known = samplers.renoise(plan, index, cond["image_latents"], cond["noise"])
            return (1.0 - mask_latents) * known + mask_latents * x

    return samplers.run_steps(
        model_fn,
        carry,
        plan,
        start,
        stop,
        key=cond["step_keys"],
        model_dtype=jnp.float32,
        eta=cond["eta"] if plan.sampler == "ddim" else 0.0,
        post_step=post_step,
    )


def denoise_finish(params, carry, static: Static):
    """The latents after the last step -> images [B, H, W, 3] float32 in [0, 1], or the latents
    themselves with `static.decode` False."""
    latents = carry.latents
    if not static.decode:
        return latents
    dtype = jnp.dtype(static.dtype)
    vae = module_for(static.vae, dtype=dtype)
    images = vae.apply(
        {"params": params["vae"]}, unscale_latents(static.vae, latents), method=vae.decode
    )
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def denoise(params, inputs: dict, plan, static: Static):
    """The whole generation as one pure function (`denoise_begin`, every step in one
    `lax.scan`, `denoise_finish`); see the module docstring, and `denoise_begin` for `inputs`.
    Returns images [B, H, W, 3] float32 in [0, 1], or latents with `static.decode` False."""
    carry, cond = denoise_begin(params, inputs, plan, static)
    if static.run_sampler:
        carry = denoise_steps(params, cond, carry, plan, static, 0, plan.num_steps)
    return denoise_finish(params, carry, static)


_denoise_jit = jax.jit(denoise, static_argnames=("static",))
# The same computation as three programs for a host loop that shows progress between steps. A
# program with a host callback inside (jax.debug.callback) never enters jax's persistent
# compilation cache: it would be compiled again on every run.
_begin_jit = jax.jit(denoise_begin, static_argnames=("static",))
_steps_jit = jax.jit(denoise_steps, static_argnames=("static",))
_finish_jit = jax.jit(denoise_finish, static_argnames=("static",))
_encode_jit = jax.jit(encode_prompts, static_argnums=(1,))


@jax.jit
def _initial_noise_impl(seeds, zeros):
    init_keys, _, _ = _image_keys(seeds)
    return _normal_per_image(init_keys, zeros.shape)


def _initial_noise(seeds, shape):
    """The N(0, I) initial latents `denoise` draws for these seeds: [len(seeds), *shape]."""
    return _initial_noise_impl(seeds, np.zeros(shape, np.float32))


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between two arrays at each t in [0, 1]: [len(t), *a.shape].

    Gaussian noise lives near a sphere; a straight line between two samples passes through
    lower-norm points that the model never saw (Shoemake 1985; White 2016, "Sampling
    Generative Networks").
    """
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    t = np.asarray(t, np.float64)[:, None]
    if theta < 1e-4:  # nearly parallel: the straight line is the arc
        out = (1 - t) * a64 + t * b64
    else:
        out = (np.sin((1 - t) * theta) * a64 + np.sin(t * theta) * b64) / np.sin(theta)
    return out.reshape((len(t), *a.shape)).astype(np.float32)


# ----------------------------------------------------------------------------- the host side


@dataclasses.dataclass
class GenerationResult:
    images: np.ndarray  # [B, H, W, 3] float32 in [0, 1]
    parameters: list[dict]  # per image: prompt, negative prompt, steps, sampler, seed, ...

    def pil(self) -> list:
        from PIL import Image

        from jaxdiff.pipelines.images import to_uint8

        return [Image.fromarray(im) for im in to_uint8(self.images)]


class StableDiffusion:
    """A loaded SD 1.x / 2.x / SDXL model, its parameters placed on every local device.

    Parameters are replicated over a one-axis ("data") mesh of all devices and batches are split
    over it; `shard_params=True` shards the parameters too (FSDP-style), for models that do not
    fit one device. `params` holds them, on the devices; `weights` keeps what else was loaded
    (configs, scheduler config, tokenizers, model index, path) but not the host copy of the
    parameters, which would hold a second copy of the model in host memory (on the CPU, twice
    the model's size) for as long as the pipeline lives.
    """

    def __init__(
        self,
        weights: PipelineWeights,
        *,
        dtype="float32",
        shard_params: bool = False,
        name=None,
        devices=None,
    ):
        self.weights = dataclasses.replace(weights, params={})
        self.configs = weights.configs
        self.dtype = jnp.dtype(dtype).name
        self.name = name or (weights.path.name if weights.path else "jaxdiff")
        self.schedule = ScheduleConfig.from_diffusers(weights.scheduler_config or {})
        self.default_sampler = SAMPLER_OF_SCHEDULER.get(
            weights.scheduler_config.get("_class_name"), "euler"
        )
        # Batches split over both mesh axes; parameters replicated, or sharded over "fsdp".
        devices = devices or jax.devices()
        fsdp = len(devices) if shard_params else 1
        self.mesh = make_mesh(data=-1, fsdp=fsdp, devices=devices)
        self.params = _place_params(weights, self.mesh, shard_params, self.dtype)
        for name in ("tokenizer", "tokenizer_2"):
            if (
                name.replace("tokenizer", "text_encoder") in self.configs
                and name not in weights.tokenizers
            ):
                raise PipelineInputError(f"{weights.path}: no {name}/ folder for its text encoder")
        self.tokenizers = weights.tokenizers

    # ------------------------------------------------------------------ properties

    @property
    def family(self) -> str:
        return self.weights.family

    @property
    def factor(self) -> int:
        return self.configs["vae"].downsampling_factor

    @property
    def native_size(self) -> int:
        return self.configs["unet"].sample_size * self.factor

    @property
    def is_refiner(self) -> bool:
        return "text_encoder" not in self.configs and "text_encoder_2" in self.configs

    # ------------------------------------------------------------------ public API

    def generate(
        self, prompt, *, refiner=None, refiner_switch: float = 0.8, **kw
    ) -> GenerationResult:
        """Text-to-image. See `_run` for the options.

        refiner: a second `StableDiffusion` (an SDXL refiner) that finishes the last
            `1 - refiner_switch` of the schedule from this model's latents (diffusers'
            `denoising_end` / `denoising_start`).
        """
        if refiner is None:
            return self._run("text2img", prompt, **kw)
        if not 0.0 < refiner_switch < 1.0:
            raise PipelineInputError(f"refiner switch must be in (0, 1), got {refiner_switch}")
        base = self._run("text2img", prompt, denoising_end=refiner_switch, output="latents", **kw)
        kw = {k: v for k, v in kw.items() if k not in ("latents", "width", "height")}
        result = refiner._run(
            "refine", prompt, init_latents=base.images, denoising_start=refiner_switch, **kw
        )
        for p in result.parameters:
            p["model"] = f"{self.name} + {refiner.name} from {refiner_switch}"
        return result

    def img2img(self, prompt, image, *, strength: float = 0.8, **kw) -> GenerationResult:
        """Image-to-image: `image` a path, a PIL image, uint8 [H, W, 3] or float [H, W, 3] in
        [0, 1]; `strength` in [0, 1]."""
        return self._run("img2img", prompt, image=image, strength=strength, **kw)

    def inpaint(self, prompt, image, mask, *, strength: float = 1.0, **kw) -> GenerationResult:
        """Repaint where `mask` (a path, a PIL image, or [H, W] or [H, W, 1] of floats in [0,
        1], uint8 or bool; white = repaint) is set; `image` as for `img2img`."""
        return self._run("inpaint", prompt, image=image, mask=mask, strength=strength, **kw)

    def outpaint(self, prompt, image, extend, **kw) -> GenerationResult:
        """Extend the canvas by (left, top, right, bottom) pixels and paint the new area."""
        from jaxdiff.pipelines.images import as_image

        image = as_image(image)
        canvas, mask = extend_canvas(image, extend, self.factor)
        return self._run("inpaint", prompt, image=canvas, mask=mask, strength=1.0, **kw)

    def interpolate(
        self, prompt, *, to_prompt=None, seed: int = 0, to_seed=None, frames: int = 8, **kw
    ) -> GenerationResult:
        """Frames between (prompt, seed) and (to_prompt, to_seed): both the initial noise and the
        prompt embeddings are interpolated spherically. Frame 0 is `generate(prompt, seed=seed)`."""
        if frames < 2:
            raise PipelineInputError(f"frames must be >= 2, got {frames}")
        to_seed = seed + 1 if to_seed is None else to_seed
        check_settings(seed=seed, to_seed=to_seed, width=kw.get("width"), height=kw.get("height"))
        to_prompt = prompt if to_prompt is None else to_prompt
        f = self.factor
        height = kw.pop("height", None) or self.native_size
        width = kw.pop("width", None) or self.native_size
        kw.pop("latents", None)
        if height % f or width % f:
            raise PipelineInputError(
                f"size {width}x{height} is not a multiple of the model's factor {f}"
            )
        shape = (height // f, width // f, self.configs["vae"].latent_channels)
        ends = np.asarray(_initial_noise(np.array([seed, to_seed], np.uint32), shape))
        t = np.linspace(0.0, 1.0, frames)
        noise = slerp(ends[0], ends[1], t)  # [F, h, w, C]
        ids = {}
        self._tokenize_into(ids, "", [prompt, to_prompt])
        static = self._static(
            "text2img", guidance=False, zero_negative=False, clip_skip=kw.get("clip_skip")
        )
        ctx, pooled = _encode_jit(self.params, static, ids["ids"], ids.get("ids_2"))
        context = {"context": slerp(np.asarray(ctx[0]), np.asarray(ctx[1]), t)}
        if pooled is not None:
            context["pooled"] = slerp(np.asarray(pooled[0]), np.asarray(pooled[1]), t)
        result = self._run(
            "text2img",
            [prompt] * frames,
            seed=seed,
            width=width,
            height=height,
            latents=np.transpose(noise, (0, 3, 1, 2)),
            context=context,
            **kw,
        )
        for i, p in enumerate(result.parameters):
            p["prompt"] = prompt if prompt == to_prompt else f"{prompt} -> {to_prompt}"
            p["interpolation"] = f"frame {i + 1}/{frames}, seeds {seed} -> {to_seed}, t={t[i]:.3f}"
        return result

    def lower(self, prompt, *, mode: str = "text2img", **kw) -> jax.stages.Lowered:
        """The one jitted program that `generate` (mode "text2img"), `img2img` or `inpaint` with
        these arguments would run, lowered but neither compiled nor run. `.compile()` then gives
        XLA's `memory_analysis()` (the bytes the call needs on one device, e.g. to find the
        largest batch that fits) and `cost_analysis()`, before that memory is allocated."""
        if mode not in ("text2img", "img2img", "inpaint"):
            raise PipelineInputError(f"mode must be text2img, img2img or inpaint, got {mode!r}")
        return self._run(mode, prompt, lower_only=True, **kw)

    def _static(self, mode, **kw) -> Static:
        return Static(
            unet=self.configs["unet"],
            vae=self.configs["vae"],
            text_encoder=self.configs.get("text_encoder"),
            text_encoder_2=self.configs.get("text_encoder_2"),
            mode=mode,
            dtype=self.dtype,
            **kw,
        )

    # ------------------------------------------------------------------ the work

    def _run(
        self,
        mode,
        prompt,
        *,
        negative_prompt=None,
        steps: int = 50,
        guidance: float | None = None,
        sampler: str | None = None,
        sigmas: str | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        latents=None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        eta: float = 0.0,
        image=None,
        mask=None,
        strength: float | None = None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        progress: bool = False,
        context=None,
        init_latents=None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: str = "images",
        lower_only: bool = False,
    ) -> GenerationResult:
        from jaxdiff.pipelines.images import as_image, binarize_mask

        if prompt is None or isinstance(prompt, str):
            prompts = [prompt or ""] * batch
        else:
            prompts = list(prompt)
        b = len(prompts)
        check_settings(
            steps=steps,
            batch=b,
            width=width,
            height=height,
            seed=seed,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            eta=eta,
            clip_skip=clip_skip,
        )
        guidance = (5.0 if self.family == "sdxl" else 7.5) if guidance is None else float(guidance)
        sampler = sampler or self.default_sampler
        if sampler not in samplers.SAMPLERS:
            raise PipelineInputError(
                f"unknown sampler {sampler!r}; valid: {', '.join(samplers.SAMPLERS)}"
            )

        inputs: dict[str, Any] = {}
        if image is not None:
            image = as_image(image)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise PipelineInputError(f"image must be [H, W, 3], got shape {image.shape}")
            height, width = image.shape[:2]
        f = self.factor
        if init_latents is not None:  # a refiner stage: the size follows the latents
            init_latents = np.asarray(init_latents, np.float32)
            if init_latents.shape[0] != b:
                raise PipelineInputError(f"{init_latents.shape[0]} latents for {b} prompts")
            height, width = init_latents.shape[1] * f, init_latents.shape[2] * f
            inputs["init_latents"] = init_latents
        height = height or self.native_size
        width = width or self.native_size
        if height % f or width % f:
            raise PipelineInputError(
                f"size {width}x{height} is not a multiple of the model's factor {f}"
            )
        if image is not None:
            inputs["image"] = np.broadcast_to(image * 2.0 - 1.0, (b, *image.shape)).astype(
                np.float32
            )
        if mask is not None:
            mask = as_image(mask, mode="L", what="mask")
            if mask.shape[:2] != (height, width):
                raise PipelineInputError(
                    f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}: they must match"
                )
            inputs["mask"] = np.broadcast_to(
                binarize_mask(mask[..., :1]), (b, height, width, 1)
            ).astype(np.float32)

        latent_shape = (height // f, width // f, self.configs["vae"].latent_channels)
        if latents is not None:
            if isinstance(latents, (str, Path)):
                try:
                    with open(latents, "rb") as fh:  # else numpy reports a pickle it refused
                        if fh.read(6) != b"\x93NUMPY":
                            raise ValueError("no NumPy .npy header; write one with numpy.save")
                    latents = np.load(latents)  # never unpickles (allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise PipelineInputError(f"{latents}: not a readable .npy file ({e})") from None
            latents = np.asarray(latents)
            expected = (b, latent_shape[2], latent_shape[0], latent_shape[1])
            if latents.shape != expected:
                raise PipelineInputError(
                    f"latents have shape {latents.shape}, expected {expected} (NCHW)"
                )
            inputs["latents"] = np.transpose(latents, (0, 2, 3, 1)).astype(np.float32)

        run_sampler = True
        plan_strength = None
        if mode == "img2img" or (mode == "inpaint" and strength is not None and strength < 1.0):
            if strength is None or not 0.0 <= strength <= 1.0:
                raise PipelineInputError(f"strength must be in [0, 1], got {strength}")
            plan_strength = strength
            if int(steps * strength) == 0:
                run_sampler = False
        if mode == "inpaint" and (strength is None or not 0.0 <= strength <= 1.0):
            raise PipelineInputError(f"strength must be in [0, 1], got {strength}")
        try:
            plan = samplers.make_plan(
                self.schedule,
                sampler,
                steps,
                sigmas=sigmas,
                strength=plan_strength if run_sampler else None,
                denoising_start=denoising_start,
                denoising_end=denoising_end,
            )
        except (ValueError, NotImplementedError) as e:
            raise PipelineInputError(str(e)) from None

        do_cfg = guidance > 1.0 and self.configs["unet"].time_cond_proj_dim is None
        zero_negative = bool(
            self.family == "sdxl"
            and negative_prompt is None
            and self.weights.model_index.get(
                "force_zeros_for_empty_prompt", self.family == "sdxl" and not self.is_refiner
            )
        )
        negs = (
            [negative_prompt or ""] * b
            if isinstance(negative_prompt, (str, type(None)))
            else list(negative_prompt)
        )
        if len(negs) != b:
            raise PipelineInputError(f"{len(negs)} negative prompts for {b} prompts")

        if context is not None:  # embeddings given (interpolation)
            inputs.update(context)
        else:
            self._tokenize_into(inputs, "", prompts)
        if do_cfg and not zero_negative and "neg_context" not in inputs:
            self._tokenize_into(inputs, "neg_", negs)
        if self.family == "sdxl":
            osize = tuple(original_size or (height, width))
            tsize = tuple(target_size or (height, width))
            crops = tuple(crops_coords_top_left)
            if self.is_refiner:
                inputs["time_ids"] = sdxl_time_ids(
                    b,
                    original_size=osize,
                    crops_coords_top_left=crops,
                    aesthetic_score=aesthetic_score,
                )
                inputs["neg_time_ids"] = sdxl_time_ids(
                    b,
                    original_size=osize,
                    crops_coords_top_left=crops,
                    aesthetic_score=negative_aesthetic_score,
                )
            else:
                inputs["time_ids"] = sdxl_time_ids(
                    b, original_size=osize, crops_coords_top_left=crops, target_size=tsize
                )
                inputs["neg_time_ids"] = inputs["time_ids"]
        inputs["seeds"] = (np.uint64(seed) + np.arange(b, dtype=np.uint64)).astype(np.uint32)
        inputs["guidance"] = np.float32(guidance)
        inputs["guidance_rescale"] = np.float32(guidance_rescale)
        inputs["eta"] = np.float32(eta)

        static = self._static(
            mode,
            guidance=do_cfg,
            zero_negative=zero_negative,
            clip_skip=clip_skip or None,
            latent_shape=latent_shape,
            from_noise=mode == "text2img" or (mode == "inpaint" and strength >= 1.0),
            run_sampler=run_sampler,
            decode=output == "images",
        )
        if lower_only:
            return self._call(inputs, plan, static, b, progress, lower_only=True)
        images = self._call(inputs, plan, static, b, progress)
        params = [
            dict(
                prompt=prompts[i],
                negative_prompt=negs[i] if negative_prompt is not None else None,
                steps=steps,
                sampler=sampler,
                sigmas=sigmas or "default",
                guidance=guidance,
                seed=int(inputs["seeds"][i]),
                size=f"{width}x{height}",
                model=self.name,
                strength=strength if mode != "text2img" else None,
            )
            for i in range(b)
        ]
        return GenerationResult(images, params)

    def _tokenize_into(self, inputs, prefix, prompts):
        if "tokenizer" in self.tokenizers and "text_encoder" in self.configs:
            inputs[prefix + "ids"] = tokenize(self.tokenizers["tokenizer"], prompts)
        if "text_encoder_2" in self.configs:
            inputs[prefix + "ids_2"] = tokenize(self.tokenizers["tokenizer_2"], prompts)
            if "text_encoder" not in self.configs:  # the refiner: its only encoder is the second
                inputs[prefix + "ids"] = inputs[prefix + "ids_2"]

    def _call(self, inputs, plan, static, b, progress, lower_only=False):
        """Pad the batch to a multiple of the device count, shard it, run, un-pad (or, with
        `lower_only`, return the lowered program instead of running it)."""
        n = self.mesh.devices.size
        padded = -(-b // n) * n
        batched, scalars = {}, {}
        for k, v in inputs.items():
            v = np.asarray(v)
            if v.ndim >= 1 and v.shape[0] == b:
                if k == "seeds":
                    extra = (np.uint64(v[-1]) + 1 + np.arange(padded - b, dtype=np.uint64)).astype(
                        np.uint32
                    )
                else:
                    extra = np.repeat(v[-1:], padded - b, axis=0)
                batched[k] = np.concatenate([v, extra]) if padded > b else v
            else:
                scalars[k] = v
        data, everywhere = batch_sharding(self.mesh), replicated(self.mesh)
        args = {k: jax.device_put(v, data) for k, v in batched.items()}
        args.update({k: jax.device_put(v, everywhere) for k, v in scalars.items()})
        plan = jax.device_put(plan, everywhere)
        if lower_only:
            return _denoise_jit.lower(self.params, args, plan, static)
        if progress:
            out = self._run_with_progress(args, plan, static)
        else:
            out = _denoise_jit(self.params, args, plan, static)
        return np.asarray(jax.device_get(out))[:b]

    def _run_with_progress(self, args, plan, static):
        """`denoise` as `denoise_begin`, one `denoise_steps` call per sampler step and
        `denoise_finish`, with a progress bar that counts finished steps. Each step is queued
        before the previous one is waited for, so the device need not wait for the host."""
        from jaxdiff.pipelines.progress import bar

        carry, cond = _begin_jit(self.params, args, plan, static)
        if static.run_sampler:
            unet = {"unet": self.params["unet"]}  # what the steps read: fewer leaves to pass
            with bar(total=plan.num_steps) as advance:
                previous = None
                for i in range(plan.num_steps):
                    carry = _steps_jit(
                        unet, cond, carry, plan, static, np.int32(i), np.int32(i + 1)
                    )
                    if previous is not None:
                        previous.block_until_ready()
                        advance()
                    previous = carry.latents
                previous.block_until_ready()
                advance()
        return _finish_jit(self.params, carry, static)


def _place_params(weights: PipelineWeights, mesh, shard: bool, dtype: str = "float32"):
    """Replicated on every device, or sharded by the models' logical axis rules (FSDP); each
    convolution kernel in the memory order the devices' convolutions read (`put_params`).

    With a 16-bit compute dtype the parameters are stored in it too, as diffusers' float16
    pipelines do: half the memory, and no cast of every weight on every call. The modules still
    compute norms, softmax and the VAE's output in float32 (from the 16-bit values).
    """
    params = weights.params
    if jnp.dtype(dtype).itemsize < 4:
        params = jax.tree_util.tree_map(
            lambda p: (
                p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype != dtype else p
            ),
            params,
        )
    if not shard:
        return put_params(params, replicated(mesh))
    shardings = {
        name: param_shardings(params[name], logical_axes(config), mesh)
        for name, config in weights.configs.items()
    }
    return put_params(params, shardings)


def extend_canvas(image: np.ndarray, extend, factor: int):
    """Outpainting: a larger canvas (new area filled with the nearest edge pixels) and its mask."""
    left, top, right, bottom = (int(v) for v in extend)
    if min(left, top, right, bottom) < 0 or left + top + right + bottom == 0:
        raise PipelineInputError(
            f"--extend needs four non-negative pixel counts, not all zero: {extend}"
        )
    h, w = image.shape[:2]
    new_h, new_w = h + top + bottom, w + left + right
    if new_h % factor or new_w % factor:
        raise PipelineInputError(
            f"the extended canvas {new_w}x{new_h} is not a multiple of the model's factor {factor}"
        )
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones((new_h, new_w, 1), np.float32)
    mask[top : top + h, left : left + w] = 0.0
    return canvas, mask


def load(path=None, *, dtype="float32", variant=None, shard_params=False) -> StableDiffusion:
    """Load a diffusers-format folder (SD 1.x, 2.x, SDXL); None loads the bundled model."""
    if path is None:
        from jaxdiff.pipelines.bundled import bundled_model_dir

        path = bundled_model_dir()
    # A 16-bit pipeline stores its parameters in that dtype (`_place_params`): the loader reads
    # them into it directly, not into float32 first.
    param_dtype = jnp.dtype(dtype) if jnp.dtype(dtype).itemsize < 4 else np.float32
    weights = load_pipeline(path, variant=variant, param_dtype=param_dtype)
    return StableDiffusion(weights, dtype=dtype, shard_params=shard_params, name=Path(path).name)


def generate_fn_for_model(
    path, *, steps: int = 30, guidance: float | None = None, sampler=None, seed: int = 0
):
    """A `prompts -> uint8 images [N, H, W, 3]` function over a model folder (for evaluators)."""
    from jaxdiff.pipelines.images import to_uint8

    pipe = load(path)

    def generate(prompts):
        result = pipe.generate(
            list(prompts), steps=steps, guidance=guidance, sampler=sampler, seed=seed
        )
        return to_uint8(result.images)

    return generate
