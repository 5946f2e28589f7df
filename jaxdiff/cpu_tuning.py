"""Process settings that make XLA's CPU backend faster, applied by the `jaxdiff` command and
`scripts/benchmark.py` before jax starts (`tune_process`), and one jax setting applied after jax
is imported (`configure_jax`). Measured in docs/benchmarks.md, sessions 5 and 23;
`JAXDIFF_CPU_TUNING=0` turns them all off.

**Huge pages.** XLA's CPU runtime allocates each call's temporaries as one block (99 MB for the
tiny train step) and frees it when the call ends. glibc serves a block that large from a fresh
`mmap` and unmaps it on free, so every call faults in and zeroes every page again: about 26,000
page faults per call. With glibc's `glibc.malloc.hugetlb=1` tunable, glibc asks the kernel for
transparent huge pages on such blocks (one fault per 2 MiB instead of per 4 KiB). glibc reads its
tunables only when a process starts, so the program re-executes itself (`os.execve`: the same
process id, interpreter, flags and arguments) before anything else runs, where all of these hold:

- Linux with glibc 2.35 or later (the first with the tunable);
- transparent huge pages in `madvise` mode (with `always` the kernel already uses them; with
  `never` the tunable does nothing);
- `GLIBC_TUNABLES` does not set `glibc.malloc.hugetlb` already (any value is respected).

**A heap that keeps its memory** (the same restart, on glibc 2.26 or later, where jax runs on
the CPU alone: `cpu_only`; a user's value of either tunable keeps both out). Huge pages cut the
faults, not the kernel's zeroing of every fresh page: the tiny train step's 99 MB of temporaries
cost about 14 ms of system time a call. With `glibc.malloc.mmap_max=0` glibc serves large blocks
from its heap instead of fresh mappings, and with a `glibc.malloc.trim_threshold` that is never
reached it keeps freed memory for the next block: a call's temporaries reuse the last call's
pages. Only the main thread's allocations come from that heap (other threads' arenas still map
blocks over 64 MB afresh), so `configure_jax` has jax run CPU programs on the calling thread
(`jax_cpu_enable_async_dispatch` off) where the tunables are set. The process's resident memory
then stays at its peak rather than shrinking between calls.

**Convolutions through Eigen.** jaxlib 0.10 hands single convolutions to YNNPACK; XLA's Eigen
convolutions were as fast or faster at the UNet and VAE shapes measured (up to 2.2x forward and
1.7x with the gradient), except the gradient of the 4-channel input convolution (about 10%
slower, 1 ms). `CPU_XLA_FLAGS` goes into `XLA_FLAGS` unless `XLA_FLAGS` names that option already,
and only for the jaxlib versions it was measured on (`XLA_FLAG_JAXLIB`): XLA stops the process
on an option it does not know.

In your own scripts, call `tune_process()` first thing, before importing jax (it may start the
script again), and `configure_jax()` after importing jax, before its first computation; or set
the variables before starting Python and the jax option yourself:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`, then
`jax.config.update("jax_cpu_enable_async_dispatch", False)`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from importlib import metadata

OPT_OUT = "JAXDIFF_CPU_TUNING"
RESTARTED = "JAXDIFF_CPU_TUNING_RESTARTED"  # set in the restarted process: never a second restart

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)
# Large blocks from the heap, and freed memory kept there (2**62 bytes: never trimmed).
HEAP_TUNABLES = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", str(2**62)))
MIN_GLIBC_HEAP = (2, 26)  # the first glibc with tunables

CPU_XLA_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
CPU_XLA_FLAGS = f"{CPU_XLA_OPTION}=-individual_convolution"
XLA_FLAG_JAXLIB = ((0, 10),)  # (major, minor) of the jaxlib releases measured


def _enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(OPT_OUT, "1") != "0"


# ----------------------------------------------------------------------------- huge pages


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None (another C library, or not Linux)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether jax will run on the CPU alone: `JAX_PLATFORMS` names only the CPU, or, unset, no
    accelerator plugin is installed (a `jax_plugins` entry point or package, or libtpu)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    if metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def _tunable_names(tunables: str) -> set[str]:
    return {item.split("=")[0] for item in tunables.split(":") if item}


def tuned_environ(
    environ: Mapping[str, str],
    glibc: tuple[int, int] | None,
    thp: str | None,
    cpu: bool = False,
) -> dict[str, str] | None:
    """The environment to start again with, or None where nothing would change: glibc's huge-page
    tunable where transparent huge pages are in `madvise` mode, and the heap's (`HEAP_TUNABLES`)
    where jax runs on the CPU alone (`cpu`). A tunable the user has set is kept, and a user's
    value of either heap tunable keeps both of ours out."""
    if not _enabled(environ) or RESTARTED in environ or glibc is None:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    names = _tunable_names(current)
    add = []
    if glibc >= MIN_GLIBC and thp == "madvise" and TUNABLE not in names:
        add.append(f"{TUNABLE}=1")
    if cpu and glibc >= MIN_GLIBC_HEAP and not names & {name for name, _ in HEAP_TUNABLES}:
        add += [f"{name}={value}" for name, value in HEAP_TUNABLES]
    if not add:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([current, *add] if current else add)
    env[RESTARTED] = "1"  # where glibc drops the variable (a setuid interpreter): no loop
    return env


def reexec_with_tunables() -> None:
    """Replace this process by itself with glibc's tunables set, where `tuned_environ` says so.

    The exec starts the program from the top, so call it first thing in an entry point.
    Returns (doing nothing) where no tunable applies or the exec fails.
    """
    if RESTARTED in os.environ:  # before `cpu_only`'s look at the installed packages
        return
    env = tuned_environ(os.environ, glibc_version(), thp_mode(), cpu_only(os.environ))
    argv = getattr(sys, "orig_argv", None)  # Python 3.10+: with the interpreter's own flags
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def heap_kept(environ: Mapping[str, str]) -> bool:
    """Whether this process started with glibc serving large blocks from its heap
    (`glibc.malloc.mmap_max=0`), ours or the user's."""
    return "glibc.malloc.mmap_max=0" in environ.get("GLIBC_TUNABLES", "").split(":")


def configure_jax() -> None:
    """The jax side of the kept heap, for an entry point after jax is imported and before its
    first computation: where `heap_kept`, XLA's CPU programs run on the calling thread, whose
    allocations come from glibc's main heap, so a call's temporaries reuse the last call's pages.
    jax's option applies to single-device programs only; a program over several CPU devices
    still runs on XLA's threads."""
    if _enabled(os.environ) and heap_kept(os.environ):
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)


# ----------------------------------------------------------------------------- XLA flags


def jaxlib_version() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, without importing it; None if not installed."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def tuned_xla_flags(environ: Mapping[str, str], jaxlib: tuple[int, int] | None) -> str | None:
    """The XLA_FLAGS to run with, or None where nothing would change."""
    current = environ.get("XLA_FLAGS", "")
    if not _enabled(environ) or jaxlib not in XLA_FLAG_JAXLIB or CPU_XLA_OPTION in current:
        return None
    return f"{current} {CPU_XLA_FLAGS}".strip()


def tune_process() -> None:
    """The process settings, for a program's entry point: re-execute with glibc's tunables where
    they apply, then add the CPU XLA flags to the environment if jax has not started yet."""
    reexec_with_tunables()
    flags = tuned_xla_flags(os.environ, jaxlib_version())
    if flags is not None and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = flags
