"""Training objectives: the denoising loss of latent diffusion and the VAE's ELBO.

Denoising (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): the model sees
x_t = alpha_t x_0 + sigma_t eps and predicts eps, v = alpha_t eps - sigma_t x_0 (Salimans & Ho
2022, "Progressive Distillation"), or x_0 itself. Min-SNR-gamma weighting (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy") clips the per-timestep weight
of the equivalent x_0 loss at gamma. Offset noise (Guttenberg 2023) adds a per-channel constant
to eps so the model learns to change an image's mean brightness.

All loss math is float32, whatever the compute dtype: the squared errors of bf16 outputs summed
in bf16 lose the small differences training follows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import NoiseSchedule, snr, velocity


def diffusion_target(schedule: NoiseSchedule, prediction_type: str, x0, noise, t):
    """What the model should output for x_t built from (x0, noise) at timesteps t."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(schedule: NoiseSchedule, prediction_type: str, t, gamma: float):
    """[B] float32 per-example loss weights; all ones when gamma <= 0."""
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    s = snr(schedule, t).astype(jnp.float32)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        # min(snr, gamma) / snr, written so that snr = 0 (zero terminal SNR) gives 1, not 0/0.
        return jnp.where(s > gamma, gamma / jnp.maximum(s, 1e-20), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped  # sample (x_0) prediction


def offset(noise, key, strength: float):
    """eps + strength * a per-example, per-channel constant (noise: [B, h, w, C])."""
    if strength <= 0:
        return noise
    shift = jax.random.normal(key, (noise.shape[0], 1, 1, noise.shape[-1]), noise.dtype)
    return noise + strength * shift


def weighted_mse(prediction, target, weights):
    """Mean over examples of weight * mean squared error over each example's elements."""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))  # [B]
    return jnp.mean(weights * per_example)


def vae_loss(reconstruction, images, kl, kl_weight: float):
    """(total, reconstruction MSE, mean KL): per-pixel MSE plus kl_weight * per-example KL."""
    rec = jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - images.astype(jnp.float32)))
    kl = jnp.mean(kl)
    return rec + kl_weight * kl, rec, kl


def timestep_weights(num_timesteps: int, strategy: str, multiplier: float, portion: float):
    """Sampling probabilities of the training timesteps, as diffusers' `generate_timestep_weights`:
    uniform, with the last ("later": noisiest) or first ("earlier") `portion` of the timesteps
    `multiplier` times as likely. None for "none" (uniform sampling)."""
    if strategy == "none":
        return None
    weights = np.ones(num_timesteps)
    count = max(1, int(portion * num_timesteps))
    if strategy == "later":
        weights[-count:] *= multiplier
    elif strategy == "earlier":
        weights[:count] *= multiplier
    else:
        raise ValueError(f"unknown timestep bias strategy {strategy!r}")
    return weights / weights.sum()
