"""Benchmarks of jaxdiff against diffusers (PyTorch): model steps, pipelines, training.

Random weights at the real sizes; nothing is downloaded. Two sets of rows by default:

- `cpu`: micro-benchmarks (self-attention over 4096 tokens, a 3x3 convolution) and the tiny
  preset's UNet step, train step and text-to-image, each next to its PyTorch peer in the same
  process (torch limited to `torch_threads` threads).
- `gpu`: the real sizes of issue 7 (SD 1.5 and SDXL UNet steps, VAE decode, text encoding,
  25-step text-to-image, the SD 1.5 train step, the largest SD 1.5 and SDXL text-to-image batch
  one device holds), in bfloat16; with `compare`, diffusers in float16 with SDPA attention.

There are also `opt-in` rows, run only when named: SD 1.5's UNet and its loading on the CPU, and
`dispatch` (a call's cost per parameter array).

How a figure is made: a jax program is lowered and compiled first (`compile_s`; the persistent
compilation cache is off unless asked for, so this is a cold compile), then called `warmup`
times, then `runs` times, each call ending in `block_until_ready` (torch: `cuda.synchronize`);
the figure is the median. FLOPs are model FLOPs counted from the traced program
(`jaxpr_flops`: its matrix products, convolutions and cuDNN attention, loops times their length;
`op_breakdown` splits the count by kind of op, with each kind's fewest bytes; XLA's cost analysis of the compiled program leaves out on a GPU what it hands to cuBLAS and
cuDNN); a GPU whose dense bf16 peak is known gets model FLOPs utilization, anything else
achieved GFLOP/s. `memory_bytes` is the compiled program's arguments, outputs
and temporaries (jax) or the CUDA allocator's peak (torch); CPU torch gives none. `page_faults`
and `system_ms` are the process's minor page faults and system CPU time per timed call (where
the `resource` module exists): what the kernel spends mapping fresh memory. Started as
`jaxdiff bench` or `scripts/benchmark.py`, the process carries `jaxdiff.cpu_tuning`'s settings,
as every `jaxdiff` command does (huge pages, the kept heap, the CPU XLA flags), and the peer in
it shares them; the report's environment records `GLIBC_TUNABLES`, `XLA_FLAGS` and
`jax_cpu_enable_async_dispatch`.

The max-batch rows search for the largest batch whose compiled program fits the device's
memory (`bytes_limit` of the allocator, or `--memory-gib`, less what is already in use), then
run that batch once, host to host; their one record has `max_batch` (None on every other row):
`batch` (the batch that ran), `analysis_batch` (the largest by XLA's analysis), `at_limit` (every
batch up to the search's limit fits), `budget_bytes` and `budget_source`, `probes` ([batch,
bytes] in the order compiled; bytes None where compiling ran out of memory) and `runs`
({"batch", "bytes", "error"}: smaller batches are tried where the found one runs out of
memory). Report schema `jaxdiff-bench/2`; /1 had no `max_batch`, `page_faults` or
`system_ms`.

The parts, each importing only those before it:

- `jaxdiff.bench.harness`: measuring (`time_calls`, `measure_jax`, `measure_torch`, FLOPs,
  memory, the peer ratio), `Row`, and the report (`run`, `validate`, `table`, the schema).
- `jaxdiff.bench.profile`: jax's profiler around a case's calls (`--profile`) and a summary of
  the trace (`summarize`, `timeline`; scripts/profile_summary.py).
- `jaxdiff.bench.memory`: the largest batch that fits (`largest_batch`, `device_budget`) and its
  row (`max_batch_sampling`).
- `jaxdiff.bench.rows`: the PyTorch peers and the rows (`ROWS`, `select_rows`).
- `jaxdiff.bench.cli`: the flags (`add_arguments`) and `main`, which `scripts/benchmark.py` and
  `jaxdiff bench` call; docs/benchmarks.md holds the figures.

Apart from the benchmark, `jaxdiff.bench.gpu_program` compiles a UNet step or VAE decode for an
H100 or H200 without a GPU (through jax's CUDA plugin, where installed) and counts the kernels of
XLA's program (`compile_case`, `summarize`; scripts/gpu_program.py).
"""

from jaxdiff.bench.cli import add_arguments, main
from jaxdiff.bench.harness import (
    GPU_XLA_FLAGS,
    GRAPH_XLA_FLAGS,
    MAX_BATCH_KEYS,
    NO_GRAPH_XLA_FLAGS,
    NO_MERGE_XLA_FLAGS,
    PEAK_BF16_TFLOPS,
    REQUIRED_RESULT_KEYS,
    SCHEMA,
    XLA_FLAG_SETS,
    Context,
    Result,
    Row,
    Timing,
    environment,
    flops_of,
    jaxpr_flops,
    measure_jax,
    measure_jax_back_to_back,
    measure_torch,
    measure_torch_back_to_back,
    memory_of,
    op_breakdown,
    peak_tflops,
    report,
    run,
    table,
    time_calls,
    validate,
    with_peer_ratios,
    with_xla_flag_sets,
)
from jaxdiff.bench.memory import (
    MEM_FRACTION,
    Search,
    device_budget,
    largest_batch,
    max_batch_sampling,
)
from jaxdiff.bench.rows import (
    ROWS,
    attention_micro,
    conv_micro,
    select_rows,
    text_encode,
    text_to_image,
    train_step,
    unet_step,
    vae_decode,
)

__all__ = [
    "GPU_XLA_FLAGS",
    "GRAPH_XLA_FLAGS",
    "MAX_BATCH_KEYS",
    "MEM_FRACTION",
    "NO_GRAPH_XLA_FLAGS",
    "NO_MERGE_XLA_FLAGS",
    "PEAK_BF16_TFLOPS",
    "REQUIRED_RESULT_KEYS",
    "ROWS",
    "SCHEMA",
    "Context",
    "Result",
    "Row",
    "Search",
    "Timing",
    "add_arguments",
    "attention_micro",
    "conv_micro",
    "device_budget",
    "environment",
    "flops_of",
    "jaxpr_flops",
    "largest_batch",
    "main",
    "max_batch_sampling",
    "measure_jax",
    "measure_jax_back_to_back",
    "measure_torch",
    "measure_torch_back_to_back",
    "memory_of",
    "op_breakdown",
    "peak_tflops",
    "report",
    "run",
    "select_rows",
    "table",
    "text_encode",
    "text_to_image",
    "time_calls",
    "train_step",
    "unet_step",
    "validate",
    "vae_decode",
    "with_peer_ratios",
    "with_xla_flag_sets",
    "XLA_FLAG_SETS",
]
