"""The small text-to-image model that ships with jaxdiff (used when no --model is given)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from jaxdiff.convert.diffusers import WeightsError


def bundled_model_dir() -> Path:
    path = Path(str(resources.files("jaxdiff") / "assets" / "shapes-model"))
    if not (path / "model_index.json").is_file():
        raise WeightsError(
            "this jaxdiff build ships no bundled model yet; pass --model DIR (a diffusers folder)"
        )
    return path
