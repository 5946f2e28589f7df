"""Defaults every training config starts from; a config overrides only what differs.

Not a config itself: `configs/tiny.py` and friends `import common` and `dataclasses.replace`
its `base()`.
"""

from jaxdiff.train.config import TrainConfig


def base(**overrides) -> TrainConfig:
    """AdamW 1e-4, constant schedule, grad clip 1, EMA 0.999, float32, checkpoints every 100."""
    return TrainConfig(**overrides)
