"""Reading and writing the `config.json` of diffusers and transformers models as frozen dataclasses.

A config read from disk becomes its dataclass at once. A field jaxdiff does not know fails loudly,
and so does a known field whose value selects an architecture jaxdiff does not implement: a
silently misread config would give wrong images, not an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A model config that jaxdiff cannot represent exactly."""


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def from_dict(
    cls,
    raw: dict[str, Any],
    *,
    what: str,
    fixed: dict[str, Any] | None = None,
    ignored: frozenset[str] = frozenset(),
    more_ignored: Callable[[], frozenset[str]] | None = None,
):
    """Build dataclass `cls` from a config dict.

    fixed: fields the reference classes have but jaxdiff supports only at one value (their default).
    ignored: fields that do not change the computation (bookkeeping, training-only settings).
    more_ignored: further such fields, asked for only when a key is none of the above (the
    answer may cost an import).
    Keys starting with '_' (`_class_name`, `_diffusers_version`, ...) are bookkeeping.
    """
    fixed = fixed or {}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key not in names and key not in fixed and more_ignored is not None:
            ignored = ignored | more_ignored()
            more_ignored = None
            if key in ignored:
                continue
        if key in fixed:
            if _freeze(value) != _freeze(fixed[key]):
                raise ConfigError(
                    f"{what}: {key}={value!r} is not supported by jaxdiff (only {fixed[key]!r})"
                )
            continue
        if key not in names:
            raise ConfigError(f"{what}: unknown config field {key!r}")
        kwargs[key] = _freeze(value)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{what}: {e}") from None


def to_dict(config, *, class_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as the reference library writes it (lists, `_class_name` first)."""
    out: dict[str, Any] = {"_class_name": class_name}
    out.update(extra or {})
    for f in dataclasses.fields(config):
        out[f.name] = _thaw(getattr(config, f.name))
    return out


def per_block(value, n: int, what: str) -> tuple:
    """A per-block setting given as one value or as one value per block."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"{what} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n
