"""The training config: one frozen dataclass, read from a Python file in `configs/`.

A config file defines `get_config() -> TrainConfig` (usually `dataclasses.replace` of
`configs/common.py`'s base). `--set key=value` overrides are typed at the boundary: the value is
parsed as the field's type (`int`, `float`, `bool`, `str`, or a Python literal for tuples and
dicts); `unet.block_out_channels=(16, 32)` sets one entry of a dict field. An unknown key or a
value of the wrong type fails at once with one line naming it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

from jaxdiff.pipelines.stable_diffusion import MAX_SEED
from jaxdiff.sharding import DEFAULT_MIN_SHARD_SIZE, DEFAULT_RULES

TASKS = ("unet", "vae")
LR_SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
PREDICTION_TYPES = ("", "epsilon", "v_prediction", "sample")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line."""


AT_LEAST_ONE = ("steps", "checkpoint_every", "keep_checkpoints", "batch_size", "grad_accum")
AT_LEAST_ONE += ("resolution", "sample_steps", "num_samples")
# Fields that are off at 0 or count something: never negative.
NON_NEGATIVE = (
    "learning_rate",
    "weight_decay",
    "adam_eps",
    "grad_clip",
    "min_snr_gamma",
    "offset_noise",
    "kl_weight",
    "warmup_steps",
    "sample_every",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train.
    task: str = "unet"  # "unet": the diffusion model; "vae": the autoencoder
    model: str = "tiny"  # a preset name (random weights) or a diffusers folder to start from
    unet: dict = dataclasses.field(default_factory=dict)  # UNetConfig fields to override
    vae: dict = dataclasses.field(default_factory=dict)  # VAEConfig fields to override
    train_text_encoder: bool = False  # else the text encoder is frozen
    # Parameters of the trained components that stay fixed, as "/"-joined path prefixes: their
    # gradients are dropped and the optimizer leaves them as they are (no weight decay). E.g.
    # ("vae/encoder", "vae/quant_conv") fine-tunes a VAE's decoder only, as Stability's
    # ft-MSE VAE was: the latents stay the same, so a UNet trained on them keeps working.
    freeze_params: tuple = ()

    # Data: a folder of images with captions (see jaxdiff.train.data).
    data_dir: str = ""
    resolution: int = 32
    random_flip: bool = True
    cache_latents: bool = False  # encode the dataset once with the frozen VAE
    caption_dropout: float = 0.1  # rate of empty captions, for classifier-free guidance

    # The diffusion objective.
    prediction_type: str = ""  # "" = the scheduler config's
    # Train on the zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr; Lin et al.
    # 2024): at t = T the input is pure noise, as at sampling time, so the model must take the
    # layout from the text. Needs v_prediction; the export writes it into the scheduler config.
    rescale_betas_zero_snr: bool = False
    min_snr_gamma: float = 0.0  # Min-SNR weighting (Hang et al. 2023); 0 = off
    offset_noise: float = 0.0  # scale of per-channel offset noise; 0 = off
    # Timestep sampling (diffusers' --timestep_bias_*): "later" draws the noisiest
    # `timestep_bias_portion` of the timesteps `timestep_bias_multiplier` times as often as the
    # rest ("earlier": the least noisy); "none" is uniform.
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25

    # The VAE objective: reconstruction MSE + kl_weight * KL.
    kl_weight: float = 1e-6

    # Optimization: AdamW, warmup then constant or cosine, global-norm clipping.
    steps: int = 100  # optimizer updates
    # The cosine schedule's length (0 = steps): a run may stop early inside a longer schedule and
    # be continued as a new stage, reproducibly.
    schedule_steps: int = 0
    batch_size: int = 8  # global, per optimizer update
    grad_accum: int = 1  # micro-batches per update (batch_size / grad_accum each)
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: final learning rate / peak
    weight_decay: float = 1e-2  # on kernels and embeddings only
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = off
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step))

    # Precision and memory.
    compute_dtype: str = "float32"  # master weights are always float32
    remat: bool = False  # rematerialize UNet/VAE blocks in the backward pass

    # Sharding: a (data, fsdp) mesh; -1 takes the remaining devices.
    mesh_data: int = -1
    mesh_fsdp: int = 1
    logical_axis_rules: tuple = DEFAULT_RULES
    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE

    # Bookkeeping.
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    sample_every: int = 0  # 0 = no sample grids
    # Prompts of the sample grid, rendered with the text-to-image pipeline; empty = one-step
    # denoising previews of training images instead.
    sample_prompts: tuple = ()
    sample_steps: int = 20
    num_samples: int = 4

    def __post_init__(self):
        for name, allowed in (
            ("task", TASKS),
            ("lr_schedule", LR_SCHEDULES),
            ("compute_dtype", COMPUTE_DTYPES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_bias_strategy", TIMESTEP_BIAS_STRATEGIES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout={self.caption_dropout} is not in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} is not in [0, 1)")
        if self.timestep_bias_multiplier <= 0 or not 0 < self.timestep_bias_portion <= 1:
            raise ConfigError(
                f"timestep_bias_multiplier={self.timestep_bias_multiplier} must be > 0 and "
                f"timestep_bias_portion={self.timestep_bias_portion} in (0, 1]"
            )
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "rescale_betas_zero_snr=True needs prediction_type='v_prediction' "
                "(epsilon is undefined at zero SNR)"
            )
        if not all(isinstance(p, str) and p.strip("/") for p in self.freeze_params):
            raise ConfigError(
                f"freeze_params={self.freeze_params!r}: expected a tuple of parameter path "
                "prefixes such as ('vae/encoder',)"
            )
        if self.schedule_steps < 0:
            raise ConfigError(f"schedule_steps={self.schedule_steps} must be >= 0 (0 = steps)")
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        # A nan or inf learning rate (or any other) diverged at the first step, after compiling.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value} must be a finite number")
        for name in NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is not in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} is not in [0, 1]")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed={self.seed} must be in [0, {MAX_SEED}]")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """From `to_dict` (or its JSON): lists become tuples again where the field is a tuple."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**{k: _coerce(v, hints[k], k) for k, v in raw.items()})


# ----------------------------------------------------------------------------- typing at the boundary


def _tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _coerce(value, hint, key: str):
    """`value` (text from the command line, or decoded JSON) as the type `hint`."""
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}={value!r} is not a boolean")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not a boolean")
    if origin in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = origin(value) if isinstance(value, str) else value
            if origin is int and (not isinstance(number, int) or isinstance(number, bool)):
                raise ValueError
            return origin(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not {origin.__name__}") from None
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is not a string")
        return value
    if origin in (tuple, dict):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key}={value!r} is not a Python literal") from None
        value = _tuples(value)
        if not isinstance(value, origin):
            raise ConfigError(f"{key}={value!r} is not a {origin.__name__}")
        return value
    return value


def _literal(text: str):
    try:
        return _tuples(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`["key=value", "unet.field=value", ...]` applied in order, each typed by its field."""
    hints = typing.get_type_hints(TrainConfig)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        head, _, sub = key.partition(".")
        if head not in hints:
            raise ConfigError(f"--set {key}: unknown config key {head!r}")
        if sub:
            if typing.get_origin(hints[head]) is not dict and hints[head] is not dict:
                raise ConfigError(f"--set {key}: {head!r} has no fields")
            value = {**getattr(config, head), sub: _literal(text)}
        else:
            value = _coerce(text, hints[head], key)
        try:
            config = dataclasses.replace(config, **{head: value})
        except ConfigError as e:
            raise ConfigError(f"--set {key}: {e}") from None
    return config


def load_config(path, overrides: list[str] = ()) -> TrainConfig:
    """Runs the config file's `get_config()`; its folder is importable (for `import common`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    name = f"_jaxdiff_config_{path.stem}"
    try:
        # Read as Python source whatever its suffix (a spec from the file name alone needs .py).
        loader = importlib.machinery.SourceFileLoader(name, str(path))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
        loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: defines no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # a broken config file: name it in one line
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig")
    return apply_overrides(config, list(overrides))
