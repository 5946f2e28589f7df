"""jaxdiff.hugepages: when the `jaxdiff` command starts itself again with glibc's huge-page
tunable, that it does so once, and that it then takes the page faults off XLA's temporaries."""

import json
import os
import subprocess
import sys

import pytest

from jaxdiff import hugepages

GLIBC = (2, 36)
SUPPORTED = (
    hugepages.glibc_version() is not None
    and hugepages.glibc_version() >= hugepages.MIN_GLIBC
    and hugepages.thp_mode() == "madvise"
)
needs_support = pytest.mark.skipif(
    not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages in madvise mode"
)


def test_tuned_environ_sets_the_tunable_where_it_applies():
    env = hugepages.tuned_environ({"HOME": "/h"}, GLIBC, "madvise")
    assert env == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept, the new one appended.
    env = hugepages.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.tuned_environ({hugepages.OPT_OUT: "1"}, (2, 35), "madvise") is not None


@pytest.mark.parametrize(
    "environ, glibc, thp",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's choice
        ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=2"}, GLIBC, "madvise"),
        ({hugepages.OPT_OUT: "0"}, GLIBC, "madvise"),  # opted out
        ({}, (2, 34), "madvise"),  # glibc without the tunable
        ({}, None, "madvise"),  # musl, macOS, Windows
        ({}, GLIBC, "always"),  # the kernel uses huge pages already
        ({}, GLIBC, "never"),  # the tunable would do nothing
        ({}, GLIBC, None),  # no THP support
    ],
)
def test_tuned_environ_leaves_everything_else_alone(environ, glibc, thp):
    assert hugepages.tuned_environ(environ, glibc, thp) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(path)) == "always"
    path.write_text("garbage\n")
    assert hugepages.thp_mode(str(path)) is None
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    return {**env, **extra}


@needs_support
def test_reexec_starts_the_program_once_more_with_the_tunable():
    code = (
        "import os, sys; from jaxdiff.hugepages import reexec_with_huge_pages as r; r(); "
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
    assert tunables == "glibc.malloc.hugetlb=1"
    assert args == "['x', '--y']"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(**{hugepages.OPT_OUT: "0"}), capture_output=True
    )
    assert out.stdout.decode().split(" ")[1] == "None"


@needs_support
@pytest.mark.parametrize("opt_out, starts", [(None, 2), ("0", 1)])
def test_the_jaxdiff_command_restarts_itself(opt_out, starts):
    """`python -X importtime` logs every import to stderr, in each start of the interpreter."""
    env = _env(**({hugepages.OPT_OUT: opt_out} if opt_out else {}))
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


@pytest.mark.slow
@needs_support
def test_huge_pages_take_the_page_faults_off_the_train_step(tmp_path):
    """The effect itself, through `jaxdiff bench`: the tiny train step's page faults per call,
    about 26,000 without the tunable (docs/benchmarks.md), a few hundred with it."""
    faults = {}
    for opt_out in (None, "0"):
        report = tmp_path / f"bench-{opt_out}.json"
        env = _env(**({hugepages.OPT_OUT: opt_out} if opt_out else {}))
        cmd = [sys.executable, "-m", "jaxdiff", "bench", "--rows", "tiny-train", "--no-compare"]
        cmd += ["--runs", "3", "--warmup", "1", "--json", str(report)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(report.read_text())
        tunables = doc["environment"]["GLIBC_TUNABLES"]
        assert (tunables == "glibc.malloc.hugetlb=1") == (opt_out is None)
        (record,) = doc["results"]
        faults[opt_out] = record["page_faults"]
    assert faults[None] * 10 < faults["0"]
