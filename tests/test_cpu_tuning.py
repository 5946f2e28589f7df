"""jaxdiff.cpu_tuning: when the `jaxdiff` command starts itself again with glibc's huge-page and
heap tunables, that it does so once, that the huge pages take the page faults off XLA's
temporaries, and that the kept heap, with jax's CPU programs run on the calling thread, reuses
their pages from call to call; and the CPU XLA flags: when they are set, that this jaxlib accepts
them, and that convolutions and their gradients give the same numbers under them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tolerances import assert_close

from jaxdiff import cpu_tuning

GLIBC = (2, 36)
HUGE_PAGES = (
    cpu_tuning.glibc_version() is not None
    and cpu_tuning.glibc_version() >= cpu_tuning.MIN_GLIBC
    and cpu_tuning.thp_mode() == "madvise"
)
needs_huge_pages = pytest.mark.skipif(
    not HUGE_PAGES, reason="needs glibc >= 2.35 and transparent huge pages in madvise mode"
)
XLA_FLAGS_APPLY = cpu_tuning.jaxlib_version() in cpu_tuning.XLA_FLAG_JAXLIB
HEAP = ":".join(f"{name}={value}" for name, value in cpu_tuning.HEAP_TUNABLES)
GLIBC_HEAP = (
    cpu_tuning.glibc_version() is not None
    and cpu_tuning.glibc_version() >= cpu_tuning.MIN_GLIBC_HEAP
)
needs_glibc_heap = pytest.mark.skipif(not GLIBC_HEAP, reason="needs glibc >= 2.26 (tunables)")


# ----------------------------------------------------------------------------- huge pages


def test_tuned_environ_sets_the_tunable_where_it_applies():
    env = cpu_tuning.tuned_environ({"HOME": "/h"}, GLIBC, "madvise")
    assert env == {
        "HOME": "/h",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        cpu_tuning.RESTARTED: "1",
    }
    # Other tunables are kept, the new one appended.
    env = cpu_tuning.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert cpu_tuning.tuned_environ({cpu_tuning.OPT_OUT: "1"}, (2, 35), "madvise") is not None


def test_tuned_environ_keeps_the_heap_where_jax_runs_on_the_cpu_alone():
    assert HEAP == "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4611686018427387904"
    env = cpu_tuning.tuned_environ({}, GLIBC, "madvise", cpu=True)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.hugetlb=1:{HEAP}"
    assert env[cpu_tuning.RESTARTED] == "1"
    # Each where it applies: the heap's without huge pages, or with a glibc before 2.35.
    for glibc, thp in ((GLIBC, "never"), ((2, 26), "madvise"), (GLIBC, "always")):
        assert cpu_tuning.tuned_environ({}, glibc, thp, cpu=True)["GLIBC_TUNABLES"] == HEAP
    # Not with an accelerator, nor before glibc 2.26; a user's heap tunable keeps both out.
    assert cpu_tuning.tuned_environ({}, GLIBC, "never", cpu=False) is None
    assert cpu_tuning.tuned_environ({}, (2, 25), "madvise", cpu=True) is None
    for mine in ("glibc.malloc.mmap_max=65536", "glibc.malloc.trim_threshold=1"):
        env = cpu_tuning.tuned_environ({"GLIBC_TUNABLES": mine}, GLIBC, "madvise", cpu=True)
        assert env["GLIBC_TUNABLES"] == f"{mine}:glibc.malloc.hugetlb=1"
    assert cpu_tuning.tuned_environ({cpu_tuning.OPT_OUT: "0"}, GLIBC, "never", cpu=True) is None


def test_cpu_only_reads_jax_platforms_then_the_installed_plugins(monkeypatch):
    assert cpu_tuning.cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not cpu_tuning.cpu_only({"JAX_PLATFORMS": "cuda"})
    assert not cpu_tuning.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
    monkeypatch.setattr(cpu_tuning.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(cpu_tuning.metadata, "entry_points", lambda group: [])
    assert cpu_tuning.cpu_only({})
    monkeypatch.setattr(cpu_tuning.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not cpu_tuning.cpu_only({})
    assert cpu_tuning.cpu_only({"JAX_PLATFORMS": "cpu"})  # named: the plugins do not matter
    monkeypatch.setattr(cpu_tuning.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(cpu_tuning.importlib.util, "find_spec", lambda name: name == "libtpu")
    assert not cpu_tuning.cpu_only({})


def test_heap_kept_reads_the_mmap_tunable():
    assert cpu_tuning.heap_kept({"GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{HEAP}"})
    assert cpu_tuning.heap_kept({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not cpu_tuning.heap_kept({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=10"})
    assert not cpu_tuning.heap_kept({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not cpu_tuning.heap_kept({})


@pytest.mark.parametrize(
    "environ, glibc, thp",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's choice
        ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=2"}, GLIBC, "madvise"),
        ({cpu_tuning.OPT_OUT: "0"}, GLIBC, "madvise"),  # opted out
        ({cpu_tuning.RESTARTED: "1"}, GLIBC, "madvise"),  # restarted once already
        ({}, (2, 34), "madvise"),  # glibc without the tunable
        ({}, None, "madvise"),  # musl, macOS, Windows
        ({}, GLIBC, "always"),  # the kernel uses huge pages already
        ({}, GLIBC, "never"),  # the tunable would do nothing
        ({}, GLIBC, None),  # no THP support
    ],
)
def test_tuned_environ_leaves_everything_else_alone(environ, glibc, thp):
    assert cpu_tuning.tuned_environ(environ, glibc, thp) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert cpu_tuning.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert cpu_tuning.thp_mode(str(path)) == "always"
    path.write_text("garbage\n")
    assert cpu_tuning.thp_mode(str(path)) is None
    assert cpu_tuning.thp_mode(str(tmp_path / "missing")) is None


def _env(**extra):
    """This environment without any tuning of its own, plus `extra`."""
    drop = (
        "GLIBC_TUNABLES",
        "XLA_FLAGS",
        "JAX_PLATFORMS",
        cpu_tuning.OPT_OUT,
        cpu_tuning.RESTARTED,
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


@needs_huge_pages
def test_reexec_starts_the_program_once_more_with_the_tunable():
    code = (
        "import os, sys; from jaxdiff.cpu_tuning import reexec_with_tunables as r; r(); "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "x", "--y"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 1  # printed once: after the one restart, not before it
    pid, tunables, args = lines[0].split(" ", 2)
    assert int(pid) == proc.pid  # the same process, its program image replaced
    assert tunables == "glibc.malloc.hugetlb=1" + (
        f":{HEAP}" if cpu_tuning.cpu_only(_env()) else ""
    )
    assert args == "['x', '--y']"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(**{cpu_tuning.OPT_OUT: "0"}), capture_output=True
    )
    assert out.stdout.decode().split(" ")[1] == "None"


@needs_huge_pages
@pytest.mark.parametrize("opt_out, starts", [(None, 2), ("0", 1)])
def test_the_jaxdiff_command_restarts_itself(opt_out, starts):
    """`python -X importtime` logs every import to stderr, in each start of the interpreter."""
    env = _env(**({cpu_tuning.OPT_OUT: opt_out} if opt_out else {}))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "jaxdiff", "samplers"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "euler" in out.stdout
    cli_imports = [line for line in out.stderr.splitlines() if line.endswith("| jaxdiff.cli")]
    assert len(cli_imports) == starts


_TEMPORARIES = """
import resource, sys
from jaxdiff.cpu_tuning import configure_jax, tune_process
tune_process()
import jax, jax.numpy as jnp, numpy as np
configure_jax()
@jax.jit
def f(u, v, w):  # the product's 128 MiB are a temporary: past glibc's largest mmap threshold
    return (u @ v) @ w
r = np.random.default_rng(0)
u, v, w = (jnp.asarray(r.standard_normal(s, np.float32)) for s in ((4096, 8), (8, 8192), (8192, 4)))
for _ in range(3):
    f(u, v, w).block_until_ready()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(u, v, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[5], jax.config.values["jax_cpu_enable_async_dispatch"])
"""


@needs_glibc_heap
def test_the_kept_heap_reuses_a_calls_temporaries():
    """With the heap tunables (the `jaxdiff` command's settings on a CPU-only machine), jax runs
    CPU programs on the calling thread and a call's 128 MiB of temporaries come back from the
    heap with no page faults; started with huge pages alone (no heap tunables), jax keeps its own
    threads and every call maps and faults in its temporaries afresh. The median call of 11:
    the process faults now and then for its own reasons."""
    runs = {}
    for kept in (True, False):
        extra = {"JAX_PLATFORMS": "cpu"}
        if not kept:  # as if restarted already, with the huge-page tunable only
            extra |= {cpu_tuning.RESTARTED: "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
        out = subprocess.run(
            [sys.executable, "-c", _TEMPORARIES], env=_env(**extra), capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        faults, asynchronous = out.stdout.split()
        runs[kept] = (int(faults), asynchronous)
    assert runs[True][1] == "False" and runs[False][1] == "True"
    # 64 faults a call at the least with 2 MiB pages, 32,768 with 4 KiB pages.
    assert runs[True][0] <= 4 and runs[False][0] >= 64


class _Reached(Exception):
    """Raised where a command's work would begin."""


@pytest.mark.parametrize(
    "argv, work",
    [
        (["generate", "p", "--out", "{tmp}/o.png", "--no-progress"], "jaxdiff.pipelines.load"),
        (["train", "{configs}/tiny.py", "--workdir", "{tmp}/run"], "jaxdiff.train.loop.train"),
        (["bench", "--rows", "tiny-unet", "--no-compare"], "jaxdiff.bench.cli.run"),
    ],
)
def test_the_commands_that_compute_configure_jax_before_their_work(
    monkeypatch, tmp_path, argv, work
):
    """`configure_jax` must run before jax's CPU backend does any work: the image commands (one
    `_pipeline` for all), `train` and `bench` call it before loading a model, training or
    timing."""
    from pathlib import Path

    from jaxdiff.cli import main

    calls = []

    def reached(*args, **kwargs):
        calls.append("work")
        raise _Reached

    monkeypatch.setattr(cpu_tuning, "configure_jax", lambda: calls.append("configure_jax"))
    monkeypatch.setattr(work, reached)
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after `bench` sets them
    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(_Reached):
        main([a.format(tmp=tmp_path, configs=configs) for a in argv])
    assert calls == ["configure_jax", "work"]


# ----------------------------------------------------------------------------- XLA flags


def test_tuned_xla_flags_where_they_apply():
    flags = cpu_tuning.CPU_XLA_FLAGS
    (measured,) = cpu_tuning.XLA_FLAG_JAXLIB
    assert cpu_tuning.tuned_xla_flags({}, measured) == flags
    assert cpu_tuning.tuned_xla_flags({"XLA_FLAGS": "--a=1"}, measured) == f"--a=1 {flags}"
    # The user's own value of the option is kept; opting out, or another jaxlib, changes nothing.
    mine = {"XLA_FLAGS": f"{cpu_tuning.CPU_XLA_OPTION}=+individual_convolution"}
    assert cpu_tuning.tuned_xla_flags(mine, measured) is None
    assert cpu_tuning.tuned_xla_flags({cpu_tuning.OPT_OUT: "0"}, measured) is None
    assert cpu_tuning.tuned_xla_flags({}, (measured[0], measured[1] + 1)) is None
    assert cpu_tuning.tuned_xla_flags({}, None) is None


def test_tune_process_leaves_a_started_jax_alone(monkeypatch):
    import jax  # noqa: F401  (started, as in this test process)

    monkeypatch.setattr(cpu_tuning, "reexec_with_tunables", lambda: None)
    monkeypatch.setenv("XLA_FLAGS", "--mine=1")
    monkeypatch.delenv(cpu_tuning.OPT_OUT, raising=False)
    cpu_tuning.tune_process()
    assert os.environ["XLA_FLAGS"] == "--mine=1"


_CONV = """
import sys, numpy as np
from jaxdiff.cpu_tuning import tune_process
tune_process()
import jax, jax.numpy as jnp
def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((2, 8, 8, 64), np.float32))
k = jnp.asarray(r.standard_normal((3, 3, 64, 32), np.float32) * 0.05)
y = conv(x, k)
gx, gk = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1))(x, k)
np.savez(sys.argv[1], y=y, gx=gx, gk=gk)
compiled = jax.jit(conv).lower(x, k).compile().as_text()
import os; print(os.environ.get("XLA_FLAGS", ""), "| ynn:", "ynn" in compiled)
"""


@pytest.mark.skipif(not XLA_FLAGS_APPLY, reason="the flags are not set for this jaxlib")
def test_cpu_xla_flags_are_accepted_and_keep_the_numbers(tmp_path):
    """In a fresh process each (XLA reads its flags once), tuned and opted out."""
    outs = {}
    for opt_out in (None, "0"):
        path = tmp_path / f"conv-{opt_out}.npz"
        env = _env(JAX_PLATFORMS="cpu", **({cpu_tuning.OPT_OUT: opt_out} if opt_out else {}))
        out = subprocess.run(
            [sys.executable, "-c", _CONV, str(path)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        flags, _, ynn = out.stdout.strip().rpartition("| ")
        assert (cpu_tuning.CPU_XLA_FLAGS in flags) == (opt_out is None)
        # The convolution leaves YNNPACK only under the flag.
        assert ynn == f"ynn: {opt_out is not None}"
        outs[opt_out] = np.load(path)
    for name in ("y", "gx", "gk"):
        assert_close(outs[None][name], outs["0"][name], name)


# ----------------------------------------------------------------------------- the effect


@pytest.mark.slow
@needs_huge_pages
def test_huge_pages_take_the_page_faults_off_the_train_step(tmp_path):
    """The effect itself, through `jaxdiff bench`: the tiny train step's page faults per call,
    about 26,000 without the tunables (docs/benchmarks.md), a few hundred with huge pages alone,
    a handful with the kept heap too (where jax runs its programs on the calling thread)."""
    faults = {}
    for opt_out in (None, "0"):
        report = tmp_path / f"bench-{opt_out}.json"
        env = _env(**({cpu_tuning.OPT_OUT: opt_out} if opt_out else {}))
        cmd = [sys.executable, "-m", "jaxdiff", "bench", "--rows", "tiny-train", "--no-compare"]
        cmd += ["--runs", "3", "--warmup", "1", "--json", str(report)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(report.read_text())
        tunables = doc["environment"]["GLIBC_TUNABLES"]
        heap = f":{HEAP}" if cpu_tuning.cpu_only(env) else ""
        assert (tunables == f"glibc.malloc.hugetlb=1{heap}") == (opt_out is None)
        asynchronous = doc["environment"]["jax_cpu_enable_async_dispatch"]
        assert asynchronous == (opt_out is not None or not heap)
        flags = doc["environment"]["XLA_FLAGS"]
        assert (cpu_tuning.CPU_XLA_FLAGS in flags) == (opt_out is None and XLA_FLAGS_APPLY)
        # Each step waited for, then 4 back to back: the first case's faults per call.
        record, _ = doc["results"]
        assert "back to back" not in record["case"]
        faults[opt_out] = record["page_faults"]
    assert faults[None] * 10 < faults["0"]
