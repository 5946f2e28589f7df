"""The largest sampling batch one device holds (issue 7): the search, the budget and the row.

Memory comes from XLA's analysis of the compiled program (`harness.memory_of`: arguments +
outputs + temporaries - aliases), so a batch is tried by compiling it, not by running it; on a GPU
each compile of a whole pipeline takes tens of seconds, so the search spends few of them. Memory
is close to linear in the batch once the batch is large enough, and not even monotone at small
ones (the tiny preset at batch 1, 2, 4, 8: 12.9, 12.7, 15.5, 21.5 MB), so the search takes
secant steps on the integers, with doubling and bisection as the safeguard where they stall.
The row then runs the batch it found once, as the proof that it fits.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from jaxdiff.bench.harness import Context, Result, memory_of

# jax's GPU allocator (BFC) takes at most XLA_CLIENT_MEM_FRACTION (formerly
# XLA_PYTHON_CLIENT_MEM_FRACTION; default 0.75) of the device's total memory, and that is the
# `bytes_limit` of `memory_stats()`. The jax docs ("GPU memory allocation") describe the fraction
# as what is preallocated; with XLA_PYTHON_CLIENT_PREALLOCATE=false, as the bench sets it, the pool
# grows on demand but only up to the same limit (XLA logs "will use up to N bytes"). Measured at
# the default, "the largest batch on an 80 GB GPU" would be the largest on 60 GB, so the CLI raises
# the fraction before jax starts when it runs max-batch rows only. 0.95 leaves about 4 GB of an
# 80 GB card outside the pool for the CUDA context, loaded kernels and cuDNN/cuBLAS handles. Not
# with other rows: the pool grows in regions of doubling size up to the limit and keeps them, so a
# larger limit would leave their torch peers less of the device.
MEM_FRACTION = 0.95


class Search(NamedTuple):
    """What `largest_batch` found."""

    batch: int  # the largest batch that fits; 0 when not even batch 1 does
    probes: list[tuple[int, int | None]]  # (batch, bytes) in the order asked; None: no figure
    at_limit: bool  # every batch up to `limit` fits: the true largest may be larger


def largest_batch(
    memory_at: Callable[[int], int | None], budget: int, *, start: int = 8, limit: int = 4096
) -> Search:
    """The largest batch b <= `limit` with `memory_at(b) <= budget`, asking `memory_at` rarely.

    `memory_at(b)` gives the bytes batch b needs, or None where it has no figure because the
    batch does not fit (a compile that ran out of memory). The answer is exact at its boundary:
    b fits and b + 1 was asked and does not (unless b is `limit`, or 0 when batch 1 does not fit).
    Memory is assumed to grow with the batch from the first probes on; below them it may dip, so
    a budget that batch 1 misses but batch 2 meets gives 0.

    The batches asked: `start` (or 1, where `start` does not fit), then the largest batch that
    fits by a line through two probes: the last one and the latest earlier one that makes the
    line rise (a secant step, past any plateau), kept above the largest fitting batch and below
    the smallest failing one. Where there is no such line, or the smallest failing batch has no
    figure, or three probes did not halve the open range, it doubles the largest fitting batch
    (while nothing has failed) or bisects. Where batches above the line's fit twice in a row, it
    goes 2, 4, 8, ... past the line. On a linear memory curve this is four probes: start,
    2 * start, b, b + 1.
    """
    if budget <= 0:
        raise ValueError(f"the memory budget must be > 0 bytes, got {budget}")
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    probes: list[tuple[int, int | None]] = []
    lo, hi = 0, None  # the largest fitting batch probed (0: none yet); the smallest failing one
    widths: list[int] = []  # batches still open after each probe, once one has failed
    misses = 0  # probes in a row above the line's batch that fitted all the same
    batch, beyond_line = start, False
    while True:
        memory = memory_at(batch)
        probes.append((batch, memory))
        fits = memory is not None and memory <= budget
        if fits:
            lo = max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)
        if hi == lo + 1:
            return Search(lo, probes, False)
        if lo == limit:
            return Search(limit, probes, True)
        if lo == 0:  # `start` does not fit: does anything?
            batch = 1
            continue
        misses = misses + 1 if beyond_line and fits else 0
        top = limit if hi is None else hi - 1
        fallback = min(2 * lo, limit) if hi is None else (lo + hi) // 2
        if hi is not None:
            widths.append(hi - lo - 1)
        line = _secant(probes, budget)
        if line is None or (hi is not None and dict(probes)[hi] is None):
            batch, beyond_line = fallback, False
        elif len(widths) > 3 and 2 * widths[-1] > widths[-4]:  # 3 probes did not halve it
            batch, beyond_line = fallback, False
        else:
            # After two misses in a row, go 2, 4, 8, ... past the line (a plateau, a kink).
            batch = min(max(line, lo + 2 ** max(misses - 1, 0)), top)
            beyond_line = batch > line


def _secant(probes: list[tuple[int, int | None]], budget: int) -> int | None:
    """The largest batch that fits by the line through the last probe with a figure and the
    latest earlier one that makes it rise (past a plateau); None where there is no such line."""
    *earlier, (c, memory_c) = [(b, m) for b, m in probes if m is not None]
    rising = [(a, m) for a, m in earlier if (memory_c - m) * (c - a) > 0]
    if not rising:
        return None
    a, memory_a = rising[-1]
    return c + (budget - memory_c) * (c - a) // (memory_c - memory_a)


def device_budget(device, override: int | None = None) -> tuple[int, str]:
    """The bytes one call may take on `device`, and where that figure came from.

    The device's memory is `override` (the command line's --memory-gib) or the allocator's
    `bytes_limit` from `device.memory_stats()`; buffers already in use (another row's, a cached
    model's) are subtracted, since the compiled program's figure counts only its own arguments.
    A device without memory stats (the CPU) needs the override.
    """
    stats = device.memory_stats() or {}
    if override is not None:
        total, source = override, f"--memory-gib ({override / 2**30:.2f} GiB)"
    elif stats.get("bytes_limit"):
        total = stats["bytes_limit"]
        fraction = (
            os.environ.get("XLA_CLIENT_MEM_FRACTION")
            or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
            or "jax's default"
        )
        source = f"memory_stats bytes_limit ({total / 2**30:.2f} GiB, mem fraction {fraction})"
    else:
        raise ValueError(
            f"{device.device_kind} reports no memory limit (memory_stats); give one with "
            "--memory-gib"
        )
    in_use = stats.get("bytes_in_use", 0)
    if in_use:
        source += f" less {in_use / 2**30:.2f} GiB already in use"
    return total - in_use, source


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA running out of device memory (compiling or running)."""
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


CONFIRM_TRIES = 3  # runs at the found batch and, after running out of memory, at smaller ones


def max_batch_sampling(
    ctx: Context,
    preset: str,
    size: int,
    steps: int,
    dtype_name: str,
    row: str,
    *,
    start: int = 8,
    limit: int = 4096,
) -> list[Result]:
    """The largest text-to-image batch (`steps` Euler steps with CFG, `size`x`size`) that one
    device holds, by XLA's memory analysis within `device_budget`, then run once to confirm.

    Random weights at the preset's real sizes, stored in the compute dtype (as the pipeline
    stores them for a 16-bit dtype). Where the
    run still runs out of memory (what XLA's analysis does not count: allocator fragmentation,
    memory outside the program), 10% smaller batches are tried, `CONFIRM_TRIES` runs in all. The
    time is that one call, host to host; its program is the one the search compiled for that
    batch, which jax reuses, so `compile_s` is the search's compile of it.
    """
    import jax

    from jaxdiff.convert.diffusers import random_pipeline
    from jaxdiff.pipelines import StableDiffusion

    device = jax.devices()[0]
    gc.collect()  # arrays of earlier rows that only a reference cycle still holds
    budget, source = device_budget(device, ctx.memory_budget)  # before placing the parameters
    pipe = StableDiffusion(random_pipeline(preset, seed=0), dtype=dtype_name, devices=[device])
    prompt = "a photograph of an astronaut riding a horse"
    kw = dict(steps=steps, sampler="euler", width=size, height=size)
    compile_s: dict[int, float] = {}

    def memory_at(batch: int) -> int | None:
        started = time.perf_counter()
        try:
            compiled = pipe.lower(prompt, batch=batch, **kw).compile()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            ctx.log(f"   b{batch}: out of memory while compiling")
            return None
        compile_s[batch] = time.perf_counter() - started
        memory = memory_of(compiled)
        if memory is None:
            raise RuntimeError(f"{device.device_kind}: XLA gives no memory analysis to search with")
        ctx.log(f"   b{batch}: {_mib(memory)} of {_mib(budget)} ({compile_s[batch]:.1f} s)")
        return memory

    ctx.log(f"   budget {_mib(budget)}: {source}")
    search = largest_batch(memory_at, budget, start=start, limit=limit)
    memory = dict(search.probes)
    if search.batch == 0:
        raise RuntimeError(f"not even batch 1 fits in {budget} bytes ({source})")

    runs = []  # the confirming runs: batch, XLA's bytes, and the error where it failed
    batch = search.batch
    while True:
        error = None if memory[batch] is not None else "out of memory while compiling"
        if error is None:
            started = time.perf_counter()
            try:
                pipe.generate(prompt, batch=batch, progress=False, **kw)
                run_ms = 1e3 * (time.perf_counter() - started)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                error = str(e).splitlines()[0][:300]
        runs.append({"batch": batch, "bytes": memory[batch], "error": error})
        if error is None:
            break
        ctx.log(f"   b{batch} did not run: {error}")
        if len(runs) == CONFIRM_TRIES or batch == 1:
            raise RuntimeError(
                f"XLA's analysis gave b{search.batch} within {budget} bytes ({source}), but "
                f"runs at {', '.join(str(r['batch']) for r in runs)} ran out of memory"
            )
        batch -= max(1, batch // 10)
        memory[batch] = memory_at(batch)  # compiled first, so that the run times only the run

    note = f"largest batch by XLA's memory analysis within {_mib(budget)} ({source})"
    if batch != search.batch:
        note += f"; b{search.batch} ran out of memory, b{batch} ran"
    if search.at_limit:
        note += f"; every batch up to the search's limit {limit} fits"
    note += "; one call, host to host"
    case = f"{preset} text-to-image largest b{batch} {size}x{size} {steps} euler steps cfg"
    return [
        Result(
            row,
            f"{case} {dtype_name}",
            "jaxdiff",
            round(run_ms, 3),
            [round(run_ms, 3)],
            compile_s=round(compile_s[batch], 2),
            memory_bytes=memory[batch],
            items_per_s=round(batch / (run_ms / 1e3), 3),
            max_batch={
                "batch": batch,
                "analysis_batch": search.batch,
                "at_limit": search.at_limit,
                "budget_bytes": budget,
                "budget_source": source,
                "probes": [list(p) for p in search.probes],
                "runs": runs,
            },
            note=note,
        )
    ]
