"""The train steps: pure module-level functions `train_step(state, batch, key, *, setup)`.

Bind `setup` with `functools.partial` and jit once (`jit_train_step`) with the state's
shardings and the state donated but for its frozen weights. Randomness: `fold_in(key, step)`,
then one split per use; every random draw covers the whole global batch before it is cut into
micro-batches, so an example's noise, timestep and caption dropout do not depend on the batch
layout (gradient accumulation gives the gradient of the one big batch).

Batches (host arrays, leading dimension the global batch):
  UNet task: "images" [B, H, W, 3] float32 in [-1, 1] (or "latents" [B, h, w, 2C]: the frozen
             VAE's posterior moments, cached ahead), "input_ids" [B, 77] int32; for SDXL also
             "input_ids_2" [B, 77] (the second tokenizer's) and "time_ids" [B, 6] float32
             (original size, crop top-left, target size; jaxdiff.train.data.sdxl_time_ids).
  VAE task:  "images".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxdiff.models.vae import DiagonalGaussian, scale_latents
from jaxdiff.pipelines.conditioning import encode_sd, encode_sdxl
from jaxdiff.schedules import add_noise
from jaxdiff.train import losses
from jaxdiff.train.remat import remat_blocks
from jaxdiff.train.state import (
    TrainSetup,
    TrainState,
    all_finite,
    frozen_mask,
    global_norm,
    pack,
)


def _micro_batches(tree, n: int):
    """[B, ...] -> [n, B/n, ...]: micro-batch j holds examples j, n + j, 2n + j, ...

    Interleaved rather than contiguous, so each device's contiguous block of the batch splits
    into n local pieces and the reshape moves no data between devices.
    """

    def one(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(one, tree)


def _ema(ema_params, params, step, cfg, packed: bool):
    """The new EMA of `params`; `packed`: `ema_params` is `jaxdiff.train.state.pack`ed."""
    decay = jnp.float32(cfg.ema_decay)
    if cfg.ema_warmup:
        # Early on, the EMA follows the weights more closely (as diffusers' EMAModel warmup).
        s = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
    if packed:
        params = pack(params)
    # e + (1 - decay)(p - e), not decay e + (1 - decay) p: the same in exact arithmetic, and a
    # parameter that does not move (freeze_params) keeps its EMA bit for bit.
    return jax.tree_util.tree_map(
        lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema_params, params
    )


def _all_params(params, frozen):
    return {**frozen, **params}


def conditioning(setup: TrainSetup, all_params, batch, drop=None):
    """The UNet's text conditioning of a batch: (context [B, 77, D], extra UNet inputs).

    SD 1.x / 2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
    states and the second's pooled projection (as the SDXL pipeline encodes prompts), with
    `time_ids` passed through. `drop` [B] bool replaces those captions by the empty caption.
    """
    dtype = jnp.dtype(setup.cfg.compute_dtype)
    ids = batch["input_ids"]
    if drop is not None:
        ids = jnp.where(drop[:, None], setup.empty_ids[None, :], ids)
    if not setup.sdxl:
        context = encode_sd(
            all_params["text_encoder"], setup.configs["text_encoder"], ids, dtype=dtype
        )
        if "text_encoder" not in setup.trained:
            context = jax.lax.stop_gradient(context)
        return context, {}
    ids_2 = batch["input_ids_2"]
    if drop is not None:
        ids_2 = jnp.where(drop[:, None], setup.empty_ids_2[None, :], ids_2)
    encoders = [
        (all_params[name], setup.configs[name]) for name in ("text_encoder", "text_encoder_2")
    ]
    context, pooled = jax.lax.stop_gradient(encode_sdxl(encoders, [ids, ids_2], dtype=dtype))
    return context, {"text_embeds": pooled, "time_ids": batch["time_ids"]}


def _latents(setup: TrainSetup, all_params, batch, latent_eps):
    """x_0 for the diffusion model: posterior samples of the frozen VAE, scaled. [B, h, w, C]"""
    if "latents" in batch:
        mean, logvar = jnp.split(batch["latents"].astype(jnp.float32), 2, axis=-1)
        posterior = DiagonalGaussian(mean, logvar)
    else:
        posterior = setup.modules["vae"].apply(
            {"params": all_params["vae"]}, batch["images"], method="encode"
        )
    # The reparameterized sample, with noise drawn for the global batch (see module docstring).
    z = posterior.mean + jnp.exp(0.5 * posterior.logvar) * latent_eps
    return jax.lax.stop_gradient(scale_latents(setup.configs["vae"], z))


def _unet_loss(params, frozen, micro, setup: TrainSetup):
    """The mean weighted denoising loss of one micro-batch (see jaxdiff.train.losses)."""
    cfg = setup.cfg
    all_params = _all_params(params, frozen)
    x0 = _latents(setup, all_params, micro, micro["latent_eps"])
    noise, t = micro["noise"], micro["t"]
    x_t = add_noise(setup.schedule, x0, noise, t)
    context, extra = conditioning(setup, all_params, micro, micro["drop"])
    with remat_blocks(cfg.remat):
        prediction = setup.modules["unet"].apply(
            {"params": all_params["unet"]}, x_t, t, context, **extra
        )
    target = losses.diffusion_target(setup.schedule, setup.prediction_type, x0, noise, t)
    weights = losses.min_snr_weights(setup.schedule, setup.prediction_type, t, cfg.min_snr_gamma)
    loss = losses.weighted_mse(prediction, target, weights)
    return loss, {"loss": loss}


def _vae_loss(params, frozen, micro, setup: TrainSetup):
    """Reconstruction MSE + kl_weight * KL of one micro-batch."""
    vae = setup.modules["vae"]
    variables = {"params": _all_params(params, frozen)["vae"]}
    with remat_blocks(setup.cfg.remat):
        posterior = vae.apply(variables, micro["images"], method="encode")
        z = posterior.mean + jnp.exp(0.5 * posterior.logvar) * micro["latent_eps"]
        reconstruction = vae.apply(variables, z, method="decode")
    loss, rec, kl = losses.vae_loss(
        reconstruction, micro["images"], posterior.kl(), setup.cfg.kl_weight
    )
    return loss, {"loss": loss, "reconstruction": rec, "kl": kl}


def _draws(setup: TrainSetup, batch, key):
    """Every random draw of the step, for the whole global batch at once."""
    cfg = setup.cfg
    images = batch.get("images")
    b = (images if images is not None else batch["latents"]).shape[0]
    k_latent, k_noise, k_offset, k_t, k_drop = jax.random.split(key, 5)
    if cfg.task == "vae":
        vae = setup.configs["vae"]
        f = vae.downsampling_factor
        shape = (b, images.shape[1] // f, images.shape[2] // f, vae.latent_channels)
        return {"latent_eps": jax.random.normal(k_latent, shape, jnp.float32)}
    shape = (b,) + setup.latent_shape
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    return {
        "latent_eps": jax.random.normal(k_latent, shape, jnp.float32),
        "noise": losses.offset(noise, k_offset, cfg.offset_noise),
        "t": _timesteps(k_t, b, setup),
        "drop": jax.random.uniform(k_drop, (b,)) < cfg.caption_dropout,
    }


def _timesteps(key, b: int, setup: TrainSetup):
    cfg, num = setup.cfg, setup.schedule.num_train_timesteps
    p = losses.timestep_weights(
        num, cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier, cfg.timestep_bias_portion
    )
    if p is None:
        return jax.random.randint(key, (b,), 0, num)
    return jax.random.choice(key, num, (b,), p=jnp.asarray(p, jnp.float32)).astype(jnp.int32)


def _without_frozen(grad_fn, mask):
    """grad_fn with zeros for the frozen parameters' gradients: they count in no norm, and XLA
    never computes them."""

    def wrapped(params, *args):
        value, grads = grad_fn(params, *args)
        return value, jax.tree_util.tree_map(
            lambda m, g: jnp.zeros_like(g) if m else g, mask(grads), grads
        )

    return wrapped


def train_step(state: TrainState, batch, key, *, setup: TrainSetup):
    """One optimizer update from one global batch. Returns (new state, float32 metrics)."""
    cfg = setup.cfg
    key = jax.random.fold_in(key, state.step)
    batch = {**batch, **_draws(setup, batch, key)}
    loss_fn = _vae_loss if cfg.task == "vae" else _unet_loss
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, setup=setup), has_aux=True)
    if cfg.freeze_params:
        grad_fn = _without_frozen(grad_fn, frozen_mask(tuple(cfg.freeze_params)))

    def accumulate(carry, micro):
        grads_sum, metrics_sum = carry
        (_, metrics), grads = grad_fn(state.params, state.frozen, micro)
        return (
            jax.tree_util.tree_map(jnp.add, grads_sum, grads),
            jax.tree_util.tree_map(jnp.add, metrics_sum, metrics),
        ), None

    if cfg.grad_accum == 1:
        # No loop: on XLA's CPU backend a backward pass inside a scan runs 2-4x slower
        # (docs/benchmarks.md), and one micro-batch needs no accumulation.
        (_, metrics), grads = grad_fn(state.params, state.frozen, batch)
        return _apply(state, grads, metrics, setup)

    micro = _micro_batches(batch, cfg.grad_accum)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    metric_zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype),
        jax.eval_shape(
            lambda: grad_fn(
                state.params, state.frozen, jax.tree_util.tree_map(lambda x: x[0], micro)
            )[0][1]
        ),
    )
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, metric_zeros), micro)
    # Micro-batches are equal in size: the mean of their mean gradients is the batch's.
    grads = jax.tree_util.tree_map(lambda g: g / cfg.grad_accum, grads)
    metrics = jax.tree_util.tree_map(lambda m: m / cfg.grad_accum, metrics)
    return _apply(state, grads, metrics, setup)


def _apply(state: TrainState, grads, metrics, setup: TrainSetup):
    """The optimizer update, the EMA and the step's metrics, from the batch's mean gradient."""
    cfg = setup.cfg
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=_ema(state.ema_params, params, state.step, cfg, setup.packed),
        opt_state=opt_state,
    )
    metrics = {
        **metrics,
        "grad_norm": global_norm(grads, setup.small_leaf),
        "learning_rate": jnp.asarray(setup.learning_rate(state.step), jnp.float32),
        # Whether every new weight is finite: the loop never checkpoints a state without.
        "params_finite": all_finite(params, setup.small_leaf).astype(jnp.float32),
    }
    return new_state, metrics


class TrainStepFn:
    """`jit_train_step`'s result: `step(state, batch, key) -> (new state, metrics)`.

    The jitted program (`jitted`) takes the state without its frozen weights, donated, and the
    frozen weights as an argument of their own, not donated (`arguments`). Donated with the
    state, the frozen components (SD 1.5's text encoder and VAE, 444 arrays) came back as
    results of every step; now they are arguments only, and jax passes none that the program
    does not read (the VAE's, on cached latents). The new state holds the same frozen arrays."""

    def __init__(self, jitted):
        self.jitted = jitted

    @staticmethod
    def arguments(state: TrainState, batch, key) -> tuple:
        """The jitted program's arguments for `step(state, batch, key)`."""
        return state.replace(frozen=None), state.frozen, batch, key

    def __call__(self, state: TrainState, batch, key):
        new_state, metrics = self.jitted(*self.arguments(state, batch, key))
        return new_state.replace(frozen=state.frozen), metrics

    def trace(self, state, batch, key):
        return self.jitted.trace(*self.arguments(state, batch, key))

    def lower(self, state, batch, key):
        return self.jitted.lower(*self.arguments(state, batch, key))


def jit_train_step(setup: TrainSetup, state_shardings, mesh, step_fn=None) -> TrainStepFn:
    """`train_step` bound to `setup`, jitted with explicit shardings and the state donated but
    for its frozen weights (`TrainStepFn`).

    step_fn: a stand-in for `train_step` with its signature (tests wrap it to count traces).
    """
    from jaxdiff.sharding import batch_sharding, replicated

    bound = functools.partial(step_fn or train_step, setup=setup)

    def train_step_(state, frozen, batch, key):  # jax names the program `jit_train_step`
        new_state, metrics = bound(state.replace(frozen=frozen), batch, key)
        return new_state.replace(frozen=None), metrics

    train_step_.__name__ = "train_step"
    trained = state_shardings.replace(frozen=None)
    return TrainStepFn(
        jax.jit(
            train_step_,
            in_shardings=(trained, state_shardings.frozen, batch_sharding(mesh), replicated(mesh)),
            out_shardings=(trained, replicated(mesh)),
            donate_argnums=(0,),
        )
    )
