"""One pool of host threads for work that releases the GIL while it runs: numpy filling random
arrays (`jaxdiff.models.build.random_params`) and copying loaded kernels out of PyTorch's layouts
(`jaxdiff.convert.diffusers.host_array`), and PIL decoding and resizing images
(`jaxdiff.train.data`). Sized to the cores this process may run on, at most 32."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return ThreadPoolExecutor(min(32, cores), thread_name_prefix="jaxdiff-worker")


def parallel_map(fn: Callable, *iterables: Iterable) -> list:
    """`list(map(fn, *iterables))`, in order, on the pool. `fn` must not call `parallel_map`
    itself (a full pool would wait on itself)."""
    return list(_pool().map(fn, *iterables))
