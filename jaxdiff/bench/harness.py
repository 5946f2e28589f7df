"""The benchmark harness: timing, FLOPs, memory, the peer ratio, the report and its schema.

How a figure is made is described in `jaxdiff.bench`. A `Row` is a named benchmark that `run`
calls; the rows themselves are in `jaxdiff.bench.rows`, the command line in `jaxdiff.bench.cli`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from jaxdiff import atomic

SCHEMA = "jaxdiff-bench/2"  # /2: results have `max_batch`, `page_faults`, `system_ms`

# Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

# Candidates for one GPU, recorded with each run (`--xla-flags gpu`); not yet measured here.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_triton_gemm=false "  # cuBLAS/cuBLASLt for every GEMM (JAX-Toolbox default)
    "--xla_gpu_enable_latency_hiding_scheduler=true"  # overlaps async work with compute
)
# XLA:GPU records runs of kernels into CUDA graphs (command buffers), launched as one, but by
# default not convolutions (the types it records: fusions, cuBLAS, cuDNN graphs, custom calls),
# and only runs of at least 5 commands. A UNet alternates a convolution with 2-3 fusions (norm,
# activation), so at a small batch most of its kernels may launch one by one; "+" adds a type to
# the default list. A candidate for the SD 1.5 UNet at batch 2, not yet measured.
GRAPH_XLA_FLAGS = "--xla_gpu_enable_command_buffer=+CONVOLUTION"
# No CUDA graphs at all: every kernel launched on its own. A control for `graphs`, and a test of
# one explanation of session 11's ~3 ms per UNet call more than a step of the sampler's scan
# (docs/benchmarks.md): graphs recorded once and updated on each call for new buffer addresses.
NO_GRAPH_XLA_FLAGS = "--xla_gpu_enable_command_buffer="
# No merging of matrix products that share an input. XLA concatenates their weights on every call
# (the 22 time-embedding projections of SD 1.5's resnets; all of SDXL's cross-attention key and
# value projections, 681 MB) and copies each part of the product's result out: for cuDNN's
# attention, every self-attention's q, k and v (SDXL b8: 180 copies, about 7.5 GB moved). Seen in
# XLA's program for an H200 compiled without a GPU (scripts/gpu_program.py, docs/benchmarks.md,
# session 13); separate products are smaller. A candidate, not yet measured.
NO_MERGE_XLA_FLAGS = "--xla_gpu_dot_merger_threshold_mb=0"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# One XLA CPU device per core this process may run on. XLA's CPU runtime runs a program's kernels
# mostly one at a time: in the tiny train step (b8) one of 2 cores was busy for 91 of 122 ms, both
# for 13, and neither for 18 (about 1,400 hand-offs of ~12 us between kernels; docs/benchmarks.md,
# session 20). With a device per core, a data-parallel program runs a share of the batch on each
# at once; the train row then adds a case over all of them.
CPU_CORES_XLA_FLAGS = f"--xla_force_host_platform_device_count={_usable_cores()}"
# `--xla-flags NAME ...`: the sets, appended to XLA_FLAGS before jax starts.
XLA_FLAG_SETS = {
    "gpu": GPU_XLA_FLAGS,
    "graphs": GRAPH_XLA_FLAGS,
    "nographs": NO_GRAPH_XLA_FLAGS,
    "nomerge": NO_MERGE_XLA_FLAGS,
    "cpu-cores": CPU_CORES_XLA_FLAGS,
}


def with_xla_flag_sets(current: str, names) -> str:
    """`current` XLA_FLAGS with the named sets of `XLA_FLAG_SETS` appended ("default": none)."""
    added = [XLA_FLAG_SETS[name] for name in dict.fromkeys(names) if name != "default"]
    return " ".join([current.strip(), *added]).strip()


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Timing:
    median_ms: float
    runs_ms: list[float]
    # Over the timed calls, per call, for the whole process (every thread): minor page faults and
    # system CPU time. A CPU program that maps fresh memory on every call shows here.
    page_faults: float | None = None
    system_ms: float | None = None


def _usage():
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF)


def time_calls(fn: Callable[[], object], *, runs: int, warmup: int, clock=time.perf_counter):
    """Call `fn` `warmup` times, then `runs` times timed; `fn` must wait for its own result."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    before = _usage()
    for _ in range(runs):
        start = clock()
        fn()
        times.append(1e3 * (clock() - start))
    after = _usage()
    if before is None or after is None:
        return Timing(statistics.median(times), times)
    return Timing(
        statistics.median(times),
        times,
        page_faults=(after.ru_minflt - before.ru_minflt) / runs,
        system_ms=1e3 * (after.ru_stime - before.ru_stime) / runs,
    )


@dataclasses.dataclass
class Result:
    """One measured case of one row, by one implementation."""

    row: str  # the row name, as `--rows` takes it
    case: str  # what was run: model, batch, size, dtype
    impl: str  # "jaxdiff", or the peer ("diffusers", "torch"), or a formulation's name
    median_ms: float
    runs_ms: list[float]
    compile_s: float | None = None
    flops: float | None = None  # per call
    flops_source: str | None = None  # "jaxpr" (`jaxpr_flops`), "xla" (cost analysis), "analytic"
    gflops_per_s: float | None = None
    mfu: float | None = None  # model FLOPs utilization, known GPUs only
    memory_bytes: int | None = None
    items_per_s: float | None = None  # images per second (train, text-to-image)
    peer: bool = False  # the reference implementation of its case
    vs_peer: float | None = None  # peer time / this time: > 1 is faster than the peer
    note: str = ""
    page_faults: float | None = None  # minor page faults per timed call (the whole process)
    system_ms: float | None = None  # system CPU time per timed call (the whole process)
    max_batch: dict | None = None  # the largest-batch search (MAX_BATCH_KEYS), max-batch rows only
    # The device allocator's peak bytes in use so far in this process, after the timed calls
    # (jax's `memory_stats`; a GPU's, not the CPU's): what the card held at most, where
    # `memory_bytes` is XLA's plan for the one program. A process-wide peak: a row run on its own
    # (as the `memory` phase runs `sdxl-train`) reads it as that row's.
    device_peak_bytes: int | None = None

    @classmethod
    def from_timing(cls, row, case, impl, timing, *, compile_s, items=None, **fields) -> Result:
        """A result from a `Timing`: its median and runs (ms, rounded), and items per second."""
        return cls(
            row,
            case,
            impl,
            round(timing.median_ms, 3),
            [round(t, 3) for t in timing.runs_ms],
            compile_s=round(compile_s, 2),
            items_per_s=round(items / (timing.median_ms / 1e3), 3) if items else None,
            page_faults=None if timing.page_faults is None else round(timing.page_faults, 1),
            system_ms=None if timing.system_ms is None else round(timing.system_ms, 2),
            **fields,
        )


def flops_of(compiled) -> float | None:
    """FLOPs per call from XLA's cost analysis (a dict, or a list of one per jax version)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends and versions have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


# cuDNN's fused attention: jax's primitives (named from jax 0.4.31 to 0.11), their inputs q and k
# as [B, T, N, H] and [B, S, N, H]; the forward's two products are 4 B N T S H FLOPs, and a
# backward counts twice its forward (model FLOPs, without the kernel's recompute).
_FUSED_ATTENTION = (("dot_product_attention_fwd", 1), ("dot_product_attention_bwd", 2))


def _product(eqn) -> tuple[str, float] | None:
    """(kind, FLOPs) of one matrix product ("matmul"; "attention" where it has batch dimensions,
    as a UNet's only batched products are attention's), convolution ("conv 3x3", by its window)
    or cuDNN fused attention, 2 per multiply-add; None for any other equation."""
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), (batch, _) = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        return ("attention" if batch else "matmul"), flops
    if name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        kernel = eqn.invars[1].aval.shape
        window = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
        kind = "conv " + "x".join(str(kernel[d]) for d in rhs_spec[2:])
        return kind, 2.0 * math.prod(eqn.outvars[0].aval.shape) * window
    for prefix, factor in _FUSED_ATTENTION:
        if name.startswith(prefix):
            b, t, n, h = eqn.invars[0].aval.shape
            return "attention", factor * 4.0 * b * n * t * eqn.invars[1].aval.shape[1] * h
    return None


def _is_jaxpr(value) -> bool:
    return hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns")


def op_breakdown(jaxpr) -> dict[str, dict[str, float]]:
    """The model FLOPs of a (closed) jaxpr by kind of op ("conv 3x3", "matmul", "attention"):
    per kind the number of ops, their FLOPs and their fewest bytes (operands read once, results
    written once), wherever they sit (jit, remat, custom VJP, scan, cond): scan bodies times their
    length, a cond's costliest branch. `jaxpr_flops` is their sum."""
    out: dict[str, dict[str, float]] = {}

    def add(kind, ops, flops, nbytes, scale=1):
        row = out.setdefault(kind, {"ops": 0, "flops": 0.0, "bytes": 0.0})
        row["ops"] += ops * scale
        row["flops"] += flops * scale
        row["bytes"] += nbytes * scale

    def size(var):
        return math.prod(var.aval.shape) * var.aval.dtype.itemsize

    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        product = _product(eqn)
        if product is not None:
            nbytes = sum(map(size, eqn.invars)) + sum(map(size, eqn.outvars))
            add(product[0], 1, product[1], nbytes)
            continue
        if eqn.primitive.name == "cond":
            subs = [max(eqn.params["branches"], key=jaxpr_flops)]
        else:
            subs = [v for v in eqn.params.values() if _is_jaxpr(v)]
        scale = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in subs:
            for k, row in op_breakdown(sub).items():
                add(k, row["ops"], row["flops"], row["bytes"], scale)
    return out


def jaxpr_flops(jaxpr) -> float:
    """Model FLOPs of a (closed) jaxpr: its matrix products, convolutions and cuDNN fused
    attention, 2 per multiply-add, counted as `op_breakdown` counts them. The program as traced,
    before XLA's rewrites: on a GPU, XLA's cost analysis of the compiled program leaves out what
    it hands to cuBLAS and cuDNN (on an H200 it gave SD 1.5's UNet 150 GFLOP at batch 2 and 223 at
    batch 16, for this count's 1,607 and 12,852; docs/benchmarks.md, session 11). A while loop's
    body counts once; a shard_map body, once for all devices; a rematerialized forward pass
    (remat) counts again where the gradient recomputes it."""
    return float(sum(row["flops"] for row in op_breakdown(jaxpr).values()))


def memory_of(compiled) -> int | None:
    """Bytes of a compiled program: arguments + outputs + temporaries, less donated aliases."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(total)


def device_peak_bytes() -> int | None:
    """The first device's allocator peak in this process (`memory_stats`), where it keeps one."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # a backend without memory stats
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def _rates(result: Result, device_kind: str, low_precision: bool) -> Result:
    if result.flops:
        per_s = result.flops / (result.median_ms / 1e3)
        result.gflops_per_s = round(per_s / 1e9, 2)
        peak = peak_tflops(device_kind) if low_precision else None
        if peak:
            result.mfu = round(per_s / (peak * 1e12), 4)
    return result


@dataclasses.dataclass
class Context:
    """Settings every row reads."""

    runs: int = 10
    warmup: int = 2
    compare: bool = True  # measure the PyTorch peer where a row has one
    torch_threads: int | None = None  # torch.set_num_threads on the CPU
    memory_budget: int | None = None  # bytes of device memory for max-batch rows (--memory-gib)
    profile: str | None = None  # a folder: a trace of each jax case's calls (jaxdiff.bench.profile)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    @property
    def device_kind(self) -> str:
        import jax

        return jax.devices()[0].device_kind


def back_to_back_case(case: str, calls: int) -> str:
    """The case name of `calls` calls dispatched back to back and waited for once."""
    return f"{case}, {calls} back to back"


def _groups(runs: int, calls: int) -> int:
    """Timed groups of `calls` calls: about as many calls as `runs` single ones (the program is
    warm by then), and at least 3 groups for a median."""
    return max(3, -(-runs // calls))


def _per_call(timing: Timing, calls: int) -> Timing:
    """A timing of groups of `calls` calls, per call."""
    return dataclasses.replace(
        timing,
        median_ms=timing.median_ms / calls,
        runs_ms=[t / calls for t in timing.runs_ms],
        page_faults=None if timing.page_faults is None else timing.page_faults / calls,
        system_ms=None if timing.system_ms is None else timing.system_ms / calls,
    )


def measure_jax(ctx: Context, fn, args: tuple, **kwargs) -> Result:
    """Compile `fn(*args)` (a jitted function, or one to jit), then time it. Keywords: row,
    case (required); impl ("jaxdiff"), items (per call: items/s), low_precision, donate_argnums,
    and:

    carry: `fn` returns (new first argument, other outputs), as a train step with its state
        donated does; each call then feeds the new first argument to the next.
    flops: analytic FLOPs per call, in place of the traced program's count (`jaxpr_flops`).
    """
    return _measure_jax(ctx, fn, args, **kwargs)[0]


def measure_jax_back_to_back(ctx: Context, fn, args: tuple, *, calls: int, **kwargs) -> list:
    """`measure_jax`, then the same compiled program timed in groups of `calls` calls (`_groups`
    of them, after the first case's runs have warmed it up) dispatched one after another and
    waited for once, per call: the steady state of a loop that does not wait for each step, as
    jaxdiff.train's loop dispatches a step before it reads the last one's metrics, or a sampler
    run step by step. With `carry`, each call is fed the last one's first output. Two Results;
    the second's case is `back_to_back_case(case, calls)`."""
    if calls < 2:
        raise ValueError(f"calls must be >= 2, got {calls}")
    return _measure_jax(ctx, fn, args, back_to_back=calls, **kwargs)


def _measure_jax(
    ctx: Context,
    fn,
    args: tuple,
    *,
    row: str,
    case: str,
    impl: str = "jaxdiff",
    carry: bool = False,
    items: int | None = None,
    flops: float | None = None,
    low_precision: bool = False,
    donate_argnums=(),
    back_to_back: int = 0,
) -> list:
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    start = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    state = list(args)

    def call():
        out = compiled(*state)
        if carry:
            state[0] = out[0]
        jax.block_until_ready(out)

    timing = time_calls(call, runs=ctx.runs, warmup=ctx.warmup)
    timings = [(case, timing)]
    if back_to_back:

        def group():
            for _ in range(back_to_back):
                out = compiled(*state)
                if carry:
                    state[0] = out[0]
            jax.block_until_ready(out)

        grouped = time_calls(group, runs=_groups(ctx.runs, back_to_back), warmup=0)
        timings.append((back_to_back_case(case, back_to_back), _per_call(grouped, back_to_back)))
    if ctx.profile:
        from jaxdiff.bench.profile import trace_calls, trace_name

        written = trace_calls(call, ctx.profile, trace_name(row, case))
        ctx.log(f"   profile: {written or 'the profiler wrote no trace'}")
    # The traced program's count; XLA's cost analysis only where the jaxpr has no products.
    source, value = "analytic", flops
    if not value:
        source, value = "jaxpr", jaxpr_flops(traced.jaxpr)
    if not value:
        source, value = "xla", flops_of(compiled)
    results = _results(
        row,
        impl,
        timings,
        compile_s=compile_s,
        items=items,
        flops=value or None,
        flops_source=source if value else None,
        memory_bytes=memory_of(compiled),
        device_peak_bytes=device_peak_bytes(),
    )
    return [_rates(r, ctx.device_kind, low_precision) for r in results]


def _results(row: str, impl: str, timings, **fields) -> list:
    """A Result of each (case, timing), with the same other fields."""
    return [Result.from_timing(row, case, impl, timed, **fields) for case, timed in timings]


def measure_torch(ctx: Context, fn: Callable[[], object], **kwargs) -> Result:
    """Time an eager PyTorch call (the peer); its first call is reported as `compile_s`.
    Keywords: row, case, impl (required); items, flops (analytic, per call)."""
    return _measure_torch(ctx, fn, **kwargs)[0]


def measure_torch_back_to_back(ctx: Context, fn, *, calls: int, **kwargs) -> list:
    """`measure_torch`, then `fn` timed in groups of `calls` calls and one synchronization, per
    call (as `measure_jax_back_to_back`): two Results."""
    if calls < 2:
        raise ValueError(f"calls must be >= 2, got {calls}")
    return _measure_torch(ctx, fn, back_to_back=calls, **kwargs)


def _measure_torch(
    ctx: Context,
    fn: Callable[[], object],
    *,
    row: str,
    case: str,
    impl: str,
    items: int | None = None,
    flops: float | None = None,
    back_to_back: int = 0,
) -> list:
    import torch

    cuda = torch.cuda.is_available()

    def call(calls=1):
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    timings = [(case, time_calls(call, runs=ctx.runs, warmup=max(ctx.warmup - 1, 0)))]
    if back_to_back:
        grouped = time_calls(
            lambda: call(back_to_back), runs=_groups(ctx.runs, back_to_back), warmup=0
        )
        timings.append((back_to_back_case(case, back_to_back), _per_call(grouped, back_to_back)))
    results = _results(
        row,
        impl,
        timings,
        compile_s=first_s,
        items=items,
        flops=flops,
        flops_source="analytic" if flops else None,
        memory_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        peer=True,
        note="eager; compile_s is the first call",
    )
    return [_rates(r, _torch_device_name() or "", True) for r in results]


def _torch_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _have_peer() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def with_peer_ratios(results: list[Result]) -> list[Result]:
    """Set `vs_peer` on every non-peer result whose (row, case) has a peer."""
    peers = {(r.row, r.case): r for r in results if r.peer}
    for r in results:
        p = peers.get((r.row, r.case))
        if p is not None and not r.peer:
            r.vs_peer = round(p.median_ms / r.median_ms, 3)
    return results


# ----------------------------------------------------------------------------- the report


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(ctx: Context) -> dict:
    import jax

    device = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
        "jax_cpu_enable_async_dispatch": jax.config.values.get("jax_cpu_enable_async_dispatch"),
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "runs": ctx.runs,
        "warmup": ctx.warmup,
    }
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "transformers"):
        env[name] = _version(name)
    if _have_peer():
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["torch_device"] = _torch_device_name() or "cpu"
    return env


def report(env: dict, results: list[Result], errors: dict[str, str]) -> dict:
    return {
        "schema": SCHEMA,
        "environment": env,
        "results": [dataclasses.asdict(r) for r in with_peer_ratios(results)],
        "errors": errors,
    }


REQUIRED_RESULT_KEYS = {f.name for f in dataclasses.fields(Result)}
# `max_batch` of a max-batch row (jaxdiff.bench.memory): the batch that ran, the largest by XLA's
# memory analysis, whether that reached the search's limit, the budget in bytes and where it came
# from, the probes as [batch, bytes or None] in the order compiled, and the confirming runs as
# {"batch", "bytes", "error"} (error None for the one that ran).
MAX_BATCH_KEYS = {
    "batch",
    "analysis_batch",
    "at_limit",
    "budget_bytes",
    "budget_source",
    "probes",
    "runs",
}


def validate(doc: dict) -> None:
    """Raise ValueError unless `doc` is a report of this schema."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema {doc.get('schema')!r} != {SCHEMA!r}")
    for key in ("environment", "results", "errors"):
        if key not in doc:
            raise ValueError(f"missing {key!r}")
    for key in ("date", "device_kind", "jax", "runs"):
        if key not in doc["environment"]:
            raise ValueError(f"environment lacks {key!r}")
    for r in doc["results"]:
        missing = REQUIRED_RESULT_KEYS - set(r)
        if missing:
            raise ValueError(f"result lacks {sorted(missing)}")
        if not r["median_ms"] > 0 or len(r["runs_ms"]) < 1:
            raise ValueError(f"result {r['row']}/{r['impl']} has no timing")
        if r["max_batch"] is not None:
            missing = MAX_BATCH_KEYS - set(r["max_batch"])
            if missing:
                raise ValueError(f"result {r['row']}: max_batch lacks {sorted(missing)}")


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    """A Markdown table of the results, the peer next to each jaxdiff figure."""
    head = (
        "| row | case | impl | median ms | compile s | GFLOP/s | MFU | memory MiB | items/s "
        "| vs peer |"
    )
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in with_peer_ratios(results):
        mem = None if r.memory_bytes is None else r.memory_bytes / 2**20
        lines.append(
            f"| {r.row} | {r.case} | {r.impl} | {r.median_ms:.2f} | {_fmt(r.compile_s, '.2f')} "
            f"| {_fmt(r.gflops_per_s, '.1f')} | {_fmt(r.mfu, '.1%')} | {_fmt(mem, '.0f')} "
            f"| {_fmt(r.items_per_s, '.2f')} | {_fmt(r.vs_peer, '.2f', '')}"
            f"{'x' if r.vs_peer else ''} |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    # Which default set it belongs to: "cpu" or "gpu"; "opt-in" rows run only when named in
    # --rows (or with --device-rows all).
    device: str
    help: str
    run: Callable[[Context, str], list[Result]]  # (context, row name) -> results
    mem_fraction: float | None = None  # of the GPU for jax's pool, where only such rows run


def _write_report(path, doc: dict) -> None:
    text = json.dumps(doc, indent=1)
    atomic.write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run(rows: list[Row], ctx: Context, json_path: str | None = None) -> dict:
    """Run `rows` in order; a row that fails is reported and the others go on.

    The JSON report is rewritten after every row, so a run cut short keeps what it measured;
    each version replaces the last whole (`jaxdiff.atomic.write_file`), never half-written.
    """
    env = environment(ctx)
    results: list[Result] = []
    errors: dict[str, str] = {}
    for row in rows:
        ctx.log(f"-- {row.name}: {row.help}")
        start = time.perf_counter()
        try:
            out = row.run(ctx, row.name)
            results.extend(out)
            for r in out:
                peak = r.device_peak_bytes
                peak = "" if peak is None else f", device peak {peak / 2**30:.2f} GiB"
                ctx.log(f"   {r.impl:<30} {r.case}: {r.median_ms:.2f} ms{peak}")
        except Exception as e:  # one failing row must not hide the others
            import traceback

            errors[row.name] = f"{type(e).__name__}: {e}"[:2000]
            ctx.log(traceback.format_exc(limit=6))
        ctx.log(f"   ({time.perf_counter() - start:.0f} s)")
        env["load_average_end"] = list(os.getloadavg())
        doc = report(env, results, errors)
        if json_path:
            _write_report(json_path, doc)
    return report(env, results, errors)
