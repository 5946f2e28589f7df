"""The training loop end to end: data, configs, checkpoints, kill-and-resume, a real short
run that lowers the loss, export to diffusers, and the NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cache_entries import entries, programs, recompiled
from tolerances import assert_close

from jaxdiff.checkpoint import Checkpointer, CheckpointError, NonFiniteError
from jaxdiff.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from jaxdiff.train.data import CorruptImageWarning, ImageCaptionFolder, Stream, write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))

# The micro model of tests/test_train_step.py, at 16x16 pixels, as CLI overrides.
MICRO = [
    "unet.block_out_channels=(32,)",
    "unet.down_block_types=('CrossAttnDownBlock2D',)",
    "unet.up_block_types=('CrossAttnUpBlock2D',)",
    "unet.sample_size=8",
    "resolution=16",
    "batch_size=8",
    "learning_rate=2e-3",
    "warmup_steps=2",
    "lr_schedule=constant",
    "sample_every=0",
    "min_shard_size=256",
]


# ----------------------------------------------------------------------------- data


def test_folder_captions_from_txt_and_metadata(tmp_path):
    write_toy_dataset(tmp_path, count=6, size=20)
    ds = ImageCaptionFolder.scan(tmp_path)
    assert len(ds) == 6
    assert all(c.startswith("a ") for c in ds.captions)  # both conventions were read


def test_corrupt_images_are_skipped_with_a_warning(tmp_path):
    write_toy_dataset(tmp_path, count=4, size=20)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.warns(CorruptImageWarning, match="broken.png"):
        ds = ImageCaptionFolder.scan(tmp_path)
    assert len(ds) == 4


def test_stream_is_deterministic_and_resumable(tmp_path):
    write_toy_dataset(tmp_path, count=5, size=24)
    ds = ImageCaptionFolder.scan(tmp_path)
    a = Stream(ds, 16, seed=3)
    batches = [a.batch(4) for _ in range(4)]  # crosses epoch boundaries
    b = Stream(ds, 16, seed=3, position=8)  # resumed after two batches
    for want in batches[2:]:
        got = b.batch(4)
        np.testing.assert_array_equal(got["images"], want["images"])
        assert got["captions"] == want["captions"]
    # Each epoch visits every image once; flips follow the seed.
    epoch = [a.example(k)[0] for k in range(5)]
    assert sorted(epoch) == list(range(5))
    assert batches[0]["images"].shape == (4, 16, 16, 3)
    assert -1.0 <= batches[0]["images"].min() and batches[0]["images"].max() <= 1.0
    # A host's rows of a global batch are those rows of the whole batch.
    c = Stream(ds, 16, seed=3)
    part = c.batch(4, slice(2, 4))
    np.testing.assert_array_equal(part["images"], batches[0]["images"][2:])
    assert c.position == 4


def _expected_rows(ds, batch):
    """Each row's image decoded directly from its dataset index (flipped as the row says)."""
    from jaxdiff.train.data import load_image

    return [
        load_image(ds.paths[i], 16)[:, ::-1] if f else load_image(ds.paths[i], 16)
        for i, f in zip(batch["index"], batch["flip"], strict=True)
    ]


def test_a_batch_decodes_its_images_on_a_pool_of_threads(tmp_path, monkeypatch):
    """Each image of a batch is decoded on the loader's threads, and every row keeps its own
    image, caption and index, as one thread decoding them in order gives."""
    import threading

    from jaxdiff.train import data

    write_toy_dataset(tmp_path, count=6, size=24)
    ds = ImageCaptionFolder.scan(tmp_path)
    threads, load = [], data.load_image

    def recording(path, resolution):
        threads.append(threading.current_thread().name)
        return load(path, resolution)

    monkeypatch.setattr(data, "load_image", recording)
    got = Stream(ds, 16, seed=1).batch(6)
    assert len(threads) == 6 and all(t.startswith("jaxdiff-worker") for t in threads), threads
    monkeypatch.setattr(data, "parallel_map", lambda fn, items: list(map(fn, items)))
    want = Stream(ds, 16, seed=1).batch(6)
    for key in ("images", "index", "flip"):
        np.testing.assert_array_equal(got[key], want[key])
    assert got["captions"] == want["captions"]
    np.testing.assert_array_equal(got["images"], np.stack(_expected_rows(ds, got)))


def test_an_image_that_fails_to_decode_is_replaced_with_its_caption(tmp_path):
    """An image broken after the scan: its row takes the next good image of the epoch, and that
    image's caption and index, never the broken image's caption on another image's pixels."""
    write_toy_dataset(tmp_path, count=4, size=24)
    ds = ImageCaptionFolder.scan(tmp_path)
    first = Stream(ds, 16, seed=2).batch(4)
    broken = int(first["index"][1])
    ds.paths[broken].write_bytes(ds.paths[broken].read_bytes()[:40])  # a truncated file
    with pytest.warns(CorruptImageWarning, match=ds.paths[broken].name):
        got = Stream(ds, 16, seed=2).batch(4)
    assert broken not in got["index"].tolist()
    assert got["index"][1] == first["index"][2]  # the next image of the epoch's order
    assert got["captions"] == [ds.captions[i] for i in got["index"]]
    np.testing.assert_array_equal(got["images"], np.stack(_expected_rows(ds, got)))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    if path.name == "common.py":
        pytest.skip("defaults, not a config")
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert "Run:" in path.read_text().split('"""')[1]  # the docstring gives its command
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_a_run_can_stop_inside_a_longer_schedule():
    from jaxdiff.train.state import learning_rate_schedule

    base = dict(learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    full = learning_rate_schedule(TrainConfig(steps=100, **base))
    first = learning_rate_schedule(TrainConfig(steps=40, schedule_steps=100, **base))
    short = learning_rate_schedule(TrainConfig(steps=40, **base))
    for step in (0, 5, 10, 25, 39):
        assert float(first(step)) == float(full(step))
    assert float(short(39)) < float(full(39))  # without it, the schedule ends at step 40
    with pytest.raises(ConfigError, match="schedule_steps"):
        TrainConfig(schedule_steps=-1)


def test_overrides_are_typed():
    cfg = apply_overrides(
        TrainConfig(),
        ["steps=7", "learning_rate=3e-4", "remat=true", "unet.block_out_channels=(16, 32)"],
    )
    assert (cfg.steps, cfg.learning_rate, cfg.remat) == (7, 3e-4, True)
    assert cfg.unet == {"block_out_channels": (16, 32)}
    for bad, match in (
        ("stepz=3", "unknown config key"),
        ("steps=3.5", "is not int"),
        ("remat=maybe", "not a boolean"),
        ("lr_schedule=linear", "expected one of"),
        ("steps", "expected key=value"),
    ):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(TrainConfig(), [bad])


def test_a_config_file_that_fails_is_named_in_one_error(tmp_path):
    """A file without the .py suffix failed inside importlib (a spec of None); an exception in
    get_config() itself was a traceback."""
    cases = [
        ("noext", "get_config = lambda: TrainConfig()", "NameError: name 'TrainConfig'"),
        ("raises.py", "def get_config():\n    return 1 / 0\n", "ZeroDivisionError"),
        ("plain", "from jaxdiff.train.config import TrainConfig\nget_config = TrainConfig", None),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        if message is None:
            assert load_config(tmp_path / name, ["steps=3"]).steps == 3
            continue
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {message}"), e.value


@pytest.mark.parametrize(
    "override, message",
    [
        # A nan or inf diverged at step 1, after compiling, as a traceback.
        ("learning_rate=nan", "learning_rate=nan must be a finite number"),
        ("ema_decay=inf", "ema_decay=inf is not in [0, 1)"),
        ("offset_noise=inf", "offset_noise=inf must be a finite number"),
        ("learning_rate=-1e-4", "learning_rate=-0.0001 must be >= 0"),
        ("grad_clip=-1", "grad_clip=-1.0 must be >= 0"),
        ("warmup_steps=-5", "warmup_steps=-5 must be >= 0"),
        ("adam_b2=1", "adam_b2=1.0 is not in [0, 1)"),
        ("min_lr_ratio=1.5", "min_lr_ratio=1.5 is not in [0, 1]"),
        ("resolution=0", "resolution=0 must be at least 1"),
        # -1 was a traceback from numpy's generator, after the work directory was made.
        ("seed=-1", "seed=-1 must be in [0, 4294967295]"),
        ("seed=4294967296", "seed=4294967296 must be in [0, 4294967295]"),
    ],
)
def test_a_config_value_out_of_range_is_refused(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [override])
    assert message in str(e.value)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    from jaxdiff.train.cli import main

    assert main(["train", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    assert main(["train", str(CONFIGS[-1]), "--workdir", str(tmp_path), "--set", "x=1"]) == 2
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    data = write_toy_dataset(tmp_path / "data", count=2, size=16)
    sdxl = ["train", str(REPO / "configs" / "sdxl.py"), "--workdir", str(tmp_path / "run")]
    # The recipe needs a model folder (batch 8: the tests have 8 devices).
    assert main([*sdxl, "--set", f"data_dir={data}", "--set", "batch_size=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("jaxdiff: error: ") for line in err)
    assert "model is not set" in err[-1] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command, error",
    [
        ("train", NonFiniteError("step 3: the loss is nan; stopped. The last checkpoint (step 2)")),
        ("train", CheckpointError("checkpoint run/checkpoints/2 cannot be restored (...)")),
        ("export", CheckpointError("checkpoint run/checkpoints/2 cannot be restored (...)")),
    ],
)
def test_cli_a_run_that_diverges_or_a_damaged_checkpoint_is_one_line(
    tmp_path, capsys, monkeypatch, command, error
):
    """The loop's NonFiniteError (naming the step and the last good checkpoint) and a
    checkpoint that cannot be restored are the command's one line, not a traceback."""
    from jaxdiff.train import loop
    from jaxdiff.train.cli import main

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, command, fails)
    data = write_toy_dataset(tmp_path / "data", count=2, size=16)
    run = str(tmp_path / "run")
    if command == "train":
        config = str(REPO / "configs" / "tiny.py")
        argv = ["train", config, "--workdir", run, "--set", f"data_dir={data}"]
    else:
        argv = ["export", run, str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"jaxdiff: error: {error}\n"


# ----------------------------------------------------------------------------- checkpoints


def test_a_damaged_checkpoint_is_one_error_naming_it_and_the_one_before(tmp_path):
    """Truncated array files (a disk that lost them) failed as orbax's traceback, followed by
    hundreds of lines from its concurrent reads; now one CheckpointError, and the reads still in
    flight are not reported on their own."""
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    state = {f"w{i}": jax.numpy.full((64, 64), float(i)) for i in range(24)}
    for step in (1, 2):
        ckpt.save(step, state, data={"position": step}, config={"a": step})
    ckpt.wait()
    for f in (tmp_path / "2" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:20])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    reported = []
    previous = sys.unraisablehook
    sys.unraisablehook = reported.append
    try:
        with pytest.raises(CheckpointError) as e:
            ckpt.restore(2, abstract)
        time.sleep(0.5)  # the reads still in flight finish
        message = str(e.value)
        assert message.startswith(f"checkpoint {tmp_path / '2'} cannot be restored (ValueError: ")
        assert message.endswith("; the checkpoint before it is step 1") and "\n" not in message
        assert [u.exc_value for u in reported] == []
        restored, data, _ = ckpt.restore(1, abstract)  # the one before is whole
        assert data == {"position": 1} and float(restored["w5"][0, 0]) == 5.0
    finally:
        sys.unraisablehook = previous
    (tmp_path / "1" / "config" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint .*1 cannot be restored \(JSONDecodeE"):
        ckpt.read_config(1)


def test_checkpoint_round_trip_and_refuses_non_finite(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    state = {"w": jax.numpy.arange(4.0), "step": jax.numpy.int32(3)}
    ckpt.save(3, state, data={"position": 24}, config={"a": 1})
    with pytest.raises(NonFiniteError, match="no checkpoint written"):
        ckpt.save(
            4, {"w": jax.numpy.asarray([1.0, np.nan]), "step": state["step"]}, data={}, config={}
        )
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, data, config = ckpt.restore(None, abstract)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert data == {"position": 24} and config == {"a": 1}
    # A target placed in another memory order (a GPU's convolution kernel) gets that order.
    from jax.experimental.layout import Format, Layout

    kernel = jax.numpy.arange(24.0).reshape(1, 2, 3, 4)
    ckpt.save(5, {"kernel": kernel}, data={}, config={})
    laid = Format(Layout(major_to_minor=(3, 0, 1, 2)), kernel.sharding)
    target = {"kernel": jax.ShapeDtypeStruct(kernel.shape, kernel.dtype, sharding=laid)}
    restored, _, _ = ckpt.restore(5, target)
    assert restored["kernel"].format.layout.major_to_minor == (3, 0, 1, 2)
    np.testing.assert_array_equal(restored["kernel"], kernel)
    ckpt.close()


def test_nan_loss_stops_the_run_with_one_step_in_flight(tmp_path, monkeypatch):
    """A non-finite loss stops the run with a clear message; later checkpoints are not written.

    The loop keeps one step in flight: step k+1 is dispatched before step k's metrics are read,
    except after a checkpoint's step (every 2 here), whose state is saved first. Step 4 is
    dispatched before step 3's NaN is read; its result is dropped."""
    from jaxdiff.train import loop

    events = []  # ("dispatch", step) and ("log", step), in order

    def fake_jit(setup, shardings, mesh, step_fn=None):
        def step(state, batch, key):
            n = int(state.step) + 1
            events.append(("dispatch", n))
            loss = np.nan if n == 3 else 1.0
            metrics = {"loss": loss, "grad_norm": 1.0, "learning_rate": 0.0, "params_finite": 1.0}
            return state.replace(step=state.step + 1), metrics

        return step

    def cheap_state(run):  # host-drawn weights: no compile of the model's init
        from jaxdiff.models.build import random_params
        from jaxdiff.train.state import init_state

        unet = random_params(run.setup.configs["unet"])
        return init_state(run.setup, run.mesh, jax.random.key(0), {"unet": unet}, run.frozen)

    log = loop._Logger.log

    def logged(self, step, metrics):
        events.append(("log", step))
        log(self, step, metrics)

    monkeypatch.setattr(loop, "jit_train_step", fake_jit)
    monkeypatch.setattr(loop, "fresh_state", cheap_state)
    monkeypatch.setattr(loop._Logger, "log", logged)
    data = write_toy_dataset(tmp_path / "data", count=8, size=16)
    cfg = apply_overrides(
        TrainConfig(), MICRO + [f"data_dir={data}", "steps=5", "checkpoint_every=2"]
    )
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan; stopped.*step 2"):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert events == [
        ("dispatch", 1),
        ("dispatch", 2),
        ("log", 1),
        ("log", 2),  # checkpoint 2 is written here, before step 3 takes the state
        ("dispatch", 3),
        ("dispatch", 4),
    ]
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


# ----------------------------------------------------------------------------- real runs
# Subprocesses through `python -m jaxdiff.train.cli` (the `jaxdiff train` command's code).


def _env(tmp_path, devices=4):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # The runs compile the same step: they share `jaxdiff train`'s own compilation cache.
    env["JAXDIFF_CACHE_DIR"] = str(tmp_path / "jax-cache")
    return env


def _cache_entries(tmp_path):
    from jaxdiff.compilation_cache import host_tag

    return entries(tmp_path / "jax-cache" / host_tag())


def _train_cmd(workdir, data, steps, extra=()):
    return [
        sys.executable,
        "-m",
        "jaxdiff.train.cli",
        "train",
        str(REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        "--steps",
        str(steps),
        "--checkpoint-every",
        "4",
        "--no-progress",
        "--set",
        f"data_dir={data}",
        *[a for item in MICRO + list(extra) for a in ("--set", item)],
    ]


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], np.asarray([r["loss"] for r in rows])


STEPS = 12


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = write_toy_dataset(tmp / "data", count=16, size=16)
    workdir = tmp / "run"
    subprocess.run(
        _train_cmd(workdir, data, STEPS, ["sample_every=12"]),
        env=_env(tmp),
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return tmp, data, workdir


def test_short_run_lowers_the_loss(uninterrupted):
    tmp, _, workdir = uninterrupted
    steps, losses = _losses(workdir)
    assert steps == list(range(1, STEPS + 1))
    assert losses[-3:].mean() < 0.7 * losses[:3].mean(), losses
    assert (workdir / "samples" / "step_000012.png").is_file()
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert Checkpointer(workdir / "checkpoints").all_steps() == [4, 8, 12]
    # `jaxdiff train` keeps its compiled step in the persistent cache, in this machine's folder.
    assert any(name.startswith("jit_train_step-") for name in _cache_entries(tmp)), tmp


def test_kill_and_resume_follows_the_same_trajectory(uninterrupted):
    tmp, data, reference = uninterrupted
    cached = _cache_entries(tmp)
    workdir = tmp / "killed"
    cmd = _train_cmd(workdir, data, STEPS)
    proc = subprocess.Popen(
        cmd, env=_env(tmp), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        # Kill as soon as the second checkpoint is being written (or is written).
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
            if any(n.startswith("8") for n in names):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    resumed = subprocess.run(cmd, env=_env(tmp), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    steps, losses = _losses(workdir)
    ref_steps, ref_losses = _losses(reference)
    assert steps == ref_steps
    assert_close(losses, ref_losses, "losses after kill and resume")
    # Both processes loaded the first run's compiled programs instead of compiling them again.
    assert "jit_train_step" in programs(cached), cached
    assert not recompiled(cached, _cache_entries(tmp)), _cache_entries(tmp)


def test_export_loads_in_diffusers(uninterrupted, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from jaxdiff.convert.diffusers import load_pipeline
    from jaxdiff.train.loop import export

    _, _, workdir = uninterrupted
    out = export(workdir, tmp_path / "model")
    weights = load_pipeline(out)
    assert set(weights.params) == {"unet", "vae", "text_encoder"}
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long))[0]
        eps = pipe.unet(latents, 10, encoder_hidden_states=context).sample
    assert eps.shape == latents.shape and torch.isfinite(eps).all()


@pytest.mark.slow
def test_two_processes_equal_one(uninterrupted, tmp_path):
    """Two processes (jax.distributed, CPU collectives, 2 devices each) vs one with 4 devices."""
    import socket

    _, data, reference = uninterrupted
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "multi"
    procs = []
    for rank in range(2):
        env = _env(tmp_path, devices=2)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        cmd = _train_cmd(workdir, data, 4)
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    steps, losses = _losses(workdir)
    ref_steps, ref_losses = _losses(reference)
    assert steps == [1, 2, 3, 4]
    assert_close(losses, ref_losses[:4], "two processes vs one")


@pytest.mark.slow  # about a minute on 2 cores; CI runs it in its slow pass
def test_text_encoder_training_with_cached_latents(tmp_path):
    """train_text_encoder and cache_latents together: the text encoder's weights move, the VAE's
    do not, and the loss is finite. The run trains a v-prediction UNet from an epsilon model, and
    the export says so in its scheduler config."""
    from flax import traverse_util

    from jaxdiff.train import loop

    data = write_toy_dataset(tmp_path / "data", count=8, size=16)
    cfg = apply_overrides(
        TrainConfig(),
        MICRO
        + [f"data_dir={data}", "steps=2", "train_text_encoder=true", "cache_latents=true"]
        + ["prediction_type=v_prediction"],
    )
    result = loop.train(cfg, tmp_path / "run", progress=False)
    assert len(result.losses) == 2 and np.all(np.isfinite(result.losses))
    start = loop.fresh_state(loop.prepare(cfg))
    loop.export(tmp_path / "run", tmp_path / "out", use_ema=False)
    from jaxdiff.convert import load_pipeline

    exported = load_pipeline(tmp_path / "out")
    assert loop.prepare(cfg).base.scheduler_config["prediction_type"] == "epsilon"
    assert exported.scheduler_config["prediction_type"] == "v_prediction"
    trained = exported.params
    for name, moved in (("text_encoder", True), ("vae", False)):
        before = start.params[name] if name in start.params else start.frozen[name]
        a = traverse_util.flatten_dict(jax.device_get(before))
        b = traverse_util.flatten_dict(trained[name])
        diff = max(float(np.abs(np.asarray(a[k]) - b[k]).max()) for k in a)
        assert (diff > 0) == moved, (name, diff)


def test_sdxl_time_ids_follow_the_crop(tmp_path):
    """An image 40 px wide and 16 high at resolution 16 (no resize): the crop starts at column
    12, and the flipped crop is the crop of the mirrored image that starts at column 40-16-12."""
    from PIL import Image

    from jaxdiff.train.data import load_image, sdxl_time_ids

    columns = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (16, 1, 3))
    Image.fromarray(columns).save(tmp_path / "wide.png")
    pixels = (load_image(tmp_path / "wide.png", 16) + 1.0) * 127.5
    plain = sdxl_time_ids(40, 16, 16, flip=False)
    flipped = sdxl_time_ids(40, 16, 16, flip=True)
    assert plain.tolist() == [16, 40, 0, 12, 16, 16]  # (h, w), (top, left), target
    assert round(float(pixels[0, 0, 0]) / 6) == plain[3]
    mirrored_column = 39 - round(float(pixels[0, ::-1][0, 0]) / 6)
    assert flipped[3] == mirrored_column == 12
    odd = sdxl_time_ids(41, 16, 16, flip=True)  # 25 columns cut away: 12 left, 13 right
    assert odd[3] == 13 and sdxl_time_ids(41, 16, 16, flip=False)[3] == 12
    assert sdxl_time_ids(64, 128, 32, flip=False).tolist() == [128, 64, 16, 0, 32, 32]


@pytest.mark.slow  # about a minute on 2 cores; CI runs it in its slow pass
def test_sdxl_training_run_and_export(tmp_path):
    """An SDXL-architecture model trains (both tokenizers, pooled text, size ids from each
    image's own size and crop), with cached latents; the export loads as an SDXL pipeline in
    jaxdiff and in diffusers. A refiner and train_text_encoder are refused."""
    import dataclasses

    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from jaxdiff.pipelines import load
    from jaxdiff.train import loop
    from jaxdiff.train.data import sdxl_time_ids

    data = write_toy_dataset(tmp_path / "data", count=6, size=16)
    Image.new("RGB", (24, 16), (200, 40, 40)).save(data / "wide.png")
    (data / "wide.txt").write_text("a wide red picture")
    Image.new("RGB", (16, 32), (40, 40, 200)).save(data / "tall.png")
    micro_sdxl = {  # one level of tiny-sdxl's blocks: a short compile
        "down_block_types": ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",),
        "block_out_channels": (32,),
        "transformer_layers_per_block": (1,),
        "attention_head_dim": (2,),
        "sample_size": 8,
    }
    cfg = TrainConfig(
        model="tiny-sdxl",
        unet=micro_sdxl,
        data_dir=str(data),
        resolution=16,
        batch_size=8,
        steps=2,
        cache_latents=True,
        sample_every=2,  # one-step denoising previews, through the SDXL conditioning too
        num_samples=2,
        min_shard_size=256,
    )
    run = loop.prepare(cfg)
    batches = loop.Batches(run, ImageCaptionFolder.scan(data))
    host = batches.host_batch(batches.stream, 8, slice(0, 8))
    assert host["input_ids_2"].shape == (8, 77) and host["time_ids"].shape == (8, 6)
    index, flip = zip(*(batches.stream.example(k) for k in range(8)), strict=True)
    for row, i, f in zip(host["time_ids"], index, flip, strict=True):
        w, h = Image.open(batches.stream.dataset.paths[i]).size
        assert row.tolist() == sdxl_time_ids(w, h, 16, f).tolist()
    assert {tuple(r[:2]) for r in host["time_ids"]} >= {(16.0, 24.0), (32.0, 16.0)}

    result = loop.train(cfg, tmp_path / "run", progress=False)
    assert len(result.losses) == 2 and np.all(np.isfinite(result.losses))
    preview = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000002.png"))
    assert preview.shape == (2 * 16, 2 * 16, 3)  # inputs on top, predictions below
    out = loop.export(tmp_path / "run", tmp_path / "model")
    pipe = load(out)
    assert pipe.family == "sdxl"
    images = pipe.generate("a red disk", steps=2, progress=False).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    reference = StableDiffusionXLPipeline.from_pretrained(out)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = reference.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.tensor([[32.0] * 6])}
        context = torch.zeros(1, 77, reference.unet.config.cross_attention_dim)
        eps = reference.unet(latents, 10, context, added_cond_kwargs=added).sample
    assert eps.shape == latents.shape and torch.isfinite(eps).all()

    with pytest.raises(ConfigError, match="train_text_encoder"):
        loop.prepare(dataclasses.replace(cfg, train_text_encoder=True))
    with pytest.raises(ConfigError, match="refiner"):
        loop.prepare(dataclasses.replace(cfg, model="sdxl-refiner"))


@pytest.mark.slow  # about 25 s on 2 cores; CI runs it in its slow pass
def test_a_run_from_pretrained_weights_keeps_no_host_copy_of_them(tmp_path, monkeypatch):
    """Started from a model folder's weights, the loop drops their host copy once the train state
    holds them: on the CPU it was a second copy of the trained model for the whole run."""
    import dataclasses
    import gc
    import weakref

    from jaxdiff.models.build import random_params
    from jaxdiff.train import loop
    from jaxdiff.train import state as st

    host = []
    base_weights = st.base_weights

    def from_a_folder(cfg, *, skip=()):
        weights, _ = base_weights(cfg, skip=skip)
        unet = random_params(weights.configs["unet"], 5)
        host.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves(unet))
        return dataclasses.replace(weights, params={**weights.params, "unet": unet}), False

    alive = []

    def sample(params):
        gc.collect()
        alive.append(sum(ref() is not None for ref in host))
        return np.zeros((1, 16, 16, 3), np.uint8)

    monkeypatch.setattr(st, "base_weights", from_a_folder)
    data = write_toy_dataset(tmp_path / "data", count=8, size=16)
    cfg = apply_overrides(TrainConfig(), MICRO + [f"data_dir={data}", "steps=1", "sample_every=1"])
    loop.train(cfg, tmp_path / "run", sample_fn=sample, progress=False)
    assert len(host) > 10 and alive == [0]
