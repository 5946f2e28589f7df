"""Training: config, state, losses, the pure train step, the loop, data, and export.

from jaxdiff.train import TrainConfig, load_config, train, export, train_step
"""

from jaxdiff.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from jaxdiff.train.loop import export, maybe_initialize_distributed, train
from jaxdiff.train.state import TrainSetup, TrainState
from jaxdiff.train.step import jit_train_step, train_step

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainSetup",
    "TrainState",
    "apply_overrides",
    "export",
    "jit_train_step",
    "load_config",
    "maybe_initialize_distributed",
    "train",
    "train_step",
]
