"""Training: config, state, losses, the pure train step, the loop, data, and export.

from jaxdiff.train import TrainConfig, load_config, train, export, train_step

The names below load their module on first use: the `jaxdiff` command imports `jaxdiff.train.cli`
to register `train` and `export`, and `jaxdiff generate` should not pay for importing the loop,
optax and orbax (about 0.25 s) that only training needs.
"""

import importlib

_EXPORTS = {
    "ConfigError": "jaxdiff.train.config",
    "TrainConfig": "jaxdiff.train.config",
    "apply_overrides": "jaxdiff.train.config",
    "load_config": "jaxdiff.train.config",
    "export": "jaxdiff.train.loop",
    "maybe_initialize_distributed": "jaxdiff.train.loop",
    "train": "jaxdiff.train.loop",
    "TrainSetup": "jaxdiff.train.state",
    "TrainState": "jaxdiff.train.state",
    "jit_train_step": "jaxdiff.train.step",
    "train_step": "jaxdiff.train.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
