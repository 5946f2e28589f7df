"""The largest-batch search and its benchmark rows (jaxdiff/bench/memory.py).

The search runs on memory curves given as functions; the row runs on the tiny preset with a
budget taken from the tiny pipeline's own compiled memory.
"""

import argparse
import dataclasses
import json
import math
import os

import jax
import pytest

from jaxdiff import bench
from jaxdiff.cli import main as jaxdiff_main

# Measured on the CPU for the tiny preset, 25 steps (bytes by batch): not monotone.
TINY_BYTES = {1: 12_902_412, 2: 12_729_976, 4: 15_462_224, 8: 21_500_160}


def tiny_like(batch):
    """The tiny preset's figures, straight lines between them, and the slope from 4 to 8 on."""
    if batch in TINY_BYTES:
        return TINY_BYTES[batch]
    if batch > 8:
        return TINY_BYTES[8] + (batch - 8) * (TINY_BYTES[8] - TINY_BYTES[4]) // 4
    a = max(b for b in TINY_BYTES if b < batch)
    c = min(b for b in TINY_BYTES if b > batch)
    return TINY_BYTES[a] + (TINY_BYTES[c] - TINY_BYTES[a]) * (batch - a) // (c - a)


def linear(batch):
    return 2_000_000_000 + 150_000_000 * batch


def steps_of_16(batch):
    """Memory that grows in blocks of 16 batches, flat inside each."""
    return 1_000_000_000 + 400_000_000 * math.ceil(batch / 16)


def search(memory, budget, *, max_probes, limit=4096, **kw):
    """Run the search, check what every search must satisfy, and return it."""
    asked = []

    def memory_at(batch):
        asked.append(batch)
        return memory(batch)

    found = bench.largest_batch(memory_at, budget, limit=limit, **kw)
    assert found.probes == [(b, memory(b)) for b in asked]  # every call, in order
    assert len(set(asked)) == len(asked)  # never the same batch twice
    assert len(asked) <= max_probes, asked
    fits = [b for b, m in found.probes if m is not None and m <= budget]
    fails = [b for b, m in found.probes if m is None or m > budget]
    if 0 < found.batch < limit:  # exact at the boundary: b fits and b + 1 was asked and fails
        assert found.batch in fits and found.batch + 1 in fails
    return found


def largest_by_brute_force(memory, budget, limit=4096):
    return max((b for b in range(1, limit + 1) if memory(b) <= budget), default=0)


@pytest.mark.parametrize("answer", [9, 17, 100, 333, 1000, 4000])
def test_a_linear_curve_takes_four_probes(answer):
    found = search(linear, linear(answer) + 1, max_probes=4)
    assert found.batch == answer and not found.at_limit
    assert [b for b, _ in found.probes] == [8, 16, answer, answer + 1]


@pytest.mark.parametrize("answer", [8, 16])
def test_an_answer_at_a_first_probe_takes_three(answer):
    found = search(linear, linear(answer) + 1, max_probes=3)
    assert found.batch == answer


@pytest.mark.parametrize(
    "answer, max_probes", [(3, 6), (5, 5), (7, 4), (9, 4), (30, 4), (200, 4), (1000, 4)]
)
def test_a_curve_that_dips_at_small_batches(answer, max_probes):
    """Batch 2 needs less than batch 1 (the tiny preset's figures); the answer is still exact."""
    budget = tiny_like(answer) + 5
    assert largest_by_brute_force(tiny_like, budget) == answer
    assert search(tiny_like, budget, max_probes=max_probes).batch == answer


def test_below_batch_1_the_dip_is_not_searched():
    """Batches 1 and 2 fit, 3 does not: found. Batch 2 fits but 1 does not: 0, as documented."""
    assert search(tiny_like, 12_950_000, max_probes=4).batch == 2
    assert search(tiny_like, TINY_BYTES[2] + 5, max_probes=2).batch == 0


@pytest.mark.parametrize("answer", [16, 48, 112, 1008])
def test_a_step_curve(answer):
    budget = steps_of_16(answer) + 1
    assert largest_by_brute_force(steps_of_16, budget) == answer
    assert search(steps_of_16, budget, max_probes=5).batch == answer


def test_curves_bent_either_way():
    """Convex (memory growing faster than the batch) and concave: more probes, same answer."""

    def convex(batch):
        return 1_000_000_000 + 1_000_000 * batch + 5_000 * batch**2

    def concave(batch):
        return 1_000_000_000 + int(50_000_000 * math.sqrt(batch)) + 1_000_000 * batch

    for memory in (convex, concave):
        for answer in (50, 300, 900):
            found = search(memory, memory(answer) + 7, max_probes=10)
            assert found.batch == answer


def test_a_batch_without_a_figure_counts_as_not_fitting():
    """Compiling ran out of memory above batch 60: those probes have no figure."""

    def memory(batch):
        if batch > 60:
            return None
        return 1_000_000_000 + 1_000_000 * batch * (1 if batch <= 16 else 20)

    budget = memory(40) + 5
    found = search(memory, budget, max_probes=10)
    assert found.batch == 40
    assert any(m is None for _, m in found.probes)


def test_the_answer_below_start():
    found = search(linear, linear(3) + 1, max_probes=4)
    assert found.batch == 3
    assert [b for b, _ in found.probes] == [8, 1, 3, 4]


def test_nothing_fits():
    found = search(linear, linear(1) - 1, max_probes=2)
    assert found == (0, [(8, linear(8)), (1, linear(1))], False)
    assert bench.largest_batch(linear, linear(1) - 1, start=1).probes == [(1, linear(1))]


def test_everything_up_to_the_limit_fits():
    found = search(linear, linear(5000), max_probes=3, limit=4096)
    assert found.batch == 4096 and found.at_limit
    assert [b for b, _ in found.probes] == [8, 16, 4096]
    found = search(linear, linear(64), max_probes=1, start=64, limit=64)
    assert found.batch == 64 and found.at_limit


@pytest.mark.parametrize(
    "budget, kw, message",
    [(0, {}, "budget"), (100, {"start": 0}, "start"), (100, {"start": 10, "limit": 5}, "start")],
)
def test_the_search_refuses_bad_arguments(budget, kw, message):
    with pytest.raises(ValueError, match=message):
        bench.largest_batch(linear, budget, **kw)


class FakeDevice:
    device_kind = "Fake GPU"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_the_budget_is_the_allocator_limit_less_what_is_in_use(monkeypatch):
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.95")
    device = FakeDevice({"bytes_limit": 76 * 2**30, "bytes_in_use": 2**30})
    budget, source = bench.device_budget(device)
    assert budget == 75 * 2**30
    assert "bytes_limit" in source and "0.95" in source and "1.00 GiB already in use" in source
    budget, source = bench.device_budget(device, 40 * 2**30)
    assert budget == 39 * 2**30 and "--memory-gib" in source


def test_a_device_without_memory_stats_needs_the_override():
    cpu = jax.devices()[0]
    with pytest.raises(ValueError, match="--memory-gib"):
        bench.device_budget(cpu)
    assert bench.device_budget(cpu, 3 * 2**30) == (3 * 2**30, "--memory-gib (3.00 GiB)")


def test_the_max_batch_rows_are_registered():
    for name in ("sd15-max-batch", "sdxl-max-batch"):
        row = bench.ROWS[name]
        assert row.device == "gpu" and row.mem_fraction == bench.MEM_FRACTION


def test_the_memory_fraction_is_raised_only_for_rows_that_all_need_it(monkeypatch):
    from jaxdiff.bench.cli import raise_memory_fraction

    plain = bench.Row("plain", "gpu", "", lambda ctx, name: [])
    needy = bench.Row("needy", "gpu", "", lambda ctx, name: [], mem_fraction=0.95)
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    raise_memory_fraction([plain])
    raise_memory_fraction([plain, needy])  # a torch peer of `plain` would get less of the GPU
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ
    raise_memory_fraction([needy])
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.95"
    # A fraction the user set stays, under either name (jax refuses both at once).
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    raise_memory_fraction([needy])
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_memory_budget_is_one_line_and_exit_status_2(value, capsys):
    assert jaxdiff_main(["bench", f"--memory-gib={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--memory-gib must be a number > 0" in err


def test_the_memory_budget_reaches_the_rows(monkeypatch):
    seen = []

    def spy(ctx, name):
        seen.append(ctx.memory_budget)
        return [bench.Result(name, "case", "jaxdiff", 1.0, [1.0])]

    monkeypatch.setitem(bench.ROWS, "spy", bench.Row("spy", "cpu", "records the budget", spy))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.main(parser.parse_args(["--rows", "spy", "--memory-gib", "1.5", "--runs", "1"]))
    assert seen == [int(1.5 * 2**30)]


def test_validate_checks_the_max_batch_record():
    record = bench.Result("r", "case", "jaxdiff", 1.0, [1.0], max_batch={"batch": 3})
    doc = {
        "schema": bench.SCHEMA,
        "environment": {"date": "", "device_kind": "", "jax": "", "runs": 1},
        "results": [dataclasses.asdict(record)],
        "errors": {},
    }
    with pytest.raises(ValueError, match="max_batch lacks"):
        bench.validate(doc)


# ----------------------------------------------------------------------------- the row, tiny

PROMPT = "a photograph of an astronaut riding a horse"
TINY_KW = dict(steps=2, sampler="euler", width=32, height=32)


@pytest.fixture(scope="module")
def tiny_memory():
    """The tiny pipeline's compiled memory on one device at batches 9 and 10. The row compiles
    the same programs, which jax then takes from its in-memory cache."""
    from jaxdiff.convert.diffusers import random_pipeline
    from jaxdiff.pipelines import StableDiffusion

    pipe = StableDiffusion(
        random_pipeline("tiny", seed=0), dtype="bfloat16", devices=jax.devices()[:1]
    )
    return {b: bench.memory_of(pipe.lower(PROMPT, batch=b, **TINY_KW).compile()) for b in (9, 10)}


def _tiny_row(budget):
    ctx = bench.Context(runs=1, warmup=0, memory_budget=budget, log=lambda line: None)
    return ctx, bench.max_batch_sampling(ctx, "tiny", 32, 2, "bfloat16", "tiny-max-batch")


@pytest.mark.slow  # bench plumbing, 10-30 s each: CI's slow pass runs it
def test_the_row_finds_and_runs_the_largest_tiny_batch(tiny_memory):
    assert tiny_memory[9] < tiny_memory[10]
    budget = (tiny_memory[9] + tiny_memory[10]) // 2
    ctx, results = _tiny_row(budget)
    (result,) = results
    found = result.max_batch
    assert found["batch"] == found["analysis_batch"] == 9
    assert found["runs"] == [{"batch": 9, "bytes": tiny_memory[9], "error": None}]  # it ran
    assert [9, tiny_memory[9]] in found["probes"] and [10, tiny_memory[10]] in found["probes"]
    assert found["budget_bytes"] == budget and "--memory-gib" in found["budget_source"]
    assert not found["at_limit"]
    assert result.memory_bytes == tiny_memory[9]
    assert "b9" in result.case and result.median_ms > 0 and result.items_per_s > 0
    bench.validate(json.loads(json.dumps(bench.report(bench.environment(ctx), results, {}))))


@pytest.mark.slow  # bench plumbing, 10-30 s each: CI's slow pass runs it
def test_the_row_backs_off_when_the_found_batch_runs_out_of_memory(tiny_memory, monkeypatch):
    """XLA's figure can miss memory (fragmentation, buffers outside the program): a run that
    runs out of memory is retried at a smaller batch, and the record says so."""
    from jaxdiff.pipelines import StableDiffusion

    generate = StableDiffusion.generate

    def short_of_memory_above_8(self, prompt, *, batch=1, **kw):
        if batch > 8:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (fake)")
        return generate(self, prompt, batch=batch, **kw)

    monkeypatch.setattr(StableDiffusion, "generate", short_of_memory_above_8)
    _, (result,) = _tiny_row((tiny_memory[9] + tiny_memory[10]) // 2)
    found = result.max_batch
    assert (found["analysis_batch"], found["batch"]) == (9, 8)
    assert found["runs"][0]["batch"] == 9 and "RESOURCE_EXHAUSTED" in found["runs"][0]["error"]
    assert found["runs"][1]["batch"] == 8 and found["runs"][1]["error"] is None
    assert "b9 ran out of memory, b8 ran" in result.note
