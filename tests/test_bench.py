"""The benchmark harness's logic (jaxdiff/bench/): timing, FLOPs, row selection, the report.

No timed assertions: figures come from the benchmark itself (docs/benchmarks.md).
"""

import argparse
import functools
import json
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from jaxdiff import bench
from jaxdiff.models import layers


class FakeClock:
    """Each call advances by the next step, so measured durations are known exactly."""

    def __init__(self, steps):
        self.now = 0.0
        self.steps = iter(steps)

    def __call__(self):
        self.now += next(self.steps, 0.0)
        return self.now


def test_time_calls_warms_up_then_takes_the_median():
    calls = []
    # Per timed run: the clock is read twice; durations 0.003, 0.001, 0.002 s.
    clock = FakeClock([0.0, 0.003, 0.0, 0.001, 0.0, 0.002])
    timing = bench.time_calls(lambda: calls.append(1), runs=3, warmup=2, clock=clock)
    assert len(calls) == 5
    np.testing.assert_allclose(timing.runs_ms, [3.0, 1.0, 2.0])
    assert timing.median_ms == pytest.approx(2.0)


def test_time_calls_counts_page_faults_per_call():
    """A call that maps and touches 64 MiB of fresh memory faults in its pages every time (the
    pattern that made XLA's CPU train step spend a third of its CPU time in the kernel); a call
    that allocates nothing does not."""
    pytest.importorskip("resource")

    def fresh():  # an anonymous mapping, one byte written per 4 KiB page
        with mmap.mmap(-1, 64 * 2**20) as m:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages even where THP is "always"
                m.madvise(mmap.MADV_NOHUGEPAGE)
            np.frombuffer(m, np.uint8)[::4096] = 1

    touching = bench.time_calls(fresh, runs=3, warmup=1)
    idle = bench.time_calls(lambda: None, runs=3, warmup=1)
    assert touching.page_faults > 4096 and touching.system_ms >= 0  # >= 16 MiB of 4 KiB pages
    assert idle.page_faults < 64


def test_time_calls_even_runs_and_bad_runs():
    clock = FakeClock([0.0, 0.001, 0.0, 0.004])
    assert bench.time_calls(lambda: None, runs=2, warmup=0, clock=clock).median_ms == (
        pytest.approx(2.5)
    )
    with pytest.raises(ValueError):
        bench.time_calls(lambda: None, runs=0, warmup=0)


def _spy_on_time_calls(monkeypatch, ms_per_run: float):
    """Replaces the harness's `time_calls`: records each timed function, calls it once, and
    reports `ms_per_run` for every run."""
    timed = []

    def fake(fn, *, runs, warmup, clock=None):
        timed.append(fn)
        fn()
        return bench.Timing(ms_per_run, [ms_per_run] * runs)

    monkeypatch.setattr(bench.harness, "time_calls", fake)
    return timed


def test_back_to_back_times_groups_of_carried_calls_per_call(monkeypatch):
    """A train row's second case: `calls` steps dispatched one after another, each fed the last
    one's state, waited for once, reported per step; the first case waits for each call."""
    executed = []

    def step(state, x):
        jax.debug.callback(lambda s: executed.append(int(s)), state)
        return state + 1, x * 2.0

    timed = _spy_on_time_calls(monkeypatch, 40.0)
    ctx = bench.Context(runs=3, warmup=0, compare=False, log=lambda line: None)
    args = (jnp.int32(0), jnp.ones(4))
    each, grouped = bench.measure_jax_back_to_back(
        ctx, step, args, calls=4, carry=True, row="r", case="c", items=8
    )
    assert [each.case, grouped.case] == ["c", "c, 4 back to back"]
    assert (each.median_ms, grouped.median_ms) == (40.0, 10.0)
    assert grouped.runs_ms == [10.0] * 3 and grouped.items_per_s == pytest.approx(800.0)
    # About as many calls as the first case times, in at least 3 groups.
    assert [bench.harness._groups(runs, 4) for runs in (3, 10, 20)] == [3, 3, 5]
    assert grouped.compile_s == each.compile_s and grouped.memory_bytes == each.memory_bytes
    jax.effects_barrier()
    # One call, then four, the state carried from call to call throughout.
    assert len(timed) == 2 and executed == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="calls"):
        bench.measure_jax_back_to_back(ctx, step, args, calls=1, row="r", case="c")
    # Without `carry` (a UNet row: a sampler's steps), every call gets the same arguments.
    executed.clear()
    bench.measure_jax_back_to_back(ctx, step, args, calls=3, row="r", case="c")
    jax.effects_barrier()
    assert executed == [0] * 4

    calls = []
    timed.clear()
    results = bench.measure_torch_back_to_back(
        ctx, lambda: calls.append(1), calls=4, row="r", case="c", impl="torch", items=8
    )
    assert [r.case for r in results] == ["c", "c, 4 back to back"]
    assert [r.median_ms for r in results] == [40.0, 10.0] and all(r.peer for r in results)
    assert len(calls) == 1 + 1 + 4  # the first (compile) call, one timed, a group of four
    ratios = bench.with_peer_ratios([each, grouped, *results])
    assert ratios[1].vs_peer == 1.0  # the back-to-back cases pair with each other


def test_flops_of_a_matrix_product():
    a = jnp.ones((32, 64), jnp.float32)
    b = jnp.ones((64, 16), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert bench.flops_of(compiled) == pytest.approx(2 * 32 * 64 * 16, rel=0.01)
    assert bench.memory_of(compiled) >= 4 * (32 * 64 + 64 * 16 + 32 * 16)


def test_jaxpr_flops_counts_products_convolutions_loops_branches_and_gradients():
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((8, 8), jnp.float32)
    image = jnp.ones((2, 10, 10, 3), jnp.float32)  # NHWC, as jaxdiff's convolutions
    kernel = jnp.ones((3, 3, 3, 5), jnp.float32)  # HWIO
    dot = 2 * 4 * 8 * 8
    conv = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)  # VALID: 8x8 outputs, 5 channels, 3x3x3 windows

    def f(x, w, image, kernel):
        y = jax.jit(jnp.matmul)(x, w)
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=3)
        y = jax.checkpoint(lambda y: y @ w)(y)
        y = jax.lax.cond(y.sum() > 0, lambda y: y @ w @ w, lambda y: y, y)
        z = jax.lax.conv_general_dilated(
            image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.sum() + z.sum()

    assert bench.jaxpr_flops(jax.make_jaxpr(f)(x, w, image, kernel)) == dot * (1 + 3 + 1 + 2) + conv
    # Each product's gradient is two more of its size (the weight's and the input's).
    grad = jax.make_jaxpr(jax.grad(lambda x, w: (x @ w).sum(), argnums=(0, 1)))(x, w)
    assert bench.jaxpr_flops(grad) == 3 * dot


def test_op_breakdown_splits_the_count_by_kind_with_each_ops_bytes():
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((8, 8), jnp.float32)
    image = jnp.ones((2, 10, 10, 3), jnp.float32)
    kernel = jnp.ones((3, 3, 3, 5), jnp.float32)
    q = jnp.ones((2, 6, 8), jnp.float32)

    def f(x, w, image, kernel, q):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)
        y = jax.lax.cond(y.sum() > 0, lambda y: y @ w @ w, lambda y: y, y)
        z = jax.lax.conv_general_dilated(
            image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        a = jnp.einsum("bth,bsh->bts", q, q)
        return y.sum() + z.sum() + a.sum()

    jaxpr = jax.make_jaxpr(f)(x, w, image, kernel, q)
    parts = bench.op_breakdown(jaxpr)
    dot, dot_bytes = 2 * 4 * 8 * 8, 4 * (4 * 8 + 8 * 8 + 4 * 8)
    conv_out = 2 * 8 * 8 * 5
    assert parts["matmul"] == {"ops": 5, "flops": 5 * dot, "bytes": 5 * dot_bytes}
    assert parts["conv 3x3"] == {
        "ops": 1,
        "flops": 2 * conv_out * 27,
        "bytes": 4 * (2 * 10 * 10 * 3 + 3 * 3 * 3 * 5 + conv_out),
    }
    assert parts["attention"] == {
        "ops": 1,
        "flops": 2 * 2 * 6 * 6 * 8,
        "bytes": 4 * (2 * 2 * 6 * 8 + 2 * 6 * 6),
    }
    assert sum(r["flops"] for r in parts.values()) == bench.jaxpr_flops(jaxpr)


def test_the_roofline_script_covers_the_unets_whole_count(monkeypatch):
    """scripts/unet_roofline.py on the tiny UNet: its kinds add up to `jaxpr_flops` of the
    same program, and the floor is at least the FLOPs at the matrix rate."""
    import importlib.util
    from pathlib import Path

    from jaxdiff.models.build import abstract_params, module_for
    from jaxdiff.models.presets import PRESETS

    path = Path(__file__).parents[1] / "scripts" / "unet_roofline.py"
    spec = importlib.util.spec_from_file_location("unet_roofline", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours = layers._backend
    rows, total = script.floor_table("tiny", 2, 16, 100.0, 1.0)
    assert layers._backend is ours  # the script's own patch is undone
    assert {r[0] for r in rows} == {"conv 3x3", "conv 1x1", "matmul", "attention"}
    config = PRESETS["tiny"].unet
    module = module_for(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    inputs = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)
        for k, v in module.dummy_inputs(2, 16, 16).items()
    }
    inputs["timesteps"] = jax.ShapeDtypeStruct((2,), jnp.int32)
    monkeypatch.setattr(layers, "_backend", lambda: "xla")
    jaxpr = jax.make_jaxpr(lambda p, i: module.apply({"params": p}, **i))(
        abstract_params(config, jnp.bfloat16), inputs
    )
    assert total[2] == pytest.approx(bench.jaxpr_flops(jaxpr) / 1e9)
    # GFLOP at 100 TFLOP/s take GFLOP / 100 ms; bytes at 1 TB/s (GB ms) only add to that.
    assert total[4] >= total[2] / 100 * (1 - 1e-9)
    by_kind = {r[0]: r for r in rows}
    assert by_kind["attention"][3] is None  # a fused kernel's bytes are not the XLA form's
    assert by_kind["conv 3x3"][4] == pytest.approx(
        max(by_kind["conv 3x3"][2] / 100, by_kind["conv 3x3"][3])
    )


# The entry computation of an XLA GPU program's text (modeled on SD 1.5's UNet compiled for an
# H200 by scripts/gpu_program.py): a convolution kernel transposed for cuDNN, a convolution,
# a merged matrix product, a normalization and free instructions.
GPU_PROGRAM = """HloModule jit_step, entry_computation_layout={...}

%fused_transpose (param_0: bf16[3,3,4,320]) -> bf16[320,3,3,4] {
  %param_0 = bf16[3,3,4,320]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[320,3,3,4]{3,2,1,0} transpose(%param_0), dimensions={3,0,1,2}
}

ENTRY %main.234 (p.kernel: bf16[3,3,4,320], p.bias: bf16[320], x: bf16[2,64,64,4]) -> bf16[2,64,64,320] {
  %p.kernel = bf16[3,3,4,320]{3,2,1,0} parameter(0), sharding={replicated}
  %p.bias = bf16[320]{0} parameter(1), sharding={replicated}
  %x = bf16[2,64,64,4]{3,2,1,0} parameter(2), sharding={replicated}
  %wrapped_transpose = bf16[320,3,3,4]{3,2,1,0} fusion(%p.kernel), kind=kInput, calls=%fused_transpose
  %wrapped_convert = f32[320]{0} fusion(%p.bias), kind=kLoop, calls=%fused_convert
  %cudnn-conv-bias-activation = (bf16[2,64,64,320]{3,2,1,0}, u8[0]{0}) custom-call(%x, %wrapped_transpose, %p.bias), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convBiasActivationForward"
  %get-tuple-element = bf16[2,64,64,320]{3,2,1,0} get-tuple-element(%cudnn-conv-bias-activation), index=0
  %bitcast.1 = bf16[8192,320]{1,0} bitcast(%get-tuple-element)
  %gemm_fusion_dot = bf16[8192,960]{1,0} fusion(%bitcast.1, %p.kernel), kind=kCustom, calls=%gemm, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %fusion.5 = bf16[8192,320]{1,0} fusion(%gemm_fusion_dot), kind=kCustom, calls=%norm, backend_config={"fusion_backend_config":{"kind":"__triton"}}
  %attention = (bf16[2,8,4096,40]{3,1,2,0}, u8[0]{0}) custom-call(%fusion.5, %fusion.5, %fusion.5), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %loop_add_fusion = bf16[2,64,64,320]{3,2,1,0} fusion(%get-tuple-element, %wrapped_convert), kind=kLoop, calls=%fused_add
}
"""


def test_gpu_program_summary_counts_each_launch_and_the_work_on_weights_alone():
    from jaxdiff.bench.gpu_program import summarize

    summary = summarize(GPU_PROGRAM)
    assert summary["kernels"] == {
        "XLA fusion (elementwise, reductions, copies)": 3,
        "cuDNN convolution": 1,
        "Triton matrix product": 1,
        "Triton fusion (norms, softmax)": 1,
        "cuDNN attention": 1,
    }
    assert summary["total"] == 7
    # Each kernel's operands and results, whole (a bfloat16 activation [2, 64, 64, 320] is
    # 5,242,880 bytes; the workspace u8[0] none).
    act, kernel, bias = 2 * 64 * 64 * 320 * 2, 3 * 3 * 4 * 320 * 2, 320 * 2
    assert summary["bytes"] == {
        "XLA fusion (elementwise, reductions, copies)": 2 * kernel
        + 3 * bias
        + (2 * act + 2 * bias),
        "cuDNN convolution": 2 * 64 * 64 * 4 * 2 + kernel + bias + act,
        "Triton matrix product": act + kernel + 3 * act,
        "Triton fusion (norms, softmax)": 3 * act + act,
        "cuDNN attention": 3 * act + act,
    }
    # The transpose and the bias's cast read parameters only; the product reads an activation.
    assert summary["relayouts"] == [
        ("wrapped_transpose", "XLA fusion (elementwise, reductions, copies)", 320 * 9 * 4 * 2),
        ("wrapped_convert", "XLA fusion (elementwise, reductions, copies)", 320 * 4),
    ]
    with pytest.raises(ValueError, match="no ENTRY"):
        summarize("HloModule empty")


def test_gpu_program_script_needs_the_cuda_plugin_and_says_so_in_one_line():
    """Without jax's CUDA plugin (this machine, CI) the script cannot compile for a GPU: one
    line naming what it needs, exit status 2."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("jax_plugins") is not None:
        pytest.skip("a jax plugin is installed here")
    path = Path(__file__).parents[1] / "scripts" / "gpu_program.py"
    out = subprocess.run(
        [sys.executable, str(path), "tiny", "1"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_program.py: "), out.stderr
    assert "jax-cuda12-plugin" in lines[0]


def test_jaxpr_flops_counts_cudnn_fused_attention_by_its_primitives():
    """cuDNN's kernel cannot be traced without a GPU; stand-ins with jax's primitive names."""
    from jax.extend.core import Primitive

    b, t, s, n, h = 2, 64, 77, 4, 8
    q = jnp.ones((b, t, n, h), jnp.bfloat16)
    kv = jnp.ones((b, s, n, h), jnp.bfloat16)
    forward = 4 * b * n * t * s * h
    for name, factor in (
        ("dot_product_attention_fwd_wrapper", 1),
        ("dot_product_attention_bwd_wrapper", 2),
    ):
        prim = Primitive(name)
        prim.def_abstract_eval(lambda q, k, v: jax.core.ShapedArray(q.shape, q.dtype))
        jaxpr = jax.make_jaxpr(prim.bind)(q, kv, kv)
        assert bench.jaxpr_flops(jaxpr) == factor * forward


def _xla_flops(fn, avals) -> float:
    return jax.jit(fn).trace(*avals).lower().cost_analysis().get("flops", 0.0)


def _xla_product_flops(jaxpr) -> float:
    """XLA's cost analysis of each matrix product and convolution of a jaxpr, one op at a time,
    summed. A convolution is lowered on an input that already holds its padding, with none of
    its own: XLA counts only the taps that fall inside the input, the model FLOPs every tap."""
    total = 0.0
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += _xla_product_flops(sub)
        if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
            continue
        shapes = [list(v.aval.shape) for v in eqn.invars]
        params = dict(eqn.params)
        if eqn.primitive.name == "conv_general_dilated":
            spatial = params["dimension_numbers"].lhs_spec[2:]
            for axis, (lo, hi) in zip(spatial, params["padding"], strict=True):
                shapes[0][axis] += lo + hi
            params["padding"] = tuple((0, 0) for _ in params["padding"])
        avals = [
            jax.ShapeDtypeStruct(tuple(shape), v.aval.dtype)
            for shape, v in zip(shapes, eqn.invars, strict=True)
        ]
        op = functools.partial(eqn.primitive.bind, **params)
        total += jax.jit(op).trace(*avals).lower().cost_analysis()["flops"]
    return total


def test_jaxpr_flops_of_a_unet_are_xlas_count_of_its_products(monkeypatch):
    """On the tiny UNet (XLA's attention), the jaxpr's count is XLA's cost analysis of the same
    matrix products and convolutions, op by op, every tap of a padded window counted; and under
    XLA's count of the whole program, which adds the elementwise work and leaves padded taps
    out, by less than a tenth."""
    from jaxdiff.models.build import abstract_params, module_for
    from jaxdiff.models.presets import PRESETS

    monkeypatch.setattr(layers, "_backend", lambda: "tpu")  # attention as matrix products
    config = PRESETS["tiny"].unet
    module = module_for(config)
    inputs = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in module.dummy_inputs(2, 16, 16).items()
    }
    traced = jax.jit(lambda p, i: module.apply({"params": p}, **i)).trace(
        abstract_params(config), inputs
    )
    ours = bench.jaxpr_flops(traced.jaxpr)
    assert ours == _xla_product_flops(traced.jaxpr.jaxpr)
    xla = traced.lower().cost_analysis()["flops"]
    assert abs(ours - xla) < 0.1 * xla


@pytest.mark.parametrize(
    "cost, expected",
    [({"flops": 10.0}, 10.0), ([{"flops": 7.0}], 7.0), ([], None), (None, None), ({}, None)],
)
def test_flops_of_handles_every_return_type(cost, expected):
    class Compiled:
        def cost_analysis(self):
            return cost

    assert bench.flops_of(Compiled()) == expected


def test_peak_is_stated_only_for_known_gpus():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("cpu") is None


@pytest.mark.parametrize(
    "stats, expected",
    [({"peak_bytes_in_use": 7 << 30, "bytes_in_use": 1}, 7 << 30), ({"bytes_in_use": 1}, None)],
)
def test_device_peak_is_the_allocators_where_it_keeps_one(monkeypatch, stats, expected):
    """A jax case's `device_peak_bytes` is the first device's `peak_bytes_in_use` (a GPU's); the
    CPU keeps no memory stats, so a CPU run reports none rather than a made-up figure."""
    from jaxdiff.bench import harness

    ctx = bench.Context(runs=1, warmup=0)
    on_cpu = harness.measure_jax(ctx, lambda x: x + 1, (jnp.ones(3),), row="r", case="c")
    assert on_cpu.device_peak_bytes is None

    class Device:
        def memory_stats(self):
            return stats

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    assert harness.device_peak_bytes() == expected


def _result(row, impl, ms, peer=False):
    return bench.Result(row, "case", impl, ms, [ms], peer=peer)


def test_peer_ratio_is_peer_time_over_ours():
    results = bench.with_peer_ratios(
        [_result("r", "jaxdiff", 2.0), _result("r", "diffusers", 3.0, peer=True)]
    )
    assert results[0].vs_peer == pytest.approx(1.5)
    assert results[1].vs_peer is None


FAKE_ROWS = {
    "one": bench.Row("one", "cpu", "a fake row", lambda ctx, name: [_result(name, "jaxdiff", 1.0)]),
    "two": bench.Row("two", "gpu", "another", lambda ctx, name: [_result(name, "jaxdiff", 2.0)]),
    "broken": bench.Row("broken", "cpu", "fails", lambda ctx, name: 1 / 0),
    "named": bench.Row("named", "opt-in", "only by name", lambda ctx, name: []),
}


def test_select_rows():
    assert [r.name for r in bench.select_rows(None, "cpu", FAKE_ROWS)] == ["one", "broken"]
    assert [r.name for r in bench.select_rows(None, "gpu", FAKE_ROWS)] == ["two"]
    assert [r.name for r in bench.select_rows(["two", "one"], "cpu", FAKE_ROWS)] == ["two", "one"]
    assert [r.name for r in bench.select_rows(["named"], "cpu", FAKE_ROWS)] == ["named"]
    assert len(bench.select_rows(None, "all", FAKE_ROWS)) == 4
    with pytest.raises(ValueError, match="unknown rows nope"):
        bench.select_rows(["nope"], "cpu", FAKE_ROWS)


def test_every_issue_row_exists():
    cpu = {r.name for r in bench.ROWS.values() if r.device == "cpu"}
    gpu = {r.name for r in bench.ROWS.values() if r.device == "gpu"}
    assert {"attention", "conv", "tiny-unet", "tiny-train", "tiny-txt2img"} <= cpu
    assert {"sd15-unet", "sdxl-unet", "vae-decode", "text-encode", "sd15-txt2img"} <= gpu
    assert {"sd15-train", "sdxl-train", "sd15-max-batch", "sdxl-max-batch"} <= gpu
    assert {r.device for r in bench.ROWS.values()} == {"cpu", "gpu", "opt-in"}
    assert bench.ROWS["sd15-unet-cpu"].device == "opt-in"
    assert bench.ROWS["sd15-load-cpu"].device == "opt-in"


@pytest.mark.slow  # bench plumbing, 10-30 s each: CI's slow pass runs it
def test_the_load_row_loads_in_a_fresh_process_per_run_with_its_peer():
    """`sd15-load-cpu`'s code on the tiny preset (it runs only by name, so nothing else runs it):
    a process per load, the peer (diffusers' `from_pretrained` of jaxdiff's folder) marked, and
    each process's peak memory at least the parameters it loaded."""
    from jaxdiff.bench.rows import model_load
    from jaxdiff.convert.diffusers import random_pipeline

    ctx = bench.Context(runs=1, warmup=0, log=lambda line: None)
    results = bench.with_peer_ratios(model_load(ctx, "tiny", "load"))
    assert [(r.impl, r.peer, len(r.runs_ms)) for r in results] == [
        ("jaxdiff", False, 1),
        ("diffusers", True, 1),
    ]
    params = sum(x.nbytes for x in jax.tree_util.tree_leaves(random_pipeline("tiny").params))
    assert all(r.memory_bytes > params and r.median_ms > 0 for r in results)
    assert "peak resident" in results[0].note and results[0].vs_peer > 0


def test_run_writes_a_valid_report_and_survives_a_failing_row(tmp_path):
    path = tmp_path / "out.json"
    ctx = bench.Context(runs=1, warmup=0, log=lambda line: None)
    rows = bench.select_rows(["one", "broken", "two"], "cpu", FAKE_ROWS)
    doc = bench.run(rows, ctx, str(path))
    written = json.loads(path.read_text())
    bench.validate(written)
    assert [r["row"] for r in written["results"]] == ["one", "two"]
    assert set(written["errors"]) == {"broken"}
    assert written["environment"]["jax"] == jax.__version__
    assert doc["results"] == written["results"]
    table = bench.table([bench.Result(**r) for r in written["results"]])
    assert table.count("\n") == 3  # header, rule, two rows


def test_a_report_that_fails_to_write_leaves_the_last_one_whole(tmp_path):
    """The report is rewritten after every row; a rewrite that fails (here a value JSON cannot
    hold) leaves the last version as it was, not a truncated file."""
    path = tmp_path / "out.json"
    ctx = bench.Context(runs=1, warmup=0, log=lambda line: None)
    bench.run(bench.select_rows(["one"], "cpu", FAKE_ROWS), ctx, str(path))
    before = path.read_text()
    unwritable = bench.Row(
        "bad", "cpu", "", lambda c, n: [bench.Result(n, "c", "x", 1.0, [1.0], note=object())]
    )
    with pytest.raises(TypeError, match="not JSON serializable"):
        bench.run([unwritable], ctx, str(path))
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--json", "{tmp}"], "--json {tmp}: is a folder, not a file"),
        (
            ["--json", "{tmp}/a-file/report.json"],
            "--json {tmp}/a-file/report.json: {tmp}/a-file is a file, not a folder",
        ),
        (["--cache", "{tmp}/a-file/cache"], "--cache: cannot create the folder {tmp}/a-file/cache"),
        (["--torch-threads", "0"], "--torch-threads must be >= 1, got 0"),
    ],
)
def test_the_benchmark_refuses_bad_outputs_before_it_runs(tmp_path, monkeypatch, argv, message):
    """Checked before jax starts a row: a report or cache that cannot be written, or no torch
    threads, would otherwise fail (or mislead) after minutes of timing."""
    (tmp_path / "a-file").write_text("kept")
    monkeypatch.setitem(bench.ROWS, "one", FAKE_ROWS["one"])
    monkeypatch.setattr(bench.cli, "run", lambda *a, **k: pytest.fail("the rows ran"))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--rows", "one", *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(ValueError) as e:
        bench.main(args)
    assert str(e.value) == message.format(tmp=tmp_path) or str(e.value).startswith(
        message.format(tmp=tmp_path) + " ("
    )
    assert (tmp_path / "a-file").read_text() == "kept"


def test_validate_rejects_a_broken_report():
    with pytest.raises(ValueError, match="schema"):
        bench.validate({"schema": "other"})
    doc = {"schema": bench.SCHEMA, "environment": {}, "results": [], "errors": {}}
    with pytest.raises(ValueError, match="environment lacks"):
        bench.validate(doc)


def _small_conv_row(monkeypatch):
    monkeypatch.setitem(
        bench.ROWS,
        "small-conv",
        bench.Row(
            "small-conv",
            "cpu",
            "a small conv",
            lambda ctx, name: bench.conv_micro(ctx, name, batch=1, size=8, channels=8),
        ),
    )


def test_the_command_line_runs_a_tiny_row(capsys, tmp_path, monkeypatch):
    """`--rows` with a real (micro) row: parsing, running, the table, the JSON."""
    _small_conv_row(monkeypatch)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "b.json"
    args = parser.parse_args(
        ["--rows", "small-conv", "--runs", "2", "--warmup", "0", "--no-compare", "--json", str(out)]
    )
    doc = bench.main(args)
    bench.validate(json.loads(out.read_text()))
    assert [r["impl"] for r in doc["results"]] == ["jaxdiff"]
    # Model FLOPs: every output (8x8, 8 channels) sums a whole 3x3x8 window, padding included
    # (XLA's cost analysis counts only the taps inside the image, 2 x 8 x 8 x 22 x 22).
    assert doc["results"][0]["flops"] == 2 * (8 * 8 * 8) * (3 * 3 * 8)
    assert doc["results"][0]["flops_source"] == "jaxpr"
    assert "| small-conv |" in capsys.readouterr().out


@pytest.mark.parametrize("tokens", [600, 1100, 2048])
def test_blocked_cpu_attention_matches_dot_product_attention(tokens):
    """The query-blocked CPU path (long sequences) against jax.nn.dot_product_attention: one
    block, two blocks with padded rows, two whole blocks. The tiny models of the parity tests
    only reach the unblocked path."""
    heads, dim = 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, tokens, heads * dim), np.float32) for _ in range(3))
    got = layers.attention(q, k, v, num_heads=heads)

    def split(x):
        return x.reshape(1, tokens, heads, dim)

    want = jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(got.shape)
    assert_close(got, want, "attention")


@pytest.mark.parametrize(
    "tokens, masked, batch, heads",
    [(48, False, 2, 2), (48, True, 2, 2), (48, True, 1, 3), (1100, False, 2, 2)],
    ids=["single-block", "causal-and-padding-mask", "uneven-groups", "query-blocked"],
)
def test_cpu_attention_gradient_matches_autodiff_of_dot_product_attention(
    tokens, masked, batch, heads
):
    """The CPU path's hand-written backwards (flash attention's: from the kept softmax numerator
    in groups of (batch, head) pairs, 3 pairs in 2 groups of 1 and 2 among them, or recomputed
    from the log-sum-exp for query blocks) against XLA's autodiff of jax.nn.dot_product_attention,
    for q, k and v."""
    dim = 8
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((batch, tokens, heads * dim), np.float32) for _ in range(3))
    cotangent = rng.standard_normal(q.shape, np.float32)
    mask = None
    if masked:  # CLIP's case: causal, and the last prompt's last 10 tokens are padding
        valid = np.ones((batch, 1, 1, tokens), bool)
        valid[-1, ..., -10:] = False
        mask = jnp.asarray(valid)

    def split(x):
        return x.reshape(batch, tokens, heads, dim)

    def ours(q, k, v):
        out = layers.attention(q, k, v, num_heads=heads, mask=mask, is_causal=masked)
        return jnp.sum(out * cotangent)

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(
            split(q), split(k), split(v), mask=mask, is_causal=masked
        )
        return jnp.sum(out.reshape(q.shape) * cotangent)

    got = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(reference, argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert_close(g, w, f"d{name}")


@pytest.mark.parametrize("parts", [1, 3])
def test_cpu_attention_gradient_keeps_the_softmax_and_groups_its_pairs(parts, monkeypatch):
    """Differentiated, the whole-sequence CPU path takes one exponential per group of pairs, in
    the forward, and none in the backward (it keeps the softmax's numerator); run alone, the
    forward is one group whatever `parts` is."""
    monkeypatch.setattr(layers, "_CPU_ATTENTION_PARTS", parts)
    q = k = v = jnp.ones((2, 16, 4 * 8), jnp.float32)  # 8 (batch, head) pairs

    def attend(q, k, v):
        return layers.attention(q, k, v, num_heads=4).sum()

    def exponentials(fn):
        return jax.jit(fn).lower(q, k, v).as_text().count("stablehlo.exponential")

    assert exponentials(jax.grad(attend, argnums=(0, 1, 2))) == parts
    assert exponentials(attend) == 1


def test_python_m_jaxdiff_cli_reports_bad_input_in_one_line():
    """`python -m jaxdiff.cli` runs the module as __main__; bad input must still be one line and
    exit status 2, not a traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", "bench", "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "jaxdiff: error: bench: --runs must be >= 1 and --warmup >= 0"
    ]


def _gpu_bench_dry(phase: str, total: int):
    """scripts/gpu_bench.sh's dry run of `phase`: each group's command on stdout."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_bench.sh"
    return subprocess.run(
        ["bash", str(script), phase, str(total)],
        env={"GPU_BENCH_DRY": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )


def test_the_gpu_script_runs_every_gpu_row_with_flags_the_benchmark_takes():
    """scripts/gpu_bench.sh is only ever run on the lent GPU, where a misspelt row or flag would
    cost device time: its dry run lists each group's command, which must parse, name known rows,
    cover every `gpu` row between its phases, and stay inside the phase's seconds."""
    import shlex

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    covered = []
    phases = (
        ("targets", 540),
        ("train", 200),
        ("memory", 240),
        ("train32", 300),
        ("maxbatch", 420),
        ("profile", 240),
        ("flags", 300),
    )
    for phase, total in phases:
        out = _gpu_bench_dry(phase, total)
        lines = out.stdout.strip().splitlines()
        assert lines, out.stderr
        for line in lines:
            name, limit, program, *argv = shlex.split(line)
            assert program == "scripts/benchmark.py"
            assert 30 <= int(limit) <= total, line
            args = parser.parse_args(argv)
            assert args.json == f"bench-out/{name}.json"
            covered += [row.name for row in bench.select_rows(args.rows, "gpu")]
    gpu_rows = {name for name, row in bench.ROWS.items() if row.device == "gpu"}
    assert gpu_rows <= set(covered)
    assert {bench.ROWS[name].device for name in set(covered) - gpu_rows} <= {"opt-in"}


def test_the_gpu_script_keeps_xla_autotuning_results_under_a_flag_xla_parses(tmp_path):
    """gpu_bench.sh keeps XLA's autotuning results from one device session to the next: a
    folder set by an XLA flag, filled from the repository's archive for the device's jaxlib.
    XLA aborts a process on a flag it does not know (the script tries it once on the device and
    goes on without it), so the flag must parse, and a compile with it work, on this jaxlib."""
    import subprocess
    import sys

    out = _gpu_bench_dry("train", 200)
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("autotune ")]
    _, setting, archive = line.split()
    flag, folder = setting.split("=")
    assert flag == "--xla_gpu_per_fusion_autotune_cache_dir" and folder.startswith("/tmp/")
    assert archive == "docs/runs/xla-autotune/jaxlib-VERSION.tar.xz"
    # Every group autotunes from the folder but the cold-compile target's.
    out = _gpu_bench_dry("targets", 540)
    groups = [line.split()[0] for line in out.stdout.splitlines()]
    tuned = [
        x.split()[0] for x in out.stderr.splitlines() if x.endswith(f"autotunes from {folder}")
    ]
    assert groups[0] == "targets" and tuned == groups[1:] and len(tuned) >= 3
    code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())"
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flag}={tmp_path}"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "4.0", out.stderr[-1000:]


def test_xla_flag_sets_append_in_order_once_and_each_parses_in_xla():
    """`--xla-flags` sets go after the user's own XLA_FLAGS, each once; "default" adds none. XLA
    aborts the process at its first compile on a flag it does not know or a value it cannot
    parse, GPU flags included on a CPU-only jaxlib, so each set is tried in a fresh process: a
    misspelt candidate fails here, not on the lent GPU."""
    import subprocess
    import sys

    sets = bench.XLA_FLAG_SETS
    assert bench.with_xla_flag_sets(" --mine=1 ", ["default"]) == "--mine=1"
    both = bench.with_xla_flag_sets("--mine=1", ["graphs", "gpu", "graphs", "default"])
    assert both == f"--mine=1 {sets['graphs']} {sets['gpu']}"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args(["--xla-flags", "gpu", "graphs"]).xla_flags == ["gpu", "graphs"]
    assert parser.parse_args([]).xla_flags == ["default"]
    code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())"
    for flags in [*sets.values(), "--xla_gpu_enable_command_buffer=+NO_SUCH_COMMAND"]:
        env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        accepted = out.returncode == 0 and out.stdout.strip() == "4.0"
        assert accepted == ("NO_SUCH" not in flags), (flags, out.stderr[-1000:])
    # `cpu-cores`: one CPU device per core this process may use.
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": sets["cpu-cores"]}
    code = "import jax; print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(len(os.sched_getaffinity(0))), out.stderr[-1000:]


@pytest.mark.parametrize(
    "script, argv",
    [
        ("benchmark.py", ["--xla-flags", "nonsense"]),
        ("benchmark.py", ["--runs", "0"]),
        ("profile_summary.py", []),
        ("unet_roofline.py", ["no-such-preset", "2"]),
        ("unet_roofline.py", ["sd15", "0"]),
        ("gpu_program.py", ["no-such-preset", "2"]),
        ("gpu_program.py", ["sd15", "2", "--target", "a100"]),
        ("gpu_program.py", ["sd15", "2", "--vae", "--train"]),
        ("gpu_program.py", ["sd15", "2", "--remat"]),
        ("make_toy_dataset.py", ["--count", "many"]),
        ("make_shapes_samples.py", ["--seed", "x"]),
        ("train_shapes_model.py", []),
    ],
)
def test_the_scripts_report_a_bad_argument_in_one_line(script, argv):
    """As the `jaxdiff` command does: one line naming the problem, exit status 2, no usage
    block and no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / script
    out = subprocess.run(
        [sys.executable, str(path), *argv], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith(f"{script}: error: "), out.stderr


@pytest.mark.parametrize("argv", [["nonsense"], ["targets", "30"], ["memory", "ten"]])
def test_the_gpu_script_refuses_a_bad_phase_or_budget_in_one_line(argv):
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_bench.sh"
    out = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "gpu_bench.sh:" in out.stderr


@pytest.mark.slow  # bench plumbing, 10-30 s each: CI's slow pass runs it
def test_the_train_rows_start_from_weights_drawn_on_the_host():
    """The train rows time the step: the UNet starts from `random_params`, as the other rows'
    models, not from the train state's initializer, whose compile (a kernel per random draw)
    outlasted a GPU group's time."""
    from jaxdiff.bench.rows import _jaxdiff_train_step
    from jaxdiff.models.build import random_params

    step, state, batch, key, run = _jaxdiff_train_step("tiny", 32, 2, "float32")
    drawn = jax.tree_util.tree_leaves(random_params(run.setup.configs["unet"]))
    leaves = jax.tree_util.tree_leaves(state.params["unet"])
    assert len(leaves) == len(drawn) > 10
    for ours, host in zip(leaves, drawn, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), host)
    state, metrics = step(state, batch, key)
    assert np.isfinite(float(metrics["loss"]))

    # The case over several CPU devices (`--xla-flags cpu-cores`) times the same step with the
    # batch split across them: the same weights, and the same loss.
    step, state, batch, key, run = _jaxdiff_train_step("tiny", 32, 2, "float32", data=2)
    assert run.cfg.mesh_data == 2 and len(batch["latents"].sharding.device_set) == 2
    assert batch["latents"].addressable_shards[0].data.shape[0] == 1
    for ours, host in zip(jax.tree_util.tree_leaves(state.params["unet"]), drawn, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), host)
    _, split = step(state, batch, key)
    assert_close(split["loss"], metrics["loss"], "the loss, data parallel over 2 devices")


def test_profile_writes_a_trace_per_case_that_the_summary_reads(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from jaxdiff.bench import profile

    _small_conv_row(monkeypatch)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    folder = tmp_path / "traces"
    args = ["--rows", "small-conv", "--runs", "2", "--warmup", "0", "--no-compare"]
    bench.main(parser.parse_args([*args, "--profile", str(folder)]))
    name = "small-conv-conv-3x3-b1-8x8-8-8-float32.xplane.pb"
    assert [p.name for p in folder.iterdir()] == [name]
    summary = profile.summarize(folder / name)
    assert [p["plane"] for p in summary["planes"]] == ["/host:CPU"]
    lines = summary["planes"][0]["lines"]
    # The 3 traced calls, each one execution of the compiled program.
    executions = [
        e for line in lines for e in line["top"] if e["name"].startswith("PjitFunction")
    ] or [e for line in lines for e in line["top"] if "Execute" in e["name"]]
    assert executions and executions[0]["count"] % profile.PROFILE_CALLS == 0
    for line in lines:
        totals = [e["total_ms"] for e in line["top"]]
        assert totals == sorted(totals, reverse=True)
        assert sum(e["share"] for e in line["top"]) <= 1 + 1e-9
        t = line["timeline"]
        assert 0 < t["busy_ms"] <= min(t["span_ms"], line["total_ms"]) + 1e-6
        assert sum(t["gaps_ms"]) == pytest.approx(t["span_ms"] - t["busy_ms"], abs=1e-6)
    # The host's side of each call: every call found, its events' self times adding up to it.
    host = profile.summarize(folder / name, top=1000)["host_calls"]
    assert host["calls"] == profile.PROFILE_CALLS and host["call_ms"] > 0
    assert sum(e["per_call_ms"] for e in host["self"]) == pytest.approx(host["call_ms"], rel=1e-6)
    assert any(e["name"].startswith("PjitFunction") for e in host["self"]), host["self"]
    script = Path(__file__).parents[1] / "scripts" / "profile_summary.py"
    out = subprocess.run(
        [sys.executable, str(script), str(folder / name), "--top", "3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "/host:CPU |" in out.stdout, out.stderr
    assert f"{profile.PROFILE_CALLS} traced calls" in out.stdout, out.stdout


def test_a_timeline_counts_overlapping_events_once_and_finds_the_gaps():
    from jaxdiff.bench.profile import timeline

    # Kernels at 0-2 and 1-3 (overlapping), 2.5-2.8 (nested), then 4-5 and 9-10 ms, unsorted.
    ms = 1_000_000
    events = [(9 * ms, 10 * ms), (0, 2 * ms), (4 * ms, 5 * ms), (1 * ms, 3 * ms)]
    events.append((int(2.5 * ms), int(2.8 * ms)))
    t = timeline(events)
    assert t["span_ms"] == pytest.approx(10.0)
    assert t["busy_ms"] == pytest.approx(5.0)  # 0-3, 4-5, 9-10
    assert t["gaps_ms"] == pytest.approx([4.0, 1.0])
    assert timeline([]) == {"span_ms": 0.0, "busy_ms": 0.0, "gaps_ms": []}
    assert timeline([(5, 7)]) == {"span_ms": 2e-6, "busy_ms": 2e-6, "gaps_ms": []}


def test_self_times_split_each_traced_call_among_the_events_inside_it():
    """Events nest on a host thread: an event's self time is its duration less its direct
    children's, so a call's events add up to the call. Events outside the calls (the profiler's
    own frames) count nowhere; numbered names add up under one (`host_calls`)."""
    from jaxdiff.bench.profile import CALL_ANNOTATION, self_times

    call = CALL_ANNOTATION
    events = [
        ("stop_trace", 100, 50),  # after the calls: not counted
        (call, 0, 40),
        ("PjitFunction", 2, 30),  # self 30 - 20 - 5 = 5
        ("Execute", 5, 20),  # self 20 - 4 - 6 = 10
        ("command_buffer_7", 6, 4),
        ("command_buffer_12", 12, 6),
        ("ParseArguments", 26, 5),
        (call, 50, 10),
        ("PjitFunction", 51, 8),
    ]
    calls, totals = self_times(events)
    assert calls == [(0, 40), (50, 60)]
    assert totals == {
        call: [10 + 2, 2],
        "PjitFunction": [5 + 8, 2],
        "Execute": [10, 1],
        "command_buffer_7": [4, 1],
        "command_buffer_12": [6, 1],
        "ParseArguments": [5, 1],
    }
    assert sum(own for own, _ in totals.values()) == 40 + 10
    # A trace from before the annotation: the harness's call frame is each call.
    old = [("$harness.py:378 call", 0, 10), ("PjitFunction", 1, 8), ("$profiler.py:271", 20, 5)]
    assert self_times(old) == ([(0, 10)], {"$harness.py:378 call": [2, 1], "PjitFunction": [8, 1]})
    assert self_times([("PjitFunction", 1, 8)]) == ([], {})


def test_host_calls_add_up_numbered_names_per_call():
    from types import SimpleNamespace

    from jaxdiff.bench.profile import CALL_ANNOTATION, host_calls

    def line(name, events):
        return SimpleNamespace(
            name=name,
            events=[SimpleNamespace(name=n, start_ns=s, duration_ns=d) for n, s, d in events],
        )

    ms = 1_000_000
    events = []
    for i in range(2):
        t = 100 * ms * i
        events += [
            (CALL_ANNOTATION, t, 20 * ms),
            ("cuGraphLaunch (CudaGraph:1806)", t + 1 * ms, 6 * ms),
            ("cuGraphLaunch (CudaGraph:11)", t + 8 * ms, 2 * ms),
            ("cudnn-conv-bw-filter.5", t + 11 * ms, 1 * ms),
            ("cudnn-conv-bw-filter.17", t + 13 * ms, 3 * ms),
        ]
    plane = SimpleNamespace(lines=[line("an idle thread", []), line("python3", events)])
    host = host_calls(plane)
    assert (host["line"], host["calls"], host["call_ms"]) == ("python3", 2, pytest.approx(20.0))
    assert [(e["name"], e["per_call_ms"], e["per_call"]) for e in host["self"]] == [
        ("cuGraphLaunch (CudaGraph:*)", pytest.approx(8.0), 2),
        (CALL_ANNOTATION, pytest.approx(8.0), 1),
        ("cudnn-conv-bw-filter.*", pytest.approx(4.0), 2),
    ]
    assert host_calls(SimpleNamespace(lines=[line("python3", events[1:3])])) is None


def test_per_call_cuts_a_trace_at_its_largest_gaps():
    """Three traced calls, each a few kernels with small gaps between them and large ones (the
    host's work) between calls: each call's span and busy time, overlaps counted once."""
    from jaxdiff.bench.profile import per_call

    ms = 1_000_000
    first = [(0, 2 * ms), (1 * ms, 3 * ms), (int(3.1 * ms), 4 * ms)]  # span 4, busy 3.9
    second = [(10 * ms, 11 * ms), (int(11.2 * ms), 12 * ms)]  # span 2, busy 1.8
    third = [(20 * ms, 25 * ms)]  # span 5
    calls = per_call([*third, *second, *first], calls=3)
    assert [c["events"] for c in calls] == [3, 2, 1]
    assert [c["span_ms"] for c in calls] == pytest.approx([4.0, 2.0, 5.0])
    assert [c["busy_ms"] for c in calls] == pytest.approx([3.9, 1.8, 5.0])
    # A nested event whose end comes before an earlier one's is no gap: (0, 9) holds (1, 2).
    assert [c["events"] for c in per_call([(0, 9), (1, 2), (20, 21), (40, 41)], 3)] == [2, 1, 1]
    assert per_call([(0, 1), (2, 3)], calls=3) == []  # fewer events than calls
    assert per_call([(0, 5), (1, 2), (3, 4)], calls=3) == []  # no gaps to cut at


@pytest.mark.parametrize(
    "name, kind",
    [
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64",
            "attention",
        ),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_bias_NNT", "matrix product"),
        ("gemm_fusion_dot_44", "matrix product"),
        ("input_concatenate_reduce_fusion_1", "reduction"),
        ("wrapped_concatenate_2", "copy, slice, concatenate"),
        ("loop_slice_fusion_315", "copy, slice, concatenate"),
        ("loop_convert_fusion", "other fusion"),
        ("Memset 3", "memset"),
    ],
)
def test_kernel_kinds_from_names_seen_on_an_h200(name, kind):
    from jaxdiff.bench.profile import kernel_kind

    assert kernel_kind(name) == kind


def test_profile_refuses_a_folder_it_cannot_create_and_a_file_it_cannot_read(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="--profile"):
        bench.main(parser.parse_args(["--rows", "tiny-unet", "--profile", str(blocker / "x")]))
    script = Path(__file__).parents[1] / "scripts" / "profile_summary.py"
    for path in (tmp_path / "missing.xplane.pb", blocker):
        out = subprocess.run(
            [sys.executable, str(script), str(path)], capture_output=True, text=True
        )
        assert out.returncode == 2, out
        assert len(out.stderr.strip().splitlines()) == 1 and str(path) in out.stderr


def test_the_dispatch_row_passes_each_unet_parameter_array(monkeypatch):
    from jaxdiff.bench.rows import dispatch_micro
    from jaxdiff.models.build import abstract_params
    from jaxdiff.models.presets import PRESETS
    from jaxdiff.train.state import SMALL_LEAF

    seen = []
    measure = bench.rows.measure_jax

    def spy(ctx, fn, args, **kw):
        seen.append(args)
        return measure(ctx, fn, args, **kw)

    monkeypatch.setattr(bench.rows, "measure_jax", spy)
    results = dispatch_micro(bench.Context(runs=2, warmup=0, compare=False), "dispatch", "tiny")
    abstract = abstract_params(PRESETS["tiny"].unet)
    n = len(jax.tree_util.tree_leaves(abstract))
    kernels = sum(a.ndim == 4 for a in jax.tree_util.tree_leaves(abstract))
    small = sum(a.size <= SMALL_LEAF for a in jax.tree_util.tree_leaves(abstract))
    packed = n + 3 * (n - small + 1)
    assert 0 < small < n
    lengths = [n, 1, n, n, 4 * n, packed, n + 3]
    assert [len(jax.tree_util.tree_leaves(a)) for a in seen] == lengths
    assert [r.case for r in results] == [
        f"tiny unet: {n} arrays, a call",
        f"tiny unet: {n} values in 1 array",
        f"tiny unet: its tree of {n}, a call",
        f"tiny unet: its tree of {n}, {kernels} in the GPU's kernel layout, a call",
        f"tiny train state: {4 * n} arrays updated, donated, a call",
        f"tiny train state: {packed} arrays updated, donated, the small leaves of 3 in one array"
        f" each ({small}), a call",
        f"tiny train state: {n + 3} arrays updated, donated, 3 of them one array each, a call",
    ]
    # The train state's cases: the weights one array each; the EMA's and moments' leaves one
    # array each, their small leaves in one array, or all of them in one, holding all of them.
    for (state,), arrays in zip(seen[4:], (n, n - small + 1, 1), strict=True):
        assert list(state) == ["params", "ema", "mu", "nu"] and len(state["params"]) == n
        sizes = [sum(a.size for a in state[k]) for k in ("ema", "mu", "nu")]
        assert sizes == [n] * 3 and [len(state[k]) for k in ("ema", "mu", "nu")] == [arrays] * 3
    # A flat list; then the UNet's own tree (nested dicts), as the UNet rows pass it.
    assert isinstance(seen[0][0], list)
    for (tree,) in seen[2:4]:
        paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert {jax.tree_util.keystr(k) for k, _ in paths} == {
            jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
        }
    orders = [
        [a.format.layout.major_to_minor for a in jax.tree_util.tree_leaves(t[0])] for t in seen[2:4]
    ]
    assert orders[0].count((3, 0, 1, 2)) == 0
    assert orders[1].count((3, 0, 1, 2)) == kernels > 0
