"""Process settings that make XLA's CPU backend faster, applied by the `jaxdiff` command and
`scripts/benchmark.py` before jax starts (`tune_process`). Measured in docs/benchmarks.md,
session 5; `JAXDIFF_CPU_TUNING=0` turns both off.

**Huge pages.** XLA's CPU runtime allocates each call's temporaries as one block (106 MB for the
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

**Convolutions through Eigen.** jaxlib 0.10 hands single convolutions to YNNPACK; XLA's Eigen
convolutions were as fast or faster at the UNet and VAE shapes measured (up to 2.2x forward and
1.7x with the gradient), except the gradient of the 4-channel input convolution (about 10%
slower, 1 ms). `CPU_XLA_FLAGS` goes into `XLA_FLAGS` unless `XLA_FLAGS` names that option already,
and only for the jaxlib versions it was measured on (`XLA_FLAG_JAXLIB`): XLA stops the process
on an option it does not know.

In your own scripts, call `tune_process()` first thing, before importing jax (it may start the
script again), or set both before starting Python: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib import metadata

OPT_OUT = "JAXDIFF_CPU_TUNING"
RESTARTED = "JAXDIFF_CPU_TUNING_RESTARTED"  # set in the restarted process: never a second restart

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)

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


def tuned_environ(
    environ: Mapping[str, str], glibc: tuple[int, int] | None, thp: str | None
) -> dict[str, str] | None:
    """The environment to start again with, or None where nothing would change."""
    if not _enabled(environ) or glibc is None or glibc < MIN_GLIBC or thp != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if RESTARTED in environ or any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    env[RESTARTED] = "1"  # where glibc drops the variable (a setuid interpreter): no loop
    return env


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, where `tuned_environ` says so.

    The exec starts the program from the top, so call it first thing in an entry point.
    Returns (doing nothing) where the tunable does not apply or the exec fails.
    """
    env = tuned_environ(os.environ, glibc_version(), thp_mode())
    argv = getattr(sys, "orig_argv", None)  # Python 3.10+: with the interpreter's own flags
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return


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
    """Both settings, for a program's entry point: re-execute with huge pages where they apply,
    then add the CPU XLA flags to the environment if jax has not started yet."""
    reexec_with_huge_pages()
    flags = tuned_xla_flags(os.environ, jaxlib_version())
    if flags is not None and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = flags
