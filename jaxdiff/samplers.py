"""Samplers: stateless step functions, a registry, and one `lax.scan`.

A sampler is a step function `step(ctx, carry, c, noise) -> carry`; `sample` runs it over the
per-step arrays of a `SamplingPlan` with a single `jax.lax.scan` whose carry is the named
`SamplerCarry`. Multistep histories (PLMS, LMS, DPM-Solver++ 2M, UniPC) live in fixed-size arrays
in that carry; two-evaluation samplers (Heun, DPM2, DPM++ 2S, DPM++ SDE) do both model calls in
one scan step. The plan is built once on the host by `make_plan` and reproduces, step for step,
the trajectory of the diffusers PyTorch scheduler named in each `SamplerSpec.reference` (given
the same model and the same noise); only the step count changes array shapes, so a jitted
sampler is not retraced when the seed, the guidance scale or the conditioning changes.

Model contract: `model_fn(x, t) -> model_output`, where `x` is the latent batch scaled exactly
as diffusers passes it to the UNet (after `scheduler.scale_model_input`), `t` a float32 scalar
equal to the timestep diffusers passes (fractional for the sigma samplers), and the output is in
the schedule's `prediction_type`. Classifier-free guidance is the caller's, inside `model_fn`.

References:
    Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM), arXiv:2010.02502.
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM), arXiv:2006.11239.
    Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
        (PNDM / PLMS), arXiv:2202.09778.
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models" (Euler, Heun, DPM2 in sigma space, Karras sigmas), arXiv:2206.00364.
    Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
        Diffusion Probabilistic Models", arXiv:2211.01095.
    Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
        Sampling of Diffusion Models", arXiv:2302.04867.
    Luo, Tan, Huang, Li, Zhao 2023, "Latent Consistency Models", arXiv:2310.04378.
    Crowson, k-diffusion (`sample_dpmpp_2s_ancestral`, `sample_dpmpp_sde`, LMS, ancestral steps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.schedules import ScheduleConfig

Array = jax.Array

# ---------------------------------------------------------------- plan, carry and context


@struct.dataclass
class SamplingPlan:
    """Everything a sampler needs per step, as arrays built on the host by `make_plan`."""

    timesteps: Array  # [S] float32: the timestep model_fn sees at each step's first evaluation
    coeffs: dict[str, Array]  # name -> [S, ...] float32 per-step scalars of this sampler
    init_noise_sigma: Array  # [] float32: text2img starts from x_T = init_noise_sigma * N(0, I)
    start_signal_scale: Array  # [] float32: img2img starts from a * x0 + b * noise, this is a
    start_noise_scale: Array  # [] float32: ... and this is b (diffusers' add_noise at step 0)
    renoise_signal: Array  # [S] float32: diffusers' add_noise at the timestep after step i is
    renoise_noise: Array  # [S] ... signal * x0 + noise * eps (1 and 0 after the last step)
    sampler: str = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


class SamplerCarry(NamedTuple):
    """The scan carry; float32 whatever the model dtype."""

    latents: Array  # [B, ...] diffusers' `latents` between steps (VP or sigma space, per sampler)
    history: Array  # [H, B, ...] past model outputs / derivatives, newest last (H per sampler)
    anchor: Array  # [A, B, ...] latents a multistep method returns to (PLMS cur_sample, UniPC
    #                last_sample); A = 0 for samplers without one


class StepContext(NamedTuple):
    """What a step function needs besides the carry and the step's coefficients."""

    model: Callable[[Array, Array], Array]  # (scaled x float32, t) -> float32 model output
    prediction_type: str
    eta: Array  # [] float32, DDIM's eta (other samplers ignore it)


StepFn = Callable[[StepContext, SamplerCarry, dict[str, Array], Array | None], SamplerCarry]


# ---------------------------------------------------------------- conversions shared by steps


def _ve_x0(model_output, x, sigma, prediction_type):
    """x0 from a model output in sigma (variance-exploding) space, diffusers' Euler formulas."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output  # "sample"


def _ve_scale(x, sigma):
    """What diffusers' sigma schedulers feed the UNet: x / sqrt(sigma^2 + 1)."""
    return x / (sigma**2 + 1) ** 0.5


def _alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a VP process from the sigma-space sigma, as DPM-Solver / UniPC."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t, sigma_t):
    """Half log-SNR; +inf at sigma = 0 (the last step), which the formulas below tolerate."""
    return jnp.log(alpha_t) - jnp.log(sigma_t)


def _push(history, value):
    """Drops the oldest entry of [H, B, ...] and appends `value` as the newest."""
    return jnp.concatenate([history[1:], value[None]], axis=0)


def _weighted(weights, history):
    """sum_k weights[k] * history[k]; weights [H], history [H, B, ...]."""
    return jnp.tensordot(weights, history, axes=1)


# ---------------------------------------------------------------- step functions


def _step_ddim(ctx, carry, c, noise):
    x = carry.latents
    a_t, a_prev = c["alpha_prod"], c["alpha_prod_prev"]
    out = ctx.model(x, c["t"])
    x0, eps = schedules.to_x0_and_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, ctx.prediction_type)
    x0 = jnp.clip(x0, -c["clip"], c["clip"])
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = ctx.eta * variance**0.5
    x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps + std * noise[0]
    return carry._replace(latents=x)


def _step_ddpm(ctx, carry, c, noise):
    x = carry.latents
    a_t, a_prev = c["alpha_prod"], c["alpha_prod_prev"]
    out = ctx.model(x, c["t"])
    x0, _ = schedules.to_x0_and_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, ctx.prediction_type)
    x0 = jnp.clip(x0, -c["clip"], c["clip"])
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    mean = (a_prev**0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t**0.5 * (1 - a_prev) / (1 - a_t)) * x
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)  # "fixed_small"
    x = mean + c["has_noise"] * variance**0.5 * noise[0]
    return carry._replace(latents=x)


def _step_plms(ctx, carry, c, noise):
    # One model call per diffusers timestep (N + 1 of them): the first two steps form a
    # second-order start (counter 0 and 1 of diffusers' PNDM), then Adams-Bashforth 2..4.
    x = carry.latents
    out = ctx.model(x, c["t"])
    history = jnp.where(c["push"] > 0, _push(carry.history, out), carry.history)
    eps = c["output_weight"] * out + _weighted(c["history_weights"], history)
    sample = jnp.where(c["use_anchor"] > 0, carry.anchor[0], x)
    anchor = jnp.where(c["set_anchor"] > 0, x[None], carry.anchor)
    a_t, a_prev = c["alpha_prod"], c["alpha_prod_prev"]
    if ctx.prediction_type == "v_prediction":
        eps = a_t**0.5 * eps + (1 - a_t) ** 0.5 * sample
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    x = (a_prev / a_t) ** 0.5 * sample - (a_prev - a_t) * eps / denom
    return SamplerCarry(latents=x, history=history, anchor=anchor)


def _step_lms(ctx, carry, c, noise):
    x, sigma = carry.latents, c["sigma"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    derivative = (x - _ve_x0(out, x, sigma, ctx.prediction_type)) / sigma
    history = _push(carry.history, derivative)
    x = x + _weighted(c["lms_weights"], history)
    return carry._replace(latents=x, history=history)


def _step_euler(ctx, carry, c, noise):
    x, sigma = carry.latents, c["sigma"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    derivative = (x - _ve_x0(out, x, sigma, ctx.prediction_type)) / sigma
    return carry._replace(latents=x + derivative * (c["sigma_next"] - sigma))


def _step_euler_a(ctx, carry, c, noise):
    x, sigma = carry.latents, c["sigma"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    derivative = (x - _ve_x0(out, x, sigma, ctx.prediction_type)) / sigma
    x = x + derivative * (c["sigma_down"] - sigma) + noise[0] * c["sigma_up"]
    return carry._replace(latents=x)


def _step_heun(ctx, carry, c, noise):
    x, sigma, sigma_next = carry.latents, c["sigma"], c["sigma_next"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    x0 = jnp.clip(_ve_x0(out, x, sigma, ctx.prediction_type), -c["clip"], c["clip"])
    d1 = (x - x0) / sigma
    dt = sigma_next - sigma
    x_euler = x + d1 * dt

    def correct(_):
        out2 = ctx.model(_ve_scale(x_euler, sigma_next), c["t_mid"])
        x0_2 = _ve_x0(out2, x_euler, sigma_next, ctx.prediction_type)
        d2 = (x_euler - jnp.clip(x0_2, -c["clip"], c["clip"])) / sigma_next
        return x + (d1 + d2) / 2 * dt

    # The last step (to sigma = 0) is a plain Euler step, as in diffusers.
    x = jax.lax.cond(c["second"] > 0, correct, lambda _: x_euler, None)
    return carry._replace(latents=x)


def _dpm2_update(ctx, carry, c, sigma_target, added_noise):
    """KDPM2: a half step to sigma_mid, then the full step to `sigma_target` with the slope
    there, plus `added_noise` (the ancestral variant's fresh noise; 0 otherwise)."""
    x, sigma, sigma_mid = carry.latents, c["sigma"], c["sigma_mid"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    d1 = (x - _ve_x0(out, x, sigma, ctx.prediction_type)) / sigma
    x_mid = x + d1 * (sigma_mid - sigma)

    def second(_):
        out2 = ctx.model(_ve_scale(x_mid, sigma_mid), c["t_mid"])
        d2 = (x_mid - _ve_x0(out2, x_mid, sigma_mid, ctx.prediction_type)) / sigma_mid
        return x + d2 * (sigma_target - sigma) + added_noise

    # On the last step sigma_mid is 0: the first half-step already lands on sigma = 0.
    x = jax.lax.cond(c["second"] > 0, second, lambda _: x_mid, None)
    return carry._replace(latents=x)


def _step_dpm2(ctx, carry, c, noise):
    return _dpm2_update(ctx, carry, c, c["sigma_next"], 0.0)


def _step_dpm2_a(ctx, carry, c, noise):
    return _dpm2_update(ctx, carry, c, c["sigma_down"], noise[0] * c["sigma_up"])


def _dpmpp_2m_update(ctx, carry, c, noise, sde: bool):
    x = carry.latents
    out = ctx.model(x, c["t"])  # DPM-Solver's scale_model_input is the identity
    alpha_s, sigma_s = _alpha_sigma(c["sigma"])
    x0, _ = schedules.to_x0_and_eps(out, x, alpha_s, sigma_s, ctx.prediction_type)
    alpha_t, sigma_t = _alpha_sigma(c["sigma_next"])
    alpha_p, sigma_p = _alpha_sigma(c["sigma_prev"])
    lambda_s = _lambda(alpha_s, sigma_s)
    h = _lambda(alpha_t, sigma_t) - lambda_s
    r0 = (lambda_s - _lambda(alpha_p, sigma_p)) / h
    d1 = (1.0 / r0) * (x0 - carry.history[-1])
    if sde:
        first = (
            sigma_t / sigma_s * jnp.exp(-h) * x
            + alpha_t * (1 - jnp.exp(-2.0 * h)) * x0
            + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise[0]
        )
        correction = 0.5 * (alpha_t * (1 - jnp.exp(-2.0 * h))) * d1
    else:
        first = sigma_t / sigma_s * x - alpha_t * (jnp.exp(-h) - 1.0) * x0
        correction = -0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    # First order on the first and the last step (diffusers' lower_order_final); the unused
    # second-order term may be inf/nan there (h = inf at sigma_next = 0), hence `where`.
    x = jnp.where(c["order"] > 1, first + correction, first)
    return SamplerCarry(latents=x, history=_push(carry.history, x0), anchor=carry.anchor)


def _step_dpmpp_2m(ctx, carry, c, noise):
    return _dpmpp_2m_update(ctx, carry, c, noise, sde=False)


def _step_dpmpp_2m_sde(ctx, carry, c, noise):
    return _dpmpp_2m_update(ctx, carry, c, noise, sde=True)


def _step_dpmpp_2s_a(ctx, carry, c, noise):
    # k-diffusion's sample_dpmpp_2s_ancestral (eta = 1), in diffusers' sigma-space conventions.
    x, sigma, sigma_down = carry.latents, c["sigma"], c["sigma_down"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    x0 = _ve_x0(out, x, sigma, ctx.prediction_type)

    def midpoint(_):
        sigma_mid = c["sigma_mid"]  # exp(-(t + h/2)) with t = -log sigma, h = log(sigma / down)
        h = jnp.log(sigma) - jnp.log(sigma_down)
        x_2 = (sigma_mid / sigma) * x - jnp.expm1(-h * 0.5) * x0
        out2 = ctx.model(_ve_scale(x_2, sigma_mid), c["t_mid"])
        x0_2 = _ve_x0(out2, x_2, sigma_mid, ctx.prediction_type)
        return (sigma_down / sigma) * x - jnp.expm1(-h) * x0_2

    def euler(_):
        return x + (x - x0) / sigma * (sigma_down - sigma)

    x = jax.lax.cond(c["second"] > 0, midpoint, euler, None)
    return carry._replace(latents=x + noise[0] * c["sigma_up"])


def _step_dpmpp_sde(ctx, carry, c, noise):
    # diffusers' DPMSolverSDEScheduler (k-diffusion sample_dpmpp_sde, r = 1/2). Its Brownian
    # tree is replaced by the exact joint law of the two increments it draws per step: W over
    # [sigma_mid, sigma] and W over [sigma_next, sigma] (the first is part of the second).
    x, sigma = carry.latents, c["sigma"]
    out = ctx.model(_ve_scale(x, sigma), c["t"])
    x0 = _ve_x0(out, x, sigma, ctx.prediction_type)

    def two_stages(_):
        sigma_mid = c["sigma_mid"]
        n1 = noise[0]
        n2 = c["brownian_w1"] * noise[0] + c["brownian_w2"] * noise[1]
        x_2 = (c["down_mid"] / sigma) * x - jnp.expm1(jnp.log(c["down_mid"] / sigma)) * x0
        x_2 = x_2 + n1 * c["up_mid"]
        out2 = ctx.model(_ve_scale(x_2, sigma_mid), c["t_mid"])
        x0_2 = _ve_x0(out2, x_2, sigma_mid, ctx.prediction_type)
        x_next = (c["sigma_down"] / sigma) * x - jnp.expm1(jnp.log(c["sigma_down"] / sigma)) * x0_2
        return x_next + n2 * c["sigma_up"]

    def euler(_):
        return x + (x - x0) / sigma * (c["sigma_next"] - sigma)

    x = jax.lax.cond(c["second"] > 0, two_stages, euler, None)
    return carry._replace(latents=x)


def _unipc_coefficients(h):
    """B(h) and the phi-function right-hand sides b_1, b_2 of UniPC's bh2 variant."""
    hh = -h  # predict_x0
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = jnp.expm1(hh)
    b1 = h_phi_k / b_h
    h_phi_k = h_phi_k / hh - 1 / 2
    b2 = h_phi_k * 2 / b_h
    return h_phi_1, b_h, b1, b2


def _step_unipc(ctx, carry, c, noise):
    x = carry.latents
    out = ctx.model(x, c["t"])  # UniPC's scale_model_input is the identity
    alpha_i, sigma_i = _alpha_sigma(c["sigma"])
    m_t, _ = schedules.to_x0_and_eps(out, x, alpha_i, sigma_i, ctx.prediction_type)
    lambda_i = _lambda(alpha_i, sigma_i)
    alpha_p, sigma_p = _alpha_sigma(c["sigma_prev"])
    lambda_p = _lambda(alpha_p, sigma_p)
    alpha_p2, sigma_p2 = _alpha_sigma(c["sigma_prev2"])
    lambda_p2 = _lambda(alpha_p2, sigma_p2)

    # Corrector UniC: refine the previous prediction x with the model output m_t at it.
    m0, m1 = carry.history[-1], carry.history[-2]
    h = lambda_i - lambda_p
    h_phi_1, b_h, b1, b2 = _unipc_coefficients(h)
    base = sigma_i / sigma_p * carry.anchor[0] - alpha_i * h_phi_1 * m0
    d1_t = m_t - m0
    corrected_1 = base - alpha_i * b_h * (0.5 * d1_t)
    rk = (lambda_p2 - lambda_p) / h
    d1 = (m1 - m0) / rk
    # rhos_c = solve([[1, 1], [rk, 1]], [b1, b2])
    rho0 = (b1 - b2) / (1 - rk)
    rho1 = (b2 - rk * b1) / (1 - rk)
    corrected_2 = base - alpha_i * b_h * (rho0 * d1 + rho1 * d1_t)
    order_c = c["order_corrector"]
    x = jnp.where(order_c == 1, corrected_1, jnp.where(order_c == 2, corrected_2, x))

    # Predictor UniP (bh2), from the corrected x to sigma_next.
    history = _push(carry.history, m_t)
    alpha_t, sigma_t = _alpha_sigma(c["sigma_next"])
    h = _lambda(alpha_t, sigma_t) - lambda_i
    h_phi_1, b_h, _, _ = _unipc_coefficients(h)
    x_next = sigma_t / sigma_i * x - alpha_t * h_phi_1 * m_t
    rk = (lambda_p - lambda_i) / h
    pred_res = 0.5 * ((history[-2] - m_t) / rk)
    x_next = jnp.where(c["order_predictor"] > 1, x_next - alpha_t * b_h * pred_res, x_next)
    return SamplerCarry(latents=x_next, history=history, anchor=x[None])


def _step_lcm(ctx, carry, c, noise):
    x = carry.latents
    a_t, a_prev = c["alpha_prod"], c["alpha_prod_prev"]
    out = ctx.model(x, c["t"])
    x0, _ = schedules.to_x0_and_eps(out, x, a_t**0.5, (1 - a_t) ** 0.5, ctx.prediction_type)
    x0 = jnp.clip(x0, -c["clip"], c["clip"])
    denoised = c["c_out"] * x0 + c["c_skip"] * x
    renoised = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise[0]
    x = jnp.where(c["has_noise"] > 0, renoised, denoised)
    return carry._replace(latents=x)


# ---------------------------------------------------------------- plan builders (host numpy)

# Each builder gets the resolved config, the step count, the sigma schedule and the img2img
# begin index, and returns (model timesteps [S], coeffs {name: [S, ...]}, init_noise_sigma,
# (start_signal_scale, start_noise_scale)) for the steps from `begin` on.


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def _vp_start(alpha_prod):
    return float(np.sqrt(alpha_prod)), float(np.sqrt(1 - alpha_prod))


def _clip_value(cfg):
    return np.float32(cfg.clip_sample_range if cfg.clip_sample else np.inf)


def _build_ddim(cfg, steps, sigma_schedule, begin):
    ts = schedules.discrete_timesteps(cfg, steps)
    ac = schedules.alphas_cumprod_from_config(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = ts - cfg.num_train_timesteps // steps  # diffusers' DDIM steps by T // N
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    n = len(ts)
    coeffs = dict(alpha_prod=ac[ts], alpha_prod_prev=a_prev, clip=np.full(n, _clip_value(cfg)))
    return ts[begin:], _slice(coeffs, begin), 1.0, _vp_start(ac[ts[begin]])


def _build_ddpm(cfg, steps, sigma_schedule, begin):
    ts = schedules.discrete_timesteps(cfg, steps)
    ac = schedules.alphas_cumprod_from_config(cfg)
    a_prev = np.concatenate([ac[ts[1:]], [np.float32(1.0)]])  # previous = next in the list
    n = len(ts)
    coeffs = dict(
        alpha_prod=ac[ts],
        alpha_prod_prev=a_prev,
        has_noise=(ts > 0).astype(np.float32),
        clip=np.full(n, _clip_value(cfg)),
    )
    return ts[begin:], _slice(coeffs, begin), 1.0, _vp_start(ac[ts[begin]])


_ADAMS_BASHFORTH = {  # weights of eps history (oldest .. newest) for 1..4 stored outputs
    1: [0, 0, 0, 1],
    2: [0, 0, -1 / 2, 3 / 2],
    3: [0, 5 / 12, -16 / 12, 23 / 12],
    4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24],
}


def _build_plms(cfg, steps, sigma_schedule, begin):
    ascending = schedules.discrete_timesteps(cfg, steps)[::-1]
    # PNDM with skip_prk_steps: the second-to-last training step is visited twice.
    ts = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1][begin:]
    ac = schedules.alphas_cumprod_from_config(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    ratio = cfg.num_train_timesteps // steps
    rows = dict(
        alpha_prod=[],
        alpha_prod_prev=[],
        output_weight=[],
        history_weights=[],
        push=[],
        use_anchor=[],
        set_anchor=[],
    )
    for counter, t in enumerate(ts):  # diffusers' counter restarts at the (img2img) begin
        t_from, t_to = int(t), int(t) - ratio
        if counter == 1:  # the corrector half of the second-order start
            t_from, t_to = int(t) + ratio, int(t)
            rows["output_weight"].append(0.5)
            rows["history_weights"].append([0, 0, 0, 0.5])
        else:
            rows["output_weight"].append(0.0)
            rows["history_weights"].append(_ADAMS_BASHFORTH[1 if counter == 0 else min(counter, 4)])
        rows["alpha_prod"].append(ac[t_from])
        rows["alpha_prod_prev"].append(ac[t_to] if t_to >= 0 else final)
        rows["push"].append(float(counter != 1))
        rows["use_anchor"].append(float(counter == 1))
        rows["set_anchor"].append(float(counter == 0))
    coeffs = {k: _f32(v) for k, v in rows.items()}
    return ts, coeffs, 1.0, _vp_start(ac[ts[0]])


def _sigma_family(cfg, steps, sigma_schedule, round_karras=False):
    """Timesteps and float32 sigmas (with the final 0) as the Euler-family schedulers build them."""
    ts = schedules.sigma_timesteps(cfg, steps)
    sigmas, ts, log_sigmas = schedules.inference_sigmas(cfg, ts, sigma_schedule)
    if round_karras and sigma_schedule == "karras":
        ts = ts.round()
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return ts, sigmas, log_sigmas


def _ve_init_sigma(cfg, sigmas):
    sigma_max = float(np.max(sigmas))
    if cfg.timestep_spacing in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


def _ve_result(cfg, ts, sigmas, coeffs, begin):
    start = (1.0, float(sigmas[begin]))  # diffusers' sigma add_noise: x0 + sigma * noise
    return ts[begin:], _slice(coeffs, begin), _ve_init_sigma(cfg, sigmas), start


def _build_euler(cfg, steps, sigma_schedule, begin):
    ts, sigmas, _ = _sigma_family(cfg, steps, sigma_schedule)
    coeffs = dict(sigma=sigmas[:-1], sigma_next=sigmas[1:])
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _ancestral(sigma, sigma_next):
    """k-diffusion get_ancestral_step with eta = 1: (sigma_down, sigma_up)."""
    sigma, sigma_next = np.asarray(sigma), np.asarray(sigma_next)
    up = np.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def _build_euler_a(cfg, steps, sigma_schedule, begin):
    ts, sigmas, _ = _sigma_family(cfg, steps, sigma_schedule)
    down, up = _ancestral(sigmas[:-1], sigmas[1:])
    coeffs = dict(sigma=sigmas[:-1], sigma_down=_f32(down), sigma_up=_f32(up))
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _build_heun(cfg, steps, sigma_schedule, begin):
    ts, sigmas, _ = _sigma_family(cfg, steps, sigma_schedule)
    n = len(ts)
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_next=sigmas[1:],
        t_mid=_f32(np.concatenate([ts[1:], [0.0]])),
        second=_f32(np.arange(n) < n - 1),
        clip=np.full(n, _clip_value(cfg)),
    )
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _log_midpoint(a, b):
    """exp(lerp(log a, log b, 1/2)) in float32, as torch's `a.log().lerp(b.log(), 0.5).exp()`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(_f32(a)), np.log(_f32(b))
        out = np.exp(lb - (lb - la) * np.float32(0.5))  # torch.lerp's form for weight >= 0.5
    return _f32(np.nan_to_num(out, nan=0.0))


def _build_dpm2(cfg, steps, sigma_schedule, begin):
    ts, sigmas, log_sigmas = _sigma_family(cfg, steps, sigma_schedule, round_karras=True)
    n = len(ts)
    sigma_mid = _log_midpoint(sigmas[1:], sigmas[:-1])  # [N], 0 on the last step
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_mid=sigma_mid,
        sigma_next=sigmas[1:],
        t_mid=_f32(schedules.sigma_to_t(sigma_mid, log_sigmas)),
        second=_f32(np.arange(n) < n - 1),
    )
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _build_dpm2_a(cfg, steps, sigma_schedule, begin):
    ts, sigmas, log_sigmas = _sigma_family(cfg, steps, sigma_schedule, round_karras=True)
    n = len(ts)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    # float32 like diffusers' torch arithmetic; no min() here, as in KDPM2Ancestral.
    up = _f32((sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = _f32((sigma_next**2 - up**2) ** 0.5)
    down[-1] = 0.0
    sigma_mid = _log_midpoint(sigma, down)
    sigma_mid[-1] = 0.0
    coeffs = dict(
        sigma=sigma,
        sigma_mid=sigma_mid,
        sigma_up=up,
        sigma_down=down,
        t_mid=_f32(schedules.sigma_to_t(sigma_mid, log_sigmas)),
        second=_f32(np.arange(n) < n - 1),
    )
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _lms_weights(sigmas, i, begin, max_order=4):
    """LMS coefficients at absolute step i: integrals of Lagrange basis polynomials in sigma."""
    order = min(i + 1, max_order)
    available = i - begin + 1  # diffusers' derivative list restarts at the img2img begin
    weights = np.zeros(max_order)
    s = sigmas.astype(np.float64)
    for j in range(min(order, available)):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                poly = poly * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        antiderivative = poly.integ()
        weights[max_order - 1 - j] = antiderivative(s[i + 1]) - antiderivative(s[i])
    return weights


def _build_lms(cfg, steps, sigma_schedule, begin):
    ts, sigmas, _ = _sigma_family(cfg, steps, sigma_schedule)
    weights = np.zeros((len(ts), 4))
    for i in range(begin, len(ts)):
        weights[i] = _lms_weights(sigmas, i, begin)
    coeffs = dict(sigma=sigmas[:-1], lms_weights=_f32(weights))
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _build_dpmpp_2s_a(cfg, steps, sigma_schedule, begin):
    ts, sigmas, log_sigmas = _sigma_family(cfg, steps, sigma_schedule)
    sigma = sigmas[:-1].astype(np.float64)
    down, up = _ancestral(sigma, sigmas[1:].astype(np.float64))
    sigma_mid = np.sqrt(sigma * down)  # exp(-(t + h / 2)) with t = -log sigma, h = log(s / down)
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_down=_f32(down),
        sigma_up=_f32(up),
        sigma_mid=_f32(sigma_mid),
        t_mid=_f32(schedules.sigma_to_t(sigma_mid, log_sigmas)),
        second=_f32(down > 0),
    )
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _build_dpmpp_sde(cfg, steps, sigma_schedule, begin):
    ts, sigmas, log_sigmas = _sigma_family(cfg, steps, sigma_schedule)
    sigma = sigmas[:-1].astype(np.float64)
    sigma_next = sigmas[1:].astype(np.float64)
    second = sigma_next > 0
    safe_next = np.where(second, sigma_next, sigma)  # keeps the unused last row finite
    sigma_mid = np.sqrt(sigma * safe_next)  # t + (t_next - t) / 2 in t = -log sigma
    down_mid, up_mid = _ancestral(sigma, sigma_mid)
    down, up = _ancestral(sigma, safe_next)
    a, b = sigma - sigma_mid, sigma_mid - safe_next  # Brownian increments' variances (time = sigma)
    total = np.where(second, a + b, 1.0)  # the last row (a Euler step) draws no noise
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_next=sigmas[1:],
        sigma_mid=_f32(sigma_mid),
        t_mid=_f32(schedules.sigma_to_t(sigma_mid, log_sigmas)),
        down_mid=_f32(down_mid),
        up_mid=_f32(up_mid),
        sigma_down=_f32(down),
        sigma_up=_f32(up),
        brownian_w1=_f32(np.where(second, np.sqrt(a / total), 1.0)),
        brownian_w2=_f32(np.sqrt(b / total)),
        second=_f32(second),
    )
    return _ve_result(cfg, ts, sigmas, coeffs, begin)


def _multistep_family(cfg, steps, sigma_schedule, round_karras_cosine):
    """Timesteps (int) and float32 sigmas as DPMSolverMultistep / UniPCMultistep build them."""
    ts = schedules.multistep_timesteps(cfg, steps)
    sigmas, new_ts, _ = schedules.inference_sigmas(cfg, ts, sigma_schedule, ascending_source=True)
    if sigma_schedule == "karras" and (
        round_karras_cosine or cfg.beta_schedule != "squaredcos_cap_v2"
    ):
        new_ts = new_ts.round()
    ts = new_ts.astype(np.int64)  # diffusers casts to int64 (truncating unrounded ones)
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _vp_start_from_sigma(sigma):
    alpha_t = 1 / (float(sigma) ** 2 + 1) ** 0.5
    return alpha_t, float(sigma) * alpha_t


def _build_dpmpp_2m(cfg, steps, sigma_schedule, begin):
    ts, sigmas = _multistep_family(cfg, steps, sigma_schedule, round_karras_cosine=False)
    n = len(ts)
    index = np.arange(n)
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_next=sigmas[1:],
        sigma_prev=np.concatenate([sigmas[:1], sigmas[:-2]]),
        order=_f32(np.where((index - begin >= 1) & (index < n - 1), 2, 1)),
    )
    return ts[begin:], _slice(coeffs, begin), 1.0, _vp_start_from_sigma(sigmas[begin])


def _build_unipc(cfg, steps, sigma_schedule, begin):
    ts, sigmas = _multistep_family(cfg, steps, sigma_schedule, round_karras_cosine=True)
    n = len(ts)
    order_p = np.zeros(n)
    order_c = np.zeros(n)
    for i in range(begin, n):
        j = i - begin  # diffusers' lower_order_nums restarts at the img2img begin
        order_p[i] = min(min(2, n - i), min(j, 2) + 1)  # lower_order_final=True, solver_order=2
        order_c[i] = order_p[i - 1] if j >= 1 else 0
    pad = np.concatenate([sigmas[:1], sigmas[:1], sigmas])
    coeffs = dict(
        sigma=sigmas[:-1],
        sigma_next=sigmas[1:],
        sigma_prev=pad[1 : n + 1],
        sigma_prev2=pad[:n],
        order_predictor=_f32(order_p),
        order_corrector=_f32(order_c),
    )
    return ts[begin:], _slice(coeffs, begin), 1.0, _vp_start_from_sigma(sigmas[begin])


def _build_lcm(cfg, steps, sigma_schedule, begin, strength=1.0):
    ts = schedules.lcm_timesteps(cfg, steps, strength)
    ac = schedules.alphas_cumprod_from_config(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = np.concatenate([ts[1:], ts[-1:]])  # the last step's "previous" is itself (unused)
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    scaled = ts.astype(np.float64) * cfg.timestep_scaling
    sigma_data = 0.5
    n = len(ts)
    coeffs = dict(
        alpha_prod=ac[ts],
        alpha_prod_prev=a_prev,
        c_skip=_f32(sigma_data**2 / (scaled**2 + sigma_data**2)),
        c_out=_f32(scaled / (scaled**2 + sigma_data**2) ** 0.5),
        has_noise=_f32(np.arange(n) != n - 1),
        clip=np.full(n, _clip_value(cfg)),
    )
    return ts[begin:], _slice(coeffs, begin), 1.0, _vp_start(ac[ts[begin]])


def _slice(coeffs, begin):
    return {k: np.asarray(v)[begin:] for k, v in coeffs.items()}


# ---------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its step function, how its plan is built, and what it carries."""

    name: str
    description: str  # one line, printed by `jaxdiff samplers`
    reference: str  # the diffusers class it reproduces (or the k-diffusion function)
    defaults_class: str  # the diffusers class whose config defaults apply
    step: StepFn
    build: Callable
    history: int = 0  # H of SamplerCarry.history
    anchor: int = 0  # A of SamplerCarry.anchor
    noise_per_step: int = 0  # Gaussian draws per step (0: deterministic)
    sigma_schedules: tuple[str, ...] = ("default",)
    order: int = 1  # diffusers' scheduler.order (timesteps per step in its list)


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        SamplerSpec(
            "ddim",
            "DDIM (Song et al. 2021); deterministic at eta=0, option eta",
            "DDIMScheduler",
            "DDIMScheduler",
            _step_ddim,
            _build_ddim,
            noise_per_step=1,
        ),
        SamplerSpec(
            "ddpm",
            "DDPM ancestral sampling (Ho et al. 2020), fixed_small variance",
            "DDPMScheduler",
            "DDPMScheduler",
            _step_ddpm,
            _build_ddpm,
            noise_per_step=1,
        ),
        SamplerSpec(
            "plms",
            "PLMS / PNDM (Liu et al. 2022): Adams-Bashforth up to 4th order",
            "PNDMScheduler(skip_prk_steps=True)",
            "PNDMScheduler",
            _step_plms,
            _build_plms,
            history=4,
            anchor=1,
        ),
        SamplerSpec(
            "lms",
            "Linear multistep in sigma (k-diffusion LMS), 4th order",
            "LMSDiscreteScheduler",
            "LMSDiscreteScheduler",
            _step_lms,
            _build_lms,
            history=4,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "euler",
            "Euler in sigma (Karras et al. 2022), 1st order ODE",
            "EulerDiscreteScheduler",
            "EulerDiscreteScheduler",
            _step_euler,
            _build_euler,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "euler_a",
            "Euler ancestral (k-diffusion), stochastic",
            "EulerAncestralDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            _step_euler_a,
            _build_euler_a,
            noise_per_step=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "heun",
            "Heun (Karras et al. 2022), 2nd order ODE, 2 model calls per step",
            "HeunDiscreteScheduler",
            "HeunDiscreteScheduler",
            _step_heun,
            _build_heun,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
            order=2,
        ),
        SamplerSpec(
            "dpm2",
            "DPM2 (k-diffusion), 2nd order ODE via log-sigma midpoint, 2 calls per step",
            "KDPM2DiscreteScheduler",
            "KDPM2DiscreteScheduler",
            _step_dpm2,
            _build_dpm2,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
            order=2,
        ),
        SamplerSpec(
            "dpm2_a",
            "DPM2 ancestral (k-diffusion), stochastic, 2 calls per step",
            "KDPM2AncestralDiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler",
            _step_dpm2_a,
            _build_dpm2_a,
            noise_per_step=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
            order=2,
        ),
        SamplerSpec(
            "dpmpp_2m",
            "DPM-Solver++(2M) (Lu et al. 2022), 2nd order multistep ODE",
            "DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2)",
            "DPMSolverMultistepScheduler",
            _step_dpmpp_2m,
            _build_dpmpp_2m,
            history=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "dpmpp_2m_sde",
            "SDE-DPM-Solver++(2M) (Lu et al. 2022), stochastic multistep",
            "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', solver_order=2)",
            "DPMSolverMultistepScheduler",
            _step_dpmpp_2m_sde,
            _build_dpmpp_2m,
            history=1,
            noise_per_step=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "dpmpp_2s_a",
            "DPM-Solver++(2S) ancestral (k-diffusion), stochastic, 2 calls per step",
            "k-diffusion sample_dpmpp_2s_ancestral (no diffusers class)",
            "EulerDiscreteScheduler",
            _step_dpmpp_2s_a,
            _build_dpmpp_2s_a,
            noise_per_step=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "dpmpp_sde",
            "DPM-Solver++ SDE (k-diffusion), stochastic, 2 calls per step",
            "DPMSolverSDEScheduler",
            "DPMSolverSDEScheduler",
            _step_dpmpp_sde,
            _build_dpmpp_sde,
            noise_per_step=2,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
            order=2,
        ),
        SamplerSpec(
            "unipc",
            "UniPC (Zhao et al. 2023), bh2 predictor-corrector, 2nd order",
            "UniPCMultistepScheduler(solver_order=2, solver_type='bh2')",
            "UniPCMultistepScheduler",
            _step_unipc,
            _build_unipc,
            history=2,
            anchor=1,
            sigma_schedules=schedules.SIGMA_SCHEDULES,
        ),
        SamplerSpec(
            "lcm",
            "Latent Consistency Model sampling (Luo et al. 2023), few steps",
            "LCMScheduler",
            "LCMScheduler",
            _step_lcm,
            _build_lcm,
            noise_per_step=1,
        ),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def describe() -> list[tuple[str, str]]:
    """(name, description) of every sampler, for `jaxdiff samplers`."""
    return [(s.name, s.description) for s in SAMPLERS.values()]


# ---------------------------------------------------------------- plan and sampling


def make_plan(
    config: ScheduleConfig,
    sampler: str,
    steps: int,
    sigmas: str | None = None,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> SamplingPlan:
    """Builds the per-step arrays of `sampler` for `steps` steps (host side, numpy).

    sigmas: "default", "karras" or "exponential"; None takes the config's use_karras_sigmas /
        use_exponential_sigmas.
    strength: img2img strength in [0, 1]; None (text2img) runs every step. The plan then starts
        where diffusers' StableDiffusionImg2ImgPipeline.get_timesteps starts.
    denoising_end / denoising_start: the fraction of the schedule where an SDXL base stage stops
        and its refiner stage starts (diffusers' arguments of the same names).
    """
    spec = get_sampler(sampler)
    cfg = config.resolve(spec.defaults_class)
    if sigmas is None:
        sigmas = (
            "karras"
            if cfg.use_karras_sigmas
            else "exponential"
            if cfg.use_exponential_sigmas
            else "default"
        )
    if sigmas not in spec.sigma_schedules:
        raise ValueError(
            f"sampler {sampler!r} supports sigmas {spec.sigma_schedules}, not {sigmas!r}"
        )
    if sampler == "plms" and cfg.prediction_type == "sample":
        raise ValueError("plms (PNDM) supports prediction_type epsilon and v_prediction only")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    build = spec.build
    begin = 0 if strength is None else schedules.img2img_t_start(steps, strength)
    if sampler == "lcm" and strength is not None:
        # LCM img2img shortens the teacher's schedule instead of skipping steps
        # (LCMScheduler.set_timesteps(strength=...); the pipeline then runs every step).
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"lcm img2img needs strength in (0, 1], got {strength}")
        build, begin = functools.partial(_build_lcm, strength=strength), 0
    if begin >= steps:
        raise ValueError(f"strength={strength} leaves no step to run with steps={steps}")
    if denoising_start is not None:
        # An SDXL refiner stage: only the steps below the cutoff, as diffusers' img2img
        # get_timesteps(denoising_start=...) (a fresh scheduler whose begin index is set there).
        full_ts = build(cfg, steps, sigmas, 0)[0]
        begin = len(full_ts) - int(np.sum(full_ts < _cutoff(cfg, denoising_start)))
        if begin >= len(full_ts):
            raise ValueError(f"denoising_start={denoising_start} leaves no step to run")
    ts, coeffs, init_sigma, (signal, noise) = build(cfg, steps, sigmas, begin)
    # add_noise coefficients at each following timestep: the start point of a plan that would
    # begin there (inpainting with an ordinary UNet re-noises the known region to them).
    following = [build(cfg, steps, sigmas, j)[3] for j in range(begin + 1, begin + len(ts))]
    following.append((1.0, 0.0))
    plan = SamplingPlan(
        timesteps=jnp.asarray(_f32(ts)),
        coeffs={k: jnp.asarray(_f32(v)) for k, v in coeffs.items()},
        init_noise_sigma=jnp.asarray(init_sigma, jnp.float32),
        start_signal_scale=jnp.asarray(signal, jnp.float32),
        start_noise_scale=jnp.asarray(noise, jnp.float32),
        renoise_signal=jnp.asarray(_f32([a for a, _ in following])),
        renoise_noise=jnp.asarray(_f32([b for _, b in following])),
        sampler=sampler,
        prediction_type=cfg.prediction_type,
    )
    if denoising_end is not None:
        # An SDXL base stage that hands over to a refiner: the steps at or above the cutoff, as
        # diffusers' `denoising_end` (which for second-order samplers may also cut between the
        # two evaluations of a step; jaxdiff always ends on a whole step).
        keep = int(np.sum(np.asarray(plan.timesteps) >= _cutoff(cfg, denoising_end)))
        if keep < 1:
            raise ValueError(f"denoising_end={denoising_end} leaves no step to run")
        plan = truncate(plan, keep)
    return plan


def _cutoff(cfg: ScheduleConfig, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a denoising fraction must be in (0, 1), got {fraction}")
    return int(round(cfg.num_train_timesteps - fraction * cfg.num_train_timesteps))


def truncate(plan: SamplingPlan, steps: int) -> SamplingPlan:
    """The first `steps` steps of a plan (the coefficients of the full plan, unchanged)."""
    return plan.replace(
        timesteps=plan.timesteps[:steps],
        coeffs={k: v[:steps] for k, v in plan.coeffs.items()},
        renoise_signal=plan.renoise_signal[:steps],
        renoise_noise=plan.renoise_noise[:steps],
    )


def init_noise_sigma(plan: SamplingPlan) -> Array:
    """The factor diffusers multiplies N(0, I) by to get text2img's x_T."""
    return plan.init_noise_sigma


def img2img_latents(plan: SamplingPlan, init_latents: Array, noise: Array) -> Array:
    """img2img start point: diffusers' scheduler.add_noise(init_latents, noise, timesteps[:1])."""
    # float32: the scales (e.g. sigma ~ 14.6) do not survive bf16 rounding exactly.
    x = plan.start_signal_scale * init_latents.astype(jnp.float32)
    x = x + plan.start_noise_scale * noise.astype(jnp.float32)
    return x.astype(init_latents.dtype)


def renoise(plan: SamplingPlan, index: Array, x0: Array, noise: Array) -> Array:
    """x0 noised to the level that follows step `index` (x0 itself after the last step)."""
    x = plan.renoise_signal[index] * x0.astype(jnp.float32)
    return x + plan.renoise_noise[index] * noise.astype(jnp.float32)


def _is_batched_key(key: Array) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def step_noise(key: Array, index: Array, count: int, shape: tuple[int, ...]) -> Array:
    """[count, *shape] standard normals of step `index`.

    key: one key, or one per image ([B] typed / [B, 2] raw) so that an image's noise depends on
    (its key, step) only, never on its position in the batch.
    """
    if _is_batched_key(key):
        per_image = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, index), (count,) + shape[1:])
        )(key)  # [B, count, ...]
        return jnp.swapaxes(per_image, 0, 1)
    return jax.random.normal(jax.random.fold_in(key, index), (count,) + shape)


def init_carry(plan: SamplingPlan, x_T: Array) -> SamplerCarry:
    spec = get_sampler(plan.sampler)
    # float32 carry: schedule coefficients and multistep histories lose too much in bf16.
    x = x_T.astype(jnp.float32)
    return SamplerCarry(
        latents=x,
        history=jnp.zeros((spec.history,) + x.shape, jnp.float32),
        anchor=jnp.zeros((spec.anchor,) + x.shape, jnp.float32),
    )


def make_context(model_fn, plan: SamplingPlan, model_dtype, eta=0.0) -> StepContext:
    def model(x, t):
        # The model runs in its own dtype; its output comes back to float32 scheduler math.
        return model_fn(x.astype(model_dtype), t).astype(jnp.float32)

    return StepContext(
        model=model, prediction_type=plan.prediction_type, eta=jnp.asarray(eta, jnp.float32)
    )


def step_inputs(plan: SamplingPlan, index: int) -> dict[str, Array]:
    """The per-step dict `c` a step function receives at step `index` (for reference loops)."""
    c = {k: v[index] for k, v in plan.coeffs.items()}
    c["t"] = plan.timesteps[index]
    return c


def _check_randomness(spec, plan: SamplingPlan, key, noise, eta) -> None:
    zero_eta = isinstance(eta, (int, float)) and eta == 0.0  # an array eta may be non-zero
    if plan.sampler != "ddim" and not zero_eta:
        raise ValueError("eta is an option of the ddim sampler only")
    needs_key = spec.noise_per_step > 0 and (plan.sampler != "ddim" or not zero_eta)
    if needs_key and key is None and noise is None:
        raise ValueError(f"sampler {plan.sampler!r} is stochastic: pass a PRNG key (or noise)")


def _step_body(model_fn, plan: SamplingPlan, model_dtype, key, noise, eta, post_step):
    """`(carry, step index) -> carry`: one step of the plan, its coefficients and noise looked
    up by the index (a traced scalar)."""
    spec = get_sampler(plan.sampler)
    _check_randomness(spec, plan, key, noise, eta)
    ctx = make_context(model_fn, plan, model_dtype, eta)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)

    def body(carry: SamplerCarry, index) -> SamplerCarry:
        shape = carry.latents.shape
        if spec.noise_per_step == 0:
            step_noise_ = None
        elif noise is not None:
            step_noise_ = noise[index] if noise.ndim == len(shape) + 2 else noise[index][None]
        elif key is None:  # ddim with eta == 0
            step_noise_ = jnp.zeros((spec.noise_per_step,) + shape, jnp.float32)
        else:
            step_noise_ = step_noise(key, index, spec.noise_per_step, shape)
        carry = spec.step(ctx, carry, step_inputs(plan, index), step_noise_)
        if post_step is not None:
            carry = carry._replace(latents=post_step(carry.latents, index))
        return carry

    return body


def sample(
    model_fn: Callable[[Array, Array], Array],
    x_T: Array,
    plan: SamplingPlan,
    key: Array | None = None,
    *,
    noise: Array | None = None,
    eta: float | Array = 0.0,
    return_intermediates: bool = False,
    post_step: Callable[[Array, Array], Array] | None = None,
):
    """Runs the plan's sampler from x_T (diffusers' starting `latents`) with one `lax.scan`.

    x_T: [B, ...] already scaled (`init_noise_sigma(plan) * N(0, I)` for text2img,
        `img2img_latents` for img2img).
    key: PRNG key (or one per image) for stochastic samplers; step i uses fold_in(key, i).
    noise: optional injected noise instead of `key`: [S, *x.shape], or [S, 2, *x.shape] for
        dpmpp_sde (two draws per step).
    eta: DDIM's eta (an array argument is fine: it does not retrace).
    post_step: optional `(latents float32, step index) -> latents` applied after every step
        (inpainting puts the known region back with it).
    Returns x_0 in x_T's dtype, and with return_intermediates also the latents after every
    step, [S, B, ...] float32.
    """
    body = _step_body(model_fn, plan, x_T.dtype, key, noise, eta, post_step)

    def scan_body(carry, index):
        carry = body(carry, index)
        return carry, (carry.latents if return_intermediates else None)

    carry, intermediates = jax.lax.scan(
        scan_body, init_carry(plan, x_T), jnp.arange(plan.num_steps)
    )
    x0 = carry.latents.astype(x_T.dtype)
    return (x0, intermediates) if return_intermediates else x0


def run_steps(
    model_fn: Callable[[Array, Array], Array],
    carry: SamplerCarry,
    plan: SamplingPlan,
    start: Array,
    stop: Array,
    key: Array | None = None,
    *,
    model_dtype=jnp.float32,
    noise: Array | None = None,
    eta: float | Array = 0.0,
    post_step: Callable[[Array, Array], Array] | None = None,
) -> SamplerCarry:
    """Steps `start` to `stop - 1` of the plan from `carry` (`init_carry(plan, x_T)` at step 0);
    the other arguments as `sample`'s, and `model_dtype` the dtype the model gets its input in
    (`sample` uses x_T's). `start` and `stop` may be traced: one compiled program runs any
    range of steps, so a host loop can run a plan a few steps per call and report progress in
    between (`sample` is the same steps in one scan). Returns the carry after step `stop - 1`.
    """
    body = _step_body(model_fn, plan, model_dtype, key, noise, eta, post_step)
    return jax.lax.fori_loop(start, stop, lambda i, c: body(c, i), carry)
