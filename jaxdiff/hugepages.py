"""Huge pages for XLA's CPU temporaries: the `jaxdiff` command starts itself again, once, with
glibc's `glibc.malloc.hugetlb=1` tunable.

XLA's CPU runtime allocates each call's temporaries as one block (106 MB for the tiny train
step) and frees it when the call ends. glibc serves a block that large from a fresh `mmap` and
unmaps it on free, so every call faults in and zeroes every page again: about 26,000 page faults
and a third of the tiny train step's time on 2 cores (docs/benchmarks.md, sessions 4 and 5).
With the tunable, glibc asks the kernel for transparent huge pages on such blocks (one fault per
2 MiB instead of per 4 KiB).

glibc reads its tunables only when a process starts, so the `jaxdiff` command and
`scripts/benchmark.py` re-execute themselves (`os.execve`: the same process id, arguments and
interpreter flags) before anything else runs, where all of these hold:

- Linux with glibc 2.35 or later (the first with the tunable);
- transparent huge pages in `madvise` mode (with `always` the kernel already uses them; with
  `never` the tunable does nothing);
- `GLIBC_TUNABLES` does not set `glibc.malloc.hugetlb` already (any value is respected);
- `JAXDIFF_HUGETLB` is not `0` (the way to opt out).

In your own scripts, set it yourself: `export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JAXDIFF_HUGETLB"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


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
    if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < MIN_GLIBC or thp != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return env


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, where `tuned_environ` says so.

    Call it first thing in a program's entry point: the exec starts the program from the top.
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
