"""JAX's persistent compilation cache in the user's cache folder.

A second run of the same command (same model, batch, size, steps, sampler) loads the compiled
program instead of compiling it again. The folder is $JAXDIFF_CACHE_DIR, else
$XDG_CACHE_HOME/jaxdiff/xla (~/.cache/jaxdiff/xla); JAXDIFF_CACHE_DIR=off turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    env = os.environ.get("JAXDIFF_CACHE_DIR")
    if env == "off":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxdiff" / "xla"


def enable() -> Path | None:
    import jax

    path = cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program that took noticeable time to compile, whatever its size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
