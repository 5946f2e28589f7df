"""Noise schedules of the Stable Diffusion family: betas, alphas, sigmas and inference timesteps.

Two sides of one schedule live here:

* training: `NoiseSchedule`, a frozen pytree of float32 arrays indexed by the integer training
  timestep, with `add_noise`, `velocity` and `to_x0_and_eps` (pure functions, jit-friendly);
* inference: host-side numpy that reproduces exactly how each diffusers scheduler turns a step
  count into timesteps and sigmas (`leading` / `linspace` / `trailing` spacing, `steps_offset`,
  Karras and exponential sigmas). The step count is a shape anyway, so these run once on the host;
  `jaxdiff.samplers.make_plan` turns their output into the arrays that jitted code receives.

`ScheduleConfig` is built from a diffusers `scheduler_config.json` the way diffusers'
`from_config` keeps fields: a key the file leaves out takes the default of the diffusers class
that is being imitated (`resolve`), which differs between classes (e.g. `timestep_spacing` is
"leading" for DDIM but "linspace" for Euler).

References:
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM), arXiv:2006.11239.
    Nichol, Dhariwal 2021, "Improved DDPM" (squaredcos_cap_v2 betas), arXiv:2102.09672.
    Salimans, Ho 2022, "Progressive Distillation" (v-prediction), arXiv:2202.00512.
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models" (sigma parameterization, rho=7 sigmas), arXiv:2206.00364.
    Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"
        (zero terminal SNR, trailing spacing), arXiv:2305.08891.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
SIGMA_SCHEDULES = ("default", "karras", "exponential")

# Defaults of the diffusers classes we imitate, for the keys whose default differs between
# classes. A key absent from a config dict takes these (tests check them against diffusers).
# `None` in a row: the class has no such argument (diffusers drops the key).
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="leading",
        set_alpha_to_one=True,
        clip_sample=True,
    ),
    "DDPMScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="leading",
        set_alpha_to_one=None,
        clip_sample=True,
    ),
    "PNDMScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="leading",
        set_alpha_to_one=False,
        clip_sample=None,
    ),
    "LMSDiscreteScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "EulerDiscreteScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "EulerAncestralDiscreteScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "HeunDiscreteScheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=False,
    ),
    "KDPM2DiscreteScheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "KDPM2AncestralDiscreteScheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "DPMSolverMultistepScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "DPMSolverSDEScheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "UniPCMultistepScheduler": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=None,
        clip_sample=None,
    ),
    "LCMScheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        set_alpha_to_one=True,
        clip_sample=False,
    ),
}

# Classes that accept `rescale_betas_zero_snr`; the others would silently drop it in diffusers,
# so jaxdiff refuses the combination instead.
ZERO_SNR_CLASSES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
)

# Keys of a diffusers scheduler config that are read into ScheduleConfig fields.
_FIELD_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "original_inference_steps",
    "timestep_scaling",
)
# Keys ignored on purpose. Bookkeeping: `_class_name`, `_diffusers_version`,
# `_use_default_values`. Solver choices, which in jaxdiff the sampler *name* makes (the name
# fixes the algorithm and its order): `skip_prk_steps`, `solver_order`, `algorithm_type`,
# `solver_type`, `predict_x0`, `solver_p`, `disable_corrector`, `euler_at_final`,
# `noise_sampler_seed`. Parameters of features that another key switches off (checked there):
# `dynamic_thresholding_ratio`, `sample_max_value` (thresholding), `flow_shift`,
# `time_shift_type`, `base_shift`, `max_shift`, `base_image_seq_len`, `max_image_seq_len`
# (flow sigmas / dynamic shifting).
IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_use_default_values",
        "skip_prk_steps",
        "solver_order",
        "algorithm_type",
        "solver_type",
        "predict_x0",
        "solver_p",
        "disable_corrector",
        "euler_at_final",
        "noise_sampler_seed",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "flow_shift",
        "time_shift_type",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
    }
)
# Keys accepted only at the value that jaxdiff implements (the diffusers default); any other
# value is a feature jaxdiff lacks, so it fails loudly instead of being misread.
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "variance_type": (None, "fixed_small"),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_dynamic_shifting": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "lambda_min_clipped": (-math.inf,),
    "lower_order_final": (True,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "shift_terminal": (None,),
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The fields of a diffusers scheduler config that shape the noise schedule.

    `None` means "not given": `resolve(class_name)` fills it with that diffusers class's default.
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    original_inference_steps: int = 50  # LCM: the teacher's step count the timesteps skip along
    timestep_scaling: float = 10.0  # LCM: consistency boundary condition scaling

    def __post_init__(self):
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("prediction_type", PREDICTION_TYPES),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas are exclusive")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> ScheduleConfig:
        """Reads a diffusers `scheduler_config.json` dict; unknown or unsupported keys raise.

        Keys an in-memory diffusers config lists in `_use_default_values` were never given by
        the user; diffusers' `from_config` drops them (the new class uses its own defaults), and
        so does this.
        """
        kwargs = {}
        defaulted = set(config.get("_use_default_values", ()))
        for key, value in config.items():
            if key in defaulted or key == "_use_default_values":
                continue
            if key in _FIELD_KEYS:
                kwargs[key] = value
            elif key in REQUIRED_VALUES:
                if value not in REQUIRED_VALUES[key]:
                    raise ValueError(
                        f"scheduler config {key}={value!r} is not implemented by jaxdiff "
                        f"(supported: {REQUIRED_VALUES[key]})"
                    )
            elif key not in IGNORED_KEYS:
                raise ValueError(
                    f"unknown scheduler config key {key!r}; known: "
                    f"{sorted(_FIELD_KEYS + tuple(REQUIRED_VALUES) + tuple(IGNORED_KEYS))}"
                )
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The fields that differ from this dataclass's defaults, as a diffusers config dict."""
        defaults = ScheduleConfig()
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }
        if self.trained_betas is not None:
            out["trained_betas"] = list(self.trained_betas)
        return out

    def resolve(self, class_name: str = "DDPMScheduler") -> ScheduleConfig:
        """Fills the fields left `None` with the defaults of diffusers class `class_name`."""
        if class_name not in DIFFUSERS_DEFAULTS:
            raise ValueError(f"unknown diffusers class {class_name!r}")
        if self.rescale_betas_zero_snr and class_name not in ZERO_SNR_CLASSES:
            raise ValueError(
                f"{class_name} has no rescale_betas_zero_snr (diffusers would drop it)"
            )
        defaults = DIFFUSERS_DEFAULTS[class_name]
        filled = {k: d for k, d in defaults.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **filled)
        # Classes without the argument behave as if it were off.
        if out.clip_sample is None:
            out = dataclasses.replace(out, clip_sample=False)
        if out.set_alpha_to_one is None:
            out = dataclasses.replace(out, set_alpha_to_one=False)
        return out

    @classmethod
    def sd15(cls) -> ScheduleConfig:
        """Stable Diffusion 1.x (and 2.x base, 512 px): epsilon prediction."""
        return cls(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="epsilon",
        )

    @classmethod
    def sd21_v(cls) -> ScheduleConfig:
        """Stable Diffusion 2.x at 768 px: v-prediction, otherwise as SD 1.x."""
        return dataclasses.replace(cls.sd15(), prediction_type="v_prediction")


# ---------------------------------------------------------------- betas and alphas (host numpy)


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, as diffusers' `betas_for_alpha_bar`."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last one is 0."""
    # float32 step by step as diffusers (in float64 the betas would differ by ~1e-4 relative).
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def betas_from_config(config: ScheduleConfig) -> np.ndarray:
    """[T] float32 betas as diffusers builds them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise ValueError(f"beta_schedule {config.beta_schedule!r} (resolve the config first)")
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_config(config: ScheduleConfig) -> np.ndarray:
    """[T] float32 cumulative products of (1 - beta)."""
    # torch's CPU cumprod accumulates float32 in float64; doing the same matches it bit for bit.
    return np.cumprod(1.0 - betas_from_config(config).astype(np.float64)).astype(np.float32)


def train_sigmas(config: ScheduleConfig) -> np.ndarray:
    """[T] float32 sigma_t = sqrt((1 - alpha_bar) / alpha_bar), by training timestep."""
    alphas_cumprod = alphas_cumprod_from_config(config)
    if config.rescale_betas_zero_snr:
        # As diffusers' sigma schedulers: a finite sigma_max instead of infinity.
        alphas_cumprod[-1] = 2.0**-24
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)


# ---------------------------------------------------------------- training side (jit-friendly)


@struct.dataclass
class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""

    betas: jax.Array  # [T] float32
    alphas_cumprod: jax.Array  # [T] float32, alpha_bar_t
    sqrt_alphas_cumprod: jax.Array  # [T] float32, signal scale alpha_t
    sqrt_one_minus_alphas_cumprod: jax.Array  # [T] float32, noise scale sigma_t
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def from_config(cls, config: ScheduleConfig, class_name: str = "DDPMScheduler"):
        config = config.resolve(class_name)
        betas = betas_from_config(config)
        alphas_cumprod = alphas_cumprod_from_config(config)
        return cls(
            betas=jnp.asarray(betas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            sqrt_alphas_cumprod=jnp.asarray(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1 - alphas_cumprod)),
            prediction_type=config.prediction_type,
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def _per_sample(values: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcastable against `like` ([B, ...])."""
    values = jnp.reshape(values, (-1,))
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _scales(schedule: NoiseSchedule, x: jax.Array, t: jax.Array):
    alpha_t = _per_sample(schedule.sqrt_alphas_cumprod[t], x)
    sigma_t = _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x)
    return alpha_t, sigma_t


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array):
    """x_t = alpha_t x_0 + sigma_t eps; x0, noise: [B, ...]; t: [B] (or scalar) int timesteps."""
    alpha_t, sigma_t = _scales(schedule, x0, t)
    # Schedule math in float32: bf16 would round alpha_t near 1 and sigma_t near 0.
    noisy = alpha_t * x0.astype(jnp.float32) + sigma_t * noise.astype(jnp.float32)
    return noisy.astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array):
    """The v-prediction target v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)."""
    alpha_t, sigma_t = _scales(schedule, x0, t)
    # float32 for the same reason as add_noise.
    v = alpha_t * noise.astype(jnp.float32) - sigma_t * x0.astype(jnp.float32)
    return v.astype(x0.dtype)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
    alphas_cumprod = schedule.alphas_cumprod[t]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def to_x0_and_eps(model_output, x_t, alpha_t, sigma_t, prediction_type: str):
    """(x0, eps) from a model output of any prediction type, where x_t = alpha_t x0 + sigma_t eps.

    alpha_t, sigma_t broadcast against x_t; v-prediction assumes alpha_t^2 + sigma_t^2 = 1.
    The formulas (and their order of operations) are diffusers' DDIM / DPM-Solver ones.
    """
    if prediction_type == "epsilon":
        x0 = (x_t - sigma_t * model_output) / alpha_t
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha_t * x0) / sigma_t
    elif prediction_type == "v_prediction":
        x0 = alpha_t * x_t - sigma_t * model_output
        eps = alpha_t * model_output + sigma_t * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return x0, eps


def model_output_to_x0_eps(schedule: NoiseSchedule, model_output, x_t, t):
    """Training-side convenience: `to_x0_and_eps` at integer timesteps t ([B])."""
    alpha_t, sigma_t = _scales(schedule, x_t, t)
    x0, eps = to_x0_and_eps(
        model_output.astype(jnp.float32),
        x_t.astype(jnp.float32),
        alpha_t,
        sigma_t,
        schedule.prediction_type,
    )
    return x0.astype(x_t.dtype), eps.astype(x_t.dtype)


# ---------------------------------------------------------------- inference timesteps (host)


def discrete_timesteps(config: ScheduleConfig, steps: int) -> np.ndarray:
    """[steps] int64 descending, as DDIMScheduler / DDPMScheduler / PNDMScheduler space them."""
    n_train = config.num_train_timesteps
    if steps > n_train:
        raise ValueError(f"steps={steps} > num_train_timesteps={n_train}")
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // steps
        return (np.arange(steps) * ratio)[::-1].astype(np.int64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        ratio = n_train / steps
        return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {config.timestep_spacing!r} (resolve the config first)")


def sigma_timesteps(config: ScheduleConfig, steps: int) -> np.ndarray:
    """[steps] float descending, as Euler / Heun / LMS / KDPM2 / DPMSolverSDE space them.

    Unlike `discrete_timesteps`, "linspace" is not rounded (fractional timesteps).
    """
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = n_train // steps
        out = (np.arange(steps) * ratio).round()[::-1].astype(np.float32)
        return out + np.float32(config.steps_offset)
    if config.timestep_spacing == "trailing":
        ratio = n_train / steps
        return np.arange(n_train, 0, -ratio).round().astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing {config.timestep_spacing!r} (resolve the config first)")


def multistep_timesteps(config: ScheduleConfig, steps: int) -> np.ndarray:
    """[steps] int64 descending, as DPMSolverMultistep / UniPCMultistep space them (N+1 grid)."""
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // (steps + 1)
        out = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        return out + config.steps_offset
    if config.timestep_spacing == "trailing":
        ratio = n_train / steps
        return np.arange(n_train, 0, -ratio).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {config.timestep_spacing!r} (resolve the config first)")


def lcm_timesteps(config: ScheduleConfig, steps: int, strength: float = 1.0) -> np.ndarray:
    """[steps] int64 descending, as LCMScheduler picks them from the teacher's schedule.

    strength < 1 (img2img) keeps the first `original_inference_steps * strength` teacher steps,
    as `LCMScheduler.set_timesteps(strength=...)`: LCM img2img still runs all `steps`.
    """
    original = config.original_inference_steps
    k = config.num_train_timesteps // original
    origin = np.arange(1, int(original * strength) + 1) * k - 1
    if steps > original or len(origin) // steps < 1:
        raise ValueError(
            f"LCM steps={steps} must be <= original_inference_steps x strength "
            f"= {int(original * strength)}"
        )
    origin = origin[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0):
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int):
    """Sigmas evenly spaced in log sigma, descending."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def inference_sigmas(
    config: ScheduleConfig, timesteps: np.ndarray, sigma_schedule: str, *, ascending_source=False
):
    """Interpolated sigmas at `timesteps`, optionally replaced by Karras / exponential ones.

    Returns (sigmas [N] float64 without the final 0, timesteps [N], log_sigmas [T]). The new
    timesteps of Karras / exponential sigmas are unrounded `sigma_to_t` (callers round where
    their diffusers class does). `ascending_source` picks the sigma range the way DPMSolver /
    UniPC do (from the full training sigmas) instead of from the interpolated ones; both give
    the same end points for the usual spacings.
    """
    base = train_sigmas(config)
    log_sigmas = np.log(base)
    interp = np.interp(timesteps, np.arange(len(base)), base)
    if sigma_schedule == "default":
        return interp, timesteps, log_sigmas
    source = np.flip(base) if ascending_source else interp
    sigma_min, sigma_max = float(source[-1]), float(source[0])
    if sigma_schedule == "karras":
        sigmas = karras_sigmas(sigma_min, sigma_max, len(timesteps))
    elif sigma_schedule == "exponential":
        sigmas = exponential_sigmas(sigma_min, sigma_max, len(timesteps))
    else:
        raise ValueError(f"sigma schedule {sigma_schedule!r}; expected one of {SIGMA_SCHEDULES}")
    return sigmas, sigma_to_t(sigmas, log_sigmas), log_sigmas


def img2img_t_start(steps: int, strength: float) -> int:
    """How many of `steps` img2img skips, as StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)
