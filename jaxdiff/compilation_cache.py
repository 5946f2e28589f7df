"""JAX's persistent compilation cache in the user's cache folder.

A second run of the same command (same model, batch, size, steps, sampler; for training, the
same config, so also a resume after a crash or preemption) loads the compiled programs instead
of compiling them again. The folder is $JAXDIFF_CACHE_DIR, else $XDG_CACHE_HOME/jaxdiff/xla
(~/.cache/jaxdiff/xla); JAXDIFF_CACHE_DIR=off turns it off. The same folder keeps converted
tokenizers (`jaxdiff.tokenizer`, in `tokenizers/`) and models' parameter shapes
(`jaxdiff.models.build.boxed_abstract_params`, in `params/`).

Entries go in a subfolder named after this machine's CPU (`host_tag`). A cached CPU program is
native code for the CPU that compiled it, and JAX's cache key names the platform (`cpu`) but
nothing that shows the CPU's features: on a home folder shared by cluster nodes with different
CPUs, a node could otherwise load a program built for another node's instruction set.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path


def _cpu_identity() -> str:
    """The CPU model and feature flags (Linux's /proc/cpuinfo), else what `platform` knows."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    lines.append(line)
                if not line.strip() and lines:  # the first processor's block is enough
                    break
    except OSError:
        pass
    return "".join(lines) or platform.processor()


def host_tag() -> str:
    """The cache subfolder of this machine: architecture and a hash of its CPU's identity."""
    digest = hashlib.sha256(_cpu_identity().encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def base_dir(base: str | os.PathLike | None = None) -> Path | None:
    """jaxdiff's cache folder, or None when the cache is off: `base` (`jaxdiff bench --cache
    DIR`), else $JAXDIFF_CACHE_DIR, else the user's cache folder. It holds one subfolder of
    compiled programs per CPU (`cache_dir`), the converted tokenizers and parameter shapes."""
    env = os.environ.get("JAXDIFF_CACHE_DIR")
    if base is not None:
        return Path(base)
    if env == "off":
        return None
    if env:
        return Path(env)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "jaxdiff" / "xla"


def cache_dir(base: str | os.PathLike | None = None) -> Path | None:
    """The folder that holds this machine's compiled programs, or None when the cache is off.
    `base` as for `base_dir`."""
    root = base_dir(base)
    return None if root is None else root / host_tag()


def enable(base: str | os.PathLike | None = None) -> Path | None:
    """Turns the cache on for this process (before its first compilation); returns its folder.
    `base` as for `cache_dir`."""
    import jax

    path = cache_dir(base)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run, only without the cache
        print(
            f"jaxdiff: compilation cache off: cannot create {path}: {e.strerror}", file=sys.stderr
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program that took noticeable time to compile, whatever its size (a generation
    # with a progress bar compiles three programs; the smallest, the VAE decode of the tiny
    # bundled model, takes 0.4-0.5 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ----------------------------------------------------------------------------- derived files


def entry_key(text: str, packages: Iterable[str] = (), files: Iterable[Path] = ()) -> str:
    """A key for something derived from `text`, the installed `packages`' versions and the
    contents of `files` (those that exist)."""
    h = hashlib.sha256(text.encode() + b"\n")
    for package in packages:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "none"
        h.update(f"{package} {version}\n".encode())
    for path in files:
        if path.is_file():
            h.update(f"{path.name} {path.stat().st_size}\n".encode() + path.read_bytes())
    return h.hexdigest()[:32]


def memoized(
    kind: str, key: Callable[[], str], compute, *, dump: Callable, load: Callable[[str], object]
):
    """`compute()`, kept as text in jaxdiff's cache folder (`kind/<key()>.json`) for later
    processes (`key` is called only when the cache is on).

    dump(value): the text to keep, or None to keep nothing. load(text): the value back. A
    damaged entry is computed again and replaced; with the cache off, or a cache folder that
    cannot be written, every call computes."""
    from jaxdiff import atomic

    root = base_dir()
    path = None if root is None else root / kind / f"{key()}.json"
    if path is not None and path.is_file():
        try:
            return load(path.read_text(encoding="utf-8"))
        except Exception:  # damaged, or from another version of the format
            pass
    value = compute()
    text = None if path is None else dump(value)
    if text is not None:
        try:
            atomic.write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError:
            pass
    return value
