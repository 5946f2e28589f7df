"""Samplers: trajectory parity with diffusers, convergence, statistics, tracing, the scan."""

import dataclasses
import importlib
import sys
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import SCHEDULER_OF
from tolerances import BF16_MODEL_RTOL, SAMPLER_MOMENT_ATOL, assert_close

from jaxdiff import samplers, schedules
from jaxdiff.schedules import ScheduleConfig

diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SHAPE = (2, 4, 8, 8)

DETERMINISTIC = ["ddim", "plms", "lms", "euler", "heun", "dpm2", "dpmpp_2m", "unipc"]


def import_dpmsolver_sde(monkeypatch):
    """diffusers' DPMSolverSDEScheduler module, importable without torchsde (a stub)."""
    monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    monkeypatch.delitem(sys.modules, "diffusers.schedulers.scheduling_dpmsolver_sde", raising=False)
    return importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")


def reference_scheduler(sampler, config, monkeypatch):
    class_name, extra = SCHEDULER_OF[sampler]
    if class_name == "DPMSolverSDEScheduler":
        cls = import_dpmsolver_sde(monkeypatch).DPMSolverSDEScheduler
    else:
        cls = getattr(diffusers, class_name)
    return cls.from_config({**config.to_diffusers(), **extra})


# One fixed nonlinear "UNet", written once in torch and once in jax.
def torch_model(x, t):
    return 0.3 * torch.tanh(x) + 0.01 * (t / 1000) * x


def jax_model(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * (t / 1000) * x


def config_for(sampler, prediction_type):
    base = ScheduleConfig() if sampler == "lcm" else ScheduleConfig.sd15()
    return dataclasses.replace(base, prediction_type=prediction_type)


def run_diffusers(sched, x, noise=None, step_kwargs=None, begin=None):
    """The pipeline loop; returns the latents after every scheduler.step call."""
    states = []
    timesteps = sched.timesteps if begin is None else sched.timesteps[begin:]
    for k, t in enumerate(timesteps):
        model_input = sched.scale_model_input(x, t)
        out = torch_model(model_input, t)
        kwargs = dict(step_kwargs or {})
        if noise is not None:
            kwargs["variance_noise"] = noise[k]
        x = sched.step(out, t, x, **kwargs).prev_sample
        states.append(x.numpy())
    return np.stack(states)


def full_step_states(states, sched_order):
    """diffusers' states at the end of each jaxdiff step (two-evaluation samplers interleave)."""
    if sched_order == 1:
        return states
    n = (len(states) + 1) // 2
    return states[[2 * i + 1 for i in range(n - 1)] + [len(states) - 1]]


# ---------------------------------------------------------------- registry


def test_registry_names_and_descriptions():
    expected = {
        "ddim", "ddpm", "plms", "lms", "euler", "euler_a", "heun", "dpm2", "dpm2_a",
        "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "unipc", "lcm",
    }  # fmt: skip
    assert set(samplers.SAMPLERS) == expected
    for name, description in samplers.describe():
        assert name in expected and description and "\n" not in description
    with pytest.raises(ValueError, match="euler_a"):
        samplers.get_sampler("eulr")


# ---------------------------------------------------------------- deterministic parity


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_trajectory_matches_diffusers(sampler, prediction_type, monkeypatch):
    config = config_for(sampler, prediction_type)
    rng = np.random.default_rng(0)
    for steps in (10, 25):
        x_T = rng.standard_normal(SHAPE).astype(np.float32)
        sched = reference_scheduler(sampler, config, monkeypatch)
        sched.set_timesteps(steps)
        plan = samplers.make_plan(config, sampler, steps)
        x = torch.from_numpy(x_T) * sched.init_noise_sigma
        expected = full_step_states(run_diffusers(sched, x), sched.order)
        x0, states = samplers.sample(
            jax_model, jnp.asarray(x_T) * samplers.init_noise_sigma(plan), plan,
            return_intermediates=True,
        )  # fmt: skip
        what = f"{sampler} {prediction_type} {steps} steps"
        assert_close(states, expected, f"{what}: every step")
        assert_close(x0, expected[-1], f"{what}: x0")


@pytest.mark.parametrize("sampler", ["plms", "lms", "euler", "heun", "dpm2", "dpmpp_2m", "unipc"])
def test_img2img_trajectory_matches_diffusers(sampler, monkeypatch):
    config = ScheduleConfig.sd15()
    steps, strength = 12, 0.6
    rng = np.random.default_rng(1)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    sched = reference_scheduler(sampler, config, monkeypatch)
    sched.set_timesteps(steps)
    begin = schedules.img2img_t_start(steps, strength) * sched.order
    if hasattr(sched, "set_begin_index"):  # as the img2img pipeline does
        sched.set_begin_index(begin)
    x = sched.add_noise(
        torch.from_numpy(init), torch.from_numpy(noise), sched.timesteps[begin:][:1]
    )
    expected = run_diffusers(sched, x, begin=begin)[-1]
    plan = samplers.make_plan(config, sampler, steps, strength=strength)
    x_start = samplers.img2img_latents(plan, jnp.asarray(init), jnp.asarray(noise))
    assert_close(samplers.sample(jax_model, x_start, plan), expected, f"{sampler} img2img")


# ---------------------------------------------------------------- stochastic parity


class NoiseQueue:
    """Stands in for diffusers' randn_tensor: returns the injected noise of the current step."""

    def __init__(self, noise):
        self.noise = noise  # [S, K, *shape] torch
        self.step = 0
        self.draw = 0

    def __call__(self, shape, **kwargs):
        out = self.noise[self.step, self.draw]
        self.draw += 1
        return out


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpm2_a", "lcm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stochastic_trajectory_with_injected_noise(sampler, prediction_type, monkeypatch):
    config = config_for(sampler, prediction_type)
    steps = 8
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    sched = reference_scheduler(sampler, config, monkeypatch)
    sched.set_timesteps(steps)
    plan = samplers.make_plan(config, sampler, steps)
    noise = rng.standard_normal((plan.num_steps, 1) + SHAPE).astype(np.float32)
    queue = NoiseQueue(torch.from_numpy(noise))
    module = sys.modules[type(sched).__module__]
    monkeypatch.setattr(module, "randn_tensor", queue)
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    for k, t in enumerate(sched.timesteps):
        queue.step, queue.draw = k // sched.order, 0
        out = torch_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    x0 = samplers.sample(
        jax_model, jnp.asarray(x_T) * plan.init_noise_sigma, plan, noise=jnp.asarray(noise)
    )
    assert_close(x0, x.numpy(), f"{sampler} {prediction_type} with injected noise")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde"])
def test_variance_noise_trajectory(sampler, monkeypatch):
    config = ScheduleConfig.sd15()
    steps, eta = 10, 0.7
    rng = np.random.default_rng(4)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    sched = reference_scheduler(sampler, config, monkeypatch)
    sched.set_timesteps(steps)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    expected = run_diffusers(sched, torch.from_numpy(x_T), torch.from_numpy(noise), kwargs)
    plan = samplers.make_plan(config, sampler, steps)
    x0 = samplers.sample(jax_model, jnp.asarray(x_T), plan, noise=jnp.asarray(noise), **kwargs)
    assert_close(x0, expected[-1], f"{sampler} with variance_noise")


def test_dpmpp_sde_matches_diffusers_given_the_brownian_increments(monkeypatch):
    """DPMSolverSDEScheduler with its Brownian tree replaced by the same two normals per step."""
    module = import_dpmsolver_sde(monkeypatch)
    config = ScheduleConfig.sd15()
    steps = 8
    rng = np.random.default_rng(5)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((steps, 2) + SHAPE).astype(np.float32)
    state = {"step": 0, "calls": 0}

    class FakeBrownian:
        """Increments W(sigma_a, sigma_b) / sqrt|sigma_a - sigma_b| of one Brownian path."""

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, sigma, sigma_next):
            z1, z2 = (
                torch.from_numpy(noise[state["step"], 0]),
                torch.from_numpy(noise[state["step"], 1]),
            )
            state["calls"] += 1
            if state["calls"] % 2 == 1:  # [sigma_mid, sigma]
                state["first"] = float(sigma - sigma_next)
                return z1
            whole = float(sigma - sigma_next)  # [sigma_next, sigma] contains [sigma_mid, sigma]
            part = state["first"]
            return (part**0.5 * z1 + (whole - part) ** 0.5 * z2) / whole**0.5

    monkeypatch.setattr(module, "BrownianTreeNoiseSampler", FakeBrownian)
    sched = module.DPMSolverSDEScheduler.from_config(config.to_diffusers())
    sched.set_timesteps(steps)
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    for k, t in enumerate(sched.timesteps):
        state["step"] = k // 2
        out = torch_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    plan = samplers.make_plan(config, "dpmpp_sde", steps)
    x0 = samplers.sample(
        jax_model, jnp.asarray(x_T) * plan.init_noise_sigma, plan, noise=jnp.asarray(noise)
    )
    assert_close(x0, x.numpy(), "dpmpp_sde with the same Brownian increments")


def test_dpmpp_2s_a_matches_k_diffusion(monkeypatch):
    """k-diffusion's sample_dpmpp_2s_ancestral, transcribed in torch, with the same noise."""
    config = ScheduleConfig.sd15()
    steps = 10
    rng = np.random.default_rng(6)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    euler = diffusers.EulerDiscreteScheduler.from_config(config.to_diffusers())
    euler.set_timesteps(steps)
    log_sigmas = np.log(np.array(((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5))
    sigmas = euler.sigmas

    def denoise(x, sigma, t):  # k-diffusion's CompVisDenoiser around the model
        eps = torch_model(x / (sigma**2 + 1) ** 0.5, t)
        return x - sigma * eps

    x = torch.from_numpy(x_T) * sigmas[0]
    for i in range(steps):
        denoised = denoise(x, sigmas[i], euler.timesteps[i])
        sigma_up = min(
            sigmas[i + 1],
            (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5,
        )
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up**2) ** 0.5
        if sigma_down == 0:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h * 0.5).expm1() * denoised
            t_mid = float(euler._sigma_to_t(np.array((-s).exp()), log_sigmas))
            denoised_2 = denoise(x_2, (-s).exp(), t_mid)
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + torch.from_numpy(noise[i]) * sigma_up
    plan = samplers.make_plan(config, "dpmpp_2s_a", steps)
    x0 = samplers.sample(
        jax_model, jnp.asarray(x_T) * sigmas[0].item(), plan, noise=jnp.asarray(noise)
    )
    assert_close(x0, x.numpy(), "dpmpp_2s_a vs k-diffusion")


# ---------------------------------------------------------------- Gaussian data, exact denoiser

MU, S = 0.5, 0.8  # x0 ~ N(MU, S^2) in every dimension


def gaussian_denoiser(config, prediction_type):
    """The exact model for Gaussian data: E[x0 | x_t] is linear in x_t.

    It maps t to sigma by interpolating log sigma, the inverse of `sigma_to_t`, so it is exact
    at integer timesteps and at the samplers' midpoint timesteps alike.
    """
    log_sigmas = jnp.asarray(np.log(schedules.train_sigmas(config.resolve())), jnp.float32)
    grid = jnp.arange(log_sigmas.shape[0], dtype=jnp.float32)

    def model_fn(x, t):
        sigma = jnp.exp(jnp.interp(t, grid, log_sigmas))
        alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
        sigma_t = sigma * alpha_t
        x0 = MU + alpha_t * S**2 / (alpha_t**2 * S**2 + sigma_t**2) * (x - alpha_t * MU)
        eps = (x - alpha_t * x0) / sigma_t
        return eps if prediction_type == "epsilon" else alpha_t * eps - sigma_t * x0

    return model_fn


def start_from_marginal(plan, z):
    """x_T distributed as the true marginal at the plan's first step, in the sampler's space."""
    signal = plan.start_signal_scale
    sigma0 = plan.start_noise_scale / signal
    return signal * (MU + jnp.sqrt(S**2 + sigma0**2) * z)


# Expected order of each ODE sampler on this grid (measured error ratios 20 -> 40 steps in
# brackets): Euler / DDIM 1 (2.0), Heun / DPM2 / DPM++ 2M 2 (4.0-4.2), UniPC 3 with its
# corrector (8.3), LMS 3 (8.2, 4th order after a lower-order start), PLMS 2 (3.1) for epsilon;
# PLMS with v-prediction is 1st order (2.0) because diffusers' PNDM combines raw v outputs and
# converts the combination with the current sample, which we reproduce.
ORDERS = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpm2": 2,
    "dpmpp_2m": 2,
    "unipc": 3,
    "lms": 3,
    "plms": 2,
}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ode_samplers_converge_at_their_order(sampler, prediction_type):
    """Error at t=499 against the exact probability-flow ODE solution, 20 vs 40 steps.

    Measured mid-trajectory: the last step jumps from sigma_min ~ 1/steps to 0, whose error
    (~sigma_min^2) would mask every sampler's order. Trailing spacing puts t=499 on both grids.
    """
    config = dataclasses.replace(
        ScheduleConfig.sd15(), set_alpha_to_one=True, prediction_type=prediction_type,
        timestep_spacing="trailing",
    )  # fmt: skip
    model_fn = gaussian_denoiser(config, prediction_type)
    t_check = 499
    sigma = float(schedules.train_sigmas(config.resolve())[t_check])
    z = jax.random.normal(jax.random.key(0), (64,))
    errors = []
    for steps in (20, 40):
        plan = samplers.make_plan(config, sampler, steps)
        _, states = samplers.sample(
            model_fn, start_from_marginal(plan, z), plan, return_intermediates=True
        )
        k = int(np.nonzero(np.asarray(plan.timesteps) == t_check)[0][-1]) - 1
        exact = MU + np.sqrt(S**2 + sigma**2) * z
        if float(plan.init_noise_sigma) == 1.0:  # VP samplers carry alpha_t * x
            exact = exact / np.sqrt(sigma**2 + 1)
        errors.append(float(jnp.abs(states[k] - exact).max()))
    order = 1 if (sampler == "plms" and prediction_type == "v_prediction") else ORDERS[sampler]
    ratio = errors[0] / errors[1]
    assert ratio >= 0.7 * 2**order, f"{sampler}: errors {errors}, ratio {ratio:.2f}"


@pytest.mark.parametrize(
    "sampler", ["ddpm", "euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "ddim"]
)
def test_stochastic_samplers_sample_the_data_distribution(sampler):
    config = dataclasses.replace(ScheduleConfig.sd15(), set_alpha_to_one=True)
    model_fn = gaussian_denoiser(config, "epsilon")
    plan = samplers.make_plan(config, sampler, 50)
    z = jax.random.normal(jax.random.key(1), (16384,))
    options = {"eta": 1.0} if sampler == "ddim" else {}
    x0 = samplers.sample(model_fn, start_from_marginal(plan, z), plan, jax.random.key(2), **options)
    assert abs(float(x0.mean()) - MU) <= SAMPLER_MOMENT_ATOL, float(x0.mean())
    assert abs(float(x0.std()) - S) <= SAMPLER_MOMENT_ATOL, float(x0.std())


# ---------------------------------------------------------------- the scan and jit


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_scan_equals_python_loop_over_the_step_function(sampler):
    config = config_for(sampler, "epsilon")
    plan = samplers.make_plan(config, sampler, 6)
    spec = samplers.get_sampler(sampler)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    noise = None
    if spec.noise_per_step:
        noise = jax.random.normal(jax.random.key(1), (plan.num_steps, spec.noise_per_step) + SHAPE)
    expected = samplers.sample(jax_model, x_T, plan, noise=noise)
    ctx = samplers.make_context(jax_model, plan, x_T.dtype)
    step = jax.jit(lambda carry, c, n: spec.step(ctx, carry, c, n))
    carry = samplers.init_carry(plan, x_T)
    for i in range(plan.num_steps):
        carry = step(carry, samplers.step_inputs(plan, i), None if noise is None else noise[i])
    np.testing.assert_array_equal(np.asarray(carry.latents), np.asarray(expected))


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "plms", "heun"])
def test_run_steps_in_chunks_is_the_scan_with_one_program(sampler):
    """Chunks of steps from a host loop (multistep history, a PLMS anchor, two model calls per
    step, per-step keys) continue exactly where the previous chunk stopped, through one
    compiled program whatever the range."""
    plan = samplers.make_plan(config_for(sampler, "epsilon"), sampler, 7)
    key = jax.random.key(3)
    x_T = samplers.init_noise_sigma(plan) * jax.random.normal(jax.random.key(0), SHAPE)
    expected = samplers.sample(jax_model, x_T, plan, key=key)
    chunk = jax.jit(lambda carry, a, b: samplers.run_steps(jax_model, carry, plan, a, b, key=key))
    carry = samplers.init_carry(plan, x_T)
    n = plan.num_steps  # PLMS: one more than asked for (the second-order start)
    for a, b in [(0, 1), (1, 4), (4, 5), (5, n)]:
        carry = chunk(carry, np.int32(a), np.int32(b))
    assert chunk._cache_size() == 1
    assert_close(carry.latents, expected, f"{sampler}: chunks vs one scan")
    assert np.abs(np.asarray(carry.latents - x_T)).max() > 0.1  # the steps did move the latents


def test_traced_once_across_seeds_guidance_and_conditioning():
    traces = []

    @jax.jit
    def generate(plan, x_T, key, cond, guidance):
        traces.append(1)  # runs only while tracing

        def model_fn(x, t):  # classifier-free guidance around a conditioned toy model
            uncond = jax_model(x, t)
            return uncond + guidance * (jax_model(x + cond, t) - uncond)

        return samplers.sample(model_fn, x_T, plan, key)

    plan = samplers.make_plan(ScheduleConfig.sd15(), "euler_a", 5)
    x_T = jnp.ones(SHAPE)
    outputs = [
        generate(plan, x_T, jax.random.key(seed), jnp.full(SHAPE, c), jnp.float32(g))
        for seed, c, g in [(0, 0.1, 7.5), (1, 0.2, 3.0), (2, -0.3, 1.0)]
    ]
    assert len(traces) == 1
    assert not np.allclose(outputs[0], outputs[1])
    generate(samplers.make_plan(ScheduleConfig.sd15(), "euler_a", 6), x_T, jax.random.key(0),
             jnp.zeros(SHAPE), jnp.float32(1.0))  # fmt: skip
    assert len(traces) == 2  # a new step count is a new shape: the counter does count


def test_per_image_keys_do_not_depend_on_batch_layout():
    plan = samplers.make_plan(ScheduleConfig.sd15(), "euler_a", 4)
    keys = jax.random.split(jax.random.key(0), 2)
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    both = samplers.sample(jax_model, x_T, plan, keys)
    second = samplers.sample(jax_model, x_T[1:], plan, keys[1:])
    np.testing.assert_allclose(both[1:], second, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="stochastic"):
        samplers.sample(jax_model, x_T, plan)


def test_bf16_model_with_float32_scheduler_math():
    seen = []

    def model_fn(x, t):
        seen.append(x.dtype)
        return jax_model(x, t)

    plan = samplers.make_plan(ScheduleConfig.sd15(), "dpmpp_2m", 8)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    out16 = samplers.sample(model_fn, x_T.astype(jnp.bfloat16), plan)
    out32 = samplers.sample(jax_model, x_T, plan)
    assert out16.dtype == jnp.bfloat16 and set(seen) == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, rtol=BF16_MODEL_RTOL, atol=0.01)


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_lcm_img2img_matches_diffusers(strength, monkeypatch):
    """LCM img2img: LCMScheduler.set_timesteps(steps, strength=...) shortens the teacher's
    schedule, every step runs, and the start is add_noise at the first timestep."""
    config = config_for("lcm", "epsilon")
    steps = 4
    rng = np.random.default_rng(9)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    start_noise = rng.standard_normal(SHAPE).astype(np.float32)
    sched = reference_scheduler("lcm", config, monkeypatch)
    sched.set_timesteps(steps, strength=strength)
    plan = samplers.make_plan(config, "lcm", steps, strength=strength)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), sched.timesteps.numpy())
    noise = rng.standard_normal((plan.num_steps, 1) + SHAPE).astype(np.float32)
    queue = NoiseQueue(torch.from_numpy(noise))
    monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor", queue)
    x = sched.add_noise(torch.from_numpy(init), torch.from_numpy(start_noise), sched.timesteps[:1])
    for k, t in enumerate(sched.timesteps):
        queue.step, queue.draw = k, 0
        x = sched.step(torch_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    x_start = samplers.img2img_latents(plan, jnp.asarray(init), jnp.asarray(start_noise))
    x0 = samplers.sample(jax_model, x_start, plan, noise=jnp.asarray(noise))
    assert_close(x0, x.numpy(), f"lcm img2img strength {strength}")
