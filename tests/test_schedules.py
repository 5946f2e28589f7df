"""Noise schedules and inference timesteps against diffusers' PyTorch schedulers."""

import dataclasses
import importlib
import inspect
import sys
import types
from types import SimpleNamespace

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from reference import SCHEDULER_OF
from tolerances import assert_close

from jaxdiff import samplers, schedules
from jaxdiff.schedules import NoiseSchedule, ScheduleConfig

diffusers.utils.logging.set_verbosity_error()
# diffusers' KDPM2 / UniPC call numpy on torch tensors: numpy 2 deprecation noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

# Host-side schedule math: float32 on both sides, differing only in how torch.linspace rounds
# (ULPs of the betas), so timesteps and sigmas agree far below the model tolerance.
SCHEDULE_RTOL = 1e-5
SCHEDULE_ATOL = 1e-5
# Fractional timesteps come from interpolating log sigma; near the ends of the table an ULP of
# sigma moves them by ~1e-5 of a training step (out of 1000).
TIMESTEP_ATOL = 1e-3

# The SD 1.5 `scheduler/scheduler_config.json` as published.
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def import_dpmsolver_sde(monkeypatch):
    """diffusers' DPMSolverSDEScheduler module, importable without torchsde (a stub)."""
    monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    monkeypatch.delitem(sys.modules, "diffusers.schedulers.scheduling_dpmsolver_sde", raising=False)
    return importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")


def diffusers_class(name, monkeypatch):
    if name == "DPMSolverSDEScheduler":
        return import_dpmsolver_sde(monkeypatch).DPMSolverSDEScheduler
    return getattr(diffusers, name)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("class_name", sorted(schedules.DIFFUSERS_DEFAULTS))
def test_class_defaults_match_diffusers(class_name, monkeypatch):
    params = inspect.signature(diffusers_class(class_name, monkeypatch).__init__).parameters
    for key, value in schedules.DIFFUSERS_DEFAULTS[class_name].items():
        if value is None:
            assert key not in params, (class_name, key)
        else:
            assert params[key].default == value, (class_name, key)
    assert ("rescale_betas_zero_snr" in params) == (class_name in schedules.ZERO_SNR_CLASSES)


def test_from_diffusers_reads_sd15_json():
    config = ScheduleConfig.from_diffusers(SD15_JSON)
    assert config.beta_schedule == "scaled_linear" and config.steps_offset == 1
    assert config.timestep_spacing is None  # absent: each class's own default applies
    assert config.resolve("EulerDiscreteScheduler").timestep_spacing == "linspace"
    assert config.resolve("DDIMScheduler").timestep_spacing == "leading"
    assert dataclasses.replace(config, timestep_spacing="leading") == ScheduleConfig.sd15()
    assert ScheduleConfig.sd21_v().prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "bad",
    [
        {"beta_schedulee": "linear"},  # a typo
        {"thresholding": True},  # unsupported feature
        {"final_sigmas_type": "sigma_min"},
        {"prediction_type": "flow_prediction"},
        {"timestep_spacing": "spaced"},
    ],
)
def test_from_diffusers_rejects_unknown_or_unsupported(bad):
    with pytest.raises(ValueError):
        ScheduleConfig.from_diffusers({**SD15_JSON, **bad})


def test_zero_snr_refused_where_diffusers_would_drop_it():
    config = dataclasses.replace(ScheduleConfig.sd15(), rescale_betas_zero_snr=True)
    config.resolve("DDIMScheduler")
    with pytest.raises(ValueError):
        config.resolve("PNDMScheduler")


# ---------------------------------------------------------------- training side


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
)
def test_noise_schedule_matches_ddpm(overrides):
    config = dataclasses.replace(ScheduleConfig.sd15(), **overrides)
    reference = diffusers.DDPMScheduler.from_config(config.to_diffusers())
    schedule = NoiseSchedule.from_config(config)
    # Zero-SNR betas are 1 - ratios of neighbouring alpha_bars: a cancellation that turns ULP
    # differences of the inputs into ~1e-4 relative ones; the alpha_bars themselves stay tight.
    betas_atol = 1e-5 if config.rescale_betas_zero_snr else 0.0
    np.testing.assert_allclose(
        schedule.betas, reference.betas.numpy(), rtol=SCHEDULE_RTOL, atol=betas_atol
    )
    np.testing.assert_allclose(
        schedule.alphas_cumprod,
        reference.alphas_cumprod.numpy(),
        rtol=SCHEDULE_RTOL,
        atol=1e-7,
    )
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 500, 999])
    expected = reference.add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    assert_close(add_noise_jit(schedule, x0, noise, t), expected.numpy(), "add_noise")
    expected_v = reference.get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    assert_close(schedules.velocity(schedule, x0, noise, t), expected_v.numpy(), "velocity")


@jax.jit
def add_noise_jit(schedule, x0, noise, t):
    return schedules.add_noise(schedule, x0, noise, t)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_to_x0_and_eps_inverts_the_forward_process(prediction_type):
    schedule = NoiseSchedule.from_config(
        dataclasses.replace(ScheduleConfig.sd15(), prediction_type=prediction_type)
    )
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
    t = jnp.array([10, 400, 900])
    x_t = schedules.add_noise(schedule, x0, eps, t)
    target = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": schedules.velocity(schedule, x0, eps, t),
    }[prediction_type]
    x0_hat, eps_hat = schedules.model_output_to_x0_eps(schedule, target, x_t, t)
    assert_close(x0_hat, x0, "x0")
    assert_close(eps_hat, eps, "eps")


def test_noise_schedule_keeps_bf16():
    schedule = NoiseSchedule.from_config(ScheduleConfig.sd15())
    x0 = jnp.ones((2, 4), jnp.bfloat16)
    out = schedules.add_noise(schedule, x0, x0, jnp.array([1, 2]))
    assert out.dtype == jnp.bfloat16


# ---------------------------------------------------------------- inference timesteps and sigmas

SIGMA_OPTIONS = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}


def reference_scheduler(sampler, config, monkeypatch, sigmas="default"):
    class_name, extra = SCHEDULER_OF[sampler]
    cls = diffusers_class(class_name, monkeypatch)
    return cls.from_config({**config.to_diffusers(), **extra, **SIGMA_OPTIONS.get(sigmas, {})})


def compare_plan(plan, ref, what):
    """Plan arrays vs a diffusers scheduler after set_timesteps."""
    name = plan.sampler
    ts = ref.timesteps.numpy().astype(np.float64)
    c = {k: np.asarray(v) for k, v in plan.coeffs.items()}
    close = dict(rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL)
    t_close = dict(rtol=SCHEDULE_RTOL, atol=TIMESTEP_ATOL)
    if name in ("heun", "dpm2", "dpm2_a", "dpmpp_sde"):  # diffusers interleaves two evaluations
        np.testing.assert_allclose(plan.timesteps, ts[0::2], err_msg=what, **t_close)
        np.testing.assert_allclose(c["t_mid"][:-1], ts[1::2], err_msg=what, **t_close)
        n = plan.num_steps
        np.testing.assert_allclose(c["sigma"], ref.sigmas.numpy()[0::2][:n], err_msg=what, **close)
        if name == "dpm2":
            mid = ref.sigmas_interpol.numpy()[1::2][:n]
            np.testing.assert_allclose(c["sigma_mid"], mid, err_msg=what, **close)
        if name == "dpm2_a":
            for key, ref_key in [("sigma_mid", "sigmas_interpol"), ("sigma_up", "sigmas_up")]:
                values = getattr(ref, ref_key).numpy()[0::2][:n]
                np.testing.assert_allclose(c[key], values, err_msg=what, **close)
    else:
        np.testing.assert_allclose(plan.timesteps, ts, err_msg=what, **t_close)
        if "sigma" in c:
            sigmas = ref.sigmas.numpy()
            np.testing.assert_allclose(c["sigma"], sigmas[:-1], err_msg=what, **close)
    np.testing.assert_allclose(
        float(plan.init_noise_sigma), float(ref.init_noise_sigma), rtol=SCHEDULE_RTOL
    )


@pytest.mark.parametrize("sampler", sorted(SCHEDULER_OF))
@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_and_sigmas_match_diffusers(sampler, spacing, steps_offset, monkeypatch):
    config = dataclasses.replace(
        ScheduleConfig.sd15(), timestep_spacing=spacing, steps_offset=steps_offset
    )
    spec = samplers.get_sampler(sampler)
    for sigmas in spec.sigma_schedules:
        if sigmas != "default" and sampler == "euler_a":
            continue  # EulerAncestralDiscreteScheduler has no Karras / exponential sigmas
        ref = reference_scheduler(sampler, config, monkeypatch, sigmas)
        for steps in (4, 10, 25):
            ref.set_timesteps(steps)
            plan = samplers.make_plan(config, sampler, steps, sigmas=sigmas)
            compare_plan(plan, ref, f"{sampler} {spacing} offset={steps_offset} {steps} {sigmas}")


def test_sigma_schedule_from_config_flags(monkeypatch):
    config = dataclasses.replace(ScheduleConfig.sd15(), use_karras_sigmas=True)
    ref = reference_scheduler("euler", config, monkeypatch)
    ref.set_timesteps(12)
    compare_plan(samplers.make_plan(config, "euler", 12), ref, "karras from config")
    with pytest.raises(ValueError):
        samplers.make_plan(ScheduleConfig.sd15(), "ddim", 12, sigmas="karras")


# ---------------------------------------------------------------- img2img start


@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler", "heun", "dpm2", "dpmpp_2m", "unipc"])
def test_img2img_start_matches_pipeline(sampler, monkeypatch):
    config = ScheduleConfig.sd15()
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for steps, strength in [(10, 0.75), (25, 0.3), (20, 1.0), (7, 0.5), (30, 0.99)]:
        ref = reference_scheduler(sampler, config, monkeypatch)
        ref.set_timesteps(steps)
        pipe = SimpleNamespace(scheduler=ref)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
        plan = samplers.make_plan(config, sampler, steps, strength=strength)
        ts = timesteps.numpy().astype(np.float64)
        expected_ts = ts[0::2] if ref.order == 2 else ts
        np.testing.assert_allclose(plan.timesteps, expected_ts, rtol=SCHEDULE_RTOL)
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
        actual = samplers.img2img_latents(plan, jnp.asarray(x0), jnp.asarray(noise))
        assert_close(actual, expected.numpy(), f"{sampler} img2img start {steps} {strength}")


def test_img2img_strength_out_of_range():
    with pytest.raises(ValueError):
        schedules.img2img_t_start(10, 1.5)
