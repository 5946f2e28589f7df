"""The training loop: data in, jitted steps, metrics, checkpoints, sample grids; and export.

`train(cfg, workdir)` resumes automatically from the newest complete checkpoint in
`workdir/checkpoints` and then follows exactly the trajectory of an uninterrupted run: the
state comes back bit for bit, the data stream from its saved position, and each step's
randomness is `fold_in(key(seed), step)`.

The work directory:
  config.json          the run's config
  checkpoints/<step>/  orbax checkpoints (state, data position, config)
  metrics.jsonl        one JSON object per step: step, loss, grad_norm, learning_rate, ...
  tb/                  TensorBoard event files (when tensorboardX is installed)
  samples/step_XXXXXX.png  sample grids, every `sample_every` steps

Multi-host: call `maybe_initialize_distributed()` first; every process runs `train` and loads
its own rows of each global batch; process 0 writes the files other than the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff import atomic
from jaxdiff import sharding as shd
from jaxdiff.checkpoint import Checkpointer, NonFiniteError
from jaxdiff.train import state as st
from jaxdiff.train.config import TrainConfig
from jaxdiff.train.data import ImageCaptionFolder, Stream, sdxl_time_ids
from jaxdiff.train.step import conditioning, jit_train_step

SampleFn = Callable[[dict], np.ndarray]  # params by component -> uint8 [N, H, W, 3]


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize` when the environment describes several processes.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (plus JAX's own
    detection of SLURM, Open MPI and Cloud TPU). Call it before any other JAX work.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1 or "OMPI_COMM_WORLD_SIZE" in env:
        jax.distributed.initialize()
        return True
    return False


# ----------------------------------------------------------------------------- the run's pieces


@dataclasses.dataclass
class Run:
    """The static pieces of a run, built from its config."""

    cfg: TrainConfig
    mesh: Mesh
    base: object  # jaxdiff.convert.diffusers.PipelineWeights: the starting pipeline
    setup: st.TrainSetup
    pretrained: dict  # trained component -> host params to start from (None: random init)
    frozen: dict  # frozen component -> host params
    abstract: dict  # the checkpointed state: ShapeDtypeStructs with shardings
    shardings: dict  # ... and its NamedShardings
    frozen_shardings: dict

    @property
    def state_shardings(self) -> st.TrainState:
        return st.train_state_shardings(self.abstract, self.frozen_shardings)


def prepare(cfg: TrainConfig, mesh: Mesh | None = None) -> Run:
    mesh = mesh or shd.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    if cfg.micro_batch_size % mesh.size:
        from jaxdiff.train.config import ConfigError

        raise ConfigError(
            f"the micro-batch ({cfg.batch_size} / grad_accum {cfg.grad_accum}) is not "
            f"divisible by the {mesh.size} devices"
        )
    trained = st.trained_components(cfg)
    base, from_preset = st.base_weights(cfg, skip=trained)
    setup = st.build_setup(
        cfg, base.configs, base.scheduler_config, base.tokenizers, fsdp=mesh.shape["fsdp"]
    )
    pretrained = {name: None if from_preset else base.params[name] for name in trained}
    frozen = {n: base.params[n] for n in setup.modules if n not in trained}
    frozen = st.frozen_for_compute(frozen, cfg)
    abstract, shardings, frozen_sh = st.state_shardings(setup, mesh, pretrained, frozen)
    return Run(cfg, mesh, base, setup, pretrained, frozen, abstract, shardings, frozen_sh)


def without_host_params(run: Run) -> Run:
    """`run` without the host copies of the weights its train state holds (the trained
    components' starting weights, the frozen ones): once the state exists they are only memory,
    on the CPU (where device arrays are host memory) a second copy of the model. Sample grids take
    the state's. For what follows the state's creation: `fresh_state` of it would draw the
    trained components at random."""
    held = set(run.setup.trained) | set(run.frozen)
    params = {k: None if k in held else v for k, v in run.base.params.items()}
    return dataclasses.replace(
        run,
        base=dataclasses.replace(run.base, params=params),
        pretrained=dict.fromkeys(run.pretrained),
        frozen=dict.fromkeys(run.frozen),
    )


def fresh_state(run: Run) -> st.TrainState:
    key = jax.random.fold_in(jax.random.key(run.cfg.seed), 1 << 30)  # not a step's key
    return st.init_state(
        run.setup,
        run.mesh,
        key,
        run.pretrained,
        run.frozen,
        shardings=(run.abstract, run.shardings, run.frozen_shardings),
    )


def restored_state(run: Run, ckpt: Checkpointer, step: int) -> tuple[st.TrainState, int]:
    """(the train state of checkpoint `step`, the data stream's position after it), every array
    where `run.state_shardings` puts it (on a GPU, a convolution kernel in cuDNN's order)."""
    placed = jax.tree_util.tree_map(
        lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
        run.abstract,
        shd.placements(run.abstract),
    )
    restored, data = restore_checkpointed(run, ckpt, step, placed)
    frozen = jax.device_put(run.frozen, run.frozen_shardings)
    return st.assemble_state(restored, frozen), int(data["position"])


def restore_checkpointed(run: Run, ckpt: Checkpointer, step: int, target) -> tuple[dict, dict]:
    """(the checkpointed state of checkpoint `step` placed as `target` says (`run.abstract`
    or its placements), the data stream's position record). A checkpoint written on a mesh of
    the other layout (`st.packed_state`: FSDP or not) is restored as written and converted."""
    saved_packed = st.is_packed(ckpt.state_metadata(step))
    if saved_packed == run.setup.packed:
        restored, data, _ = ckpt.restore(step, target)
        return restored, data
    saved = st.repack_abstract(target, saved_packed, shd.replicated(run.mesh))
    restored, data, _ = ckpt.restore(step, saved)
    restored = st.repack(restored, run.setup.packed)
    placed = jax.device_put(restored, jax.tree_util.tree_map(lambda t: t.sharding, target))
    return shd.relayout(placed, target), data


# ----------------------------------------------------------------------------- batches


class Batches:
    """Host batches of the run: this process's rows, tokenized, images or cached latents."""

    def __init__(self, run: Run, dataset: ImageCaptionFolder, position: int = 0):
        cfg = run.cfg
        self.run = run
        self.stream = Stream(dataset, cfg.resolution, cfg.seed, cfg.random_flip, position)
        self.rows = shd.process_batch_slice(run.mesh, cfg.batch_size)
        self.tokenizer = run.base.tokenizers.get("tokenizer")
        self.tokenizer_2 = run.base.tokenizers.get("tokenizer_2")
        self.latents = None  # [N, h, w, 2C] posterior moments of every image, when cached

    def host_batch(self, stream: Stream, global_batch: int, rows: slice) -> dict:
        """`rows` of the next global batch of `stream`, as model inputs (advances the stream)."""
        from jaxdiff.tokenizer import tokenize

        cfg = self.run.cfg
        if self.latents is not None:
            ks = range(stream.position + rows.start, stream.position + rows.stop)
            index, flip = (
                np.asarray(v) for v in zip(*(stream.example(k) for k in ks), strict=True)
            )
            stream.position += global_batch
            moments = self.latents[index]  # [b, h, w, 2C]
            # Flipping the latents stands in for encoding the flipped image (an approximation
            # every latent-caching trainer makes).
            out = {"latents": np.where(flip[:, None, None, None], moments[:, :, ::-1], moments)}
            captions = [stream.dataset.captions[i] for i in index]
        else:
            raw = stream.batch(global_batch, rows)
            out = {"images": raw["images"]}
            captions, index, flip = raw["captions"], raw["index"], raw["flip"]
        if cfg.task == "unet":
            out["input_ids"] = tokenize(self.tokenizer, list(captions))
            if self.run.setup.sdxl:
                out["input_ids_2"] = tokenize(self.tokenizer_2, list(captions))
                dataset = stream.dataset
                out["time_ids"] = np.stack(
                    [
                        sdxl_time_ids(*dataset.image_size(i), cfg.resolution, f)
                        for i, f in zip(index, flip, strict=True)
                    ]
                )
        return out

    def next(self) -> dict:
        b = self.run.cfg.batch_size
        return shd.shard_batch(self.host_batch(self.stream, b, self.rows), self.run.mesh, b)

    def cache_latents(self, state: st.TrainState) -> None:
        """Encodes every image once with the frozen VAE (on all devices); keeps the moments."""
        run, dataset = self.run, self.stream.dataset
        vae = run.setup.modules["vae"]

        def encode(params, images):
            posterior = vae.apply({"params": params}, images, method="encode")
            return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

        encode = jax.jit(encode, out_shardings=shd.replicated(run.mesh))
        b, n = run.cfg.batch_size, len(dataset)
        from jaxdiff.threads import parallel_map
        from jaxdiff.train.data import load_image

        def load(i):
            return load_image(dataset.paths[i], run.cfg.resolution)

        # The next chunk's images load while the devices encode this one.
        chunks, pending = [], None
        for start in range(0, n, b):
            idx = [min(i, n - 1) for i in range(start + self.rows.start, start + self.rows.stop)]
            images = np.stack(parallel_map(load, idx))
            out = encode(state.frozen["vae"], shd.shard_batch(images, run.mesh, b))
            if pending is not None:
                chunks.append(np.asarray(pending))
            pending = out
        chunks.append(np.asarray(pending))
        self.latents = np.concatenate(chunks)[:n]


# ----------------------------------------------------------------------------- samples


def save_grid(images: np.ndarray, path: Path, columns: int | None = None) -> Path:
    """uint8 [N, H, W, 3] -> one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    atomic.write_file(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return path


def _to_uint8(images):
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def preview_fn(run: Run, batches: Batches) -> SampleFn:
    """The default sample hook: one-step denoising (UNet) or reconstruction (VAE) previews.

    A fixed set of training examples; the top row the inputs, the bottom row the model's
    output: for the UNet, x_0 predicted from x_t at t = T/2 and decoded by the VAE.
    """
    from jaxdiff.models.vae import scale_latents, unscale_latents
    from jaxdiff.schedules import add_noise

    cfg, setup = run.cfg, run.setup
    n = cfg.num_samples
    # The first n examples of the epoch-0 order, unflipped, the same at every call.
    fixed = Stream(batches.stream.dataset, cfg.resolution, cfg.seed, False, 0)
    batch = batches.host_batch(fixed, n, slice(0, n))

    @jax.jit
    def preview(params, batch):
        vae = setup.modules["vae"]
        if cfg.task == "vae":
            out = vae.apply({"params": params["vae"]}, batch["images"])
            return _to_uint8(jnp.concatenate([batch["images"], out]))
        if "latents" in batch:
            z = jnp.split(batch["latents"], 2, axis=-1)[0]
        else:
            z = vae.apply({"params": params["vae"]}, batch["images"], method="encode").mean
        x0 = scale_latents(setup.configs["vae"], z)
        t = jnp.full((n,), setup.schedule.num_train_timesteps // 2, jnp.int32)
        noise = jax.random.normal(jax.random.key(cfg.seed), x0.shape, jnp.float32)
        x_t = add_noise(setup.schedule, x0, noise, t)
        context, extra = conditioning(setup, params, batch)
        out = setup.modules["unet"].apply({"params": params["unet"]}, x_t, t, context, **extra)
        x0_pred, _ = _x0(setup, out, x_t, t)
        decode = lambda z: vae.apply(
            {"params": params["vae"]}, unscale_latents(setup.configs["vae"], z), method="decode"
        )
        return _to_uint8(jnp.concatenate([decode(x0), decode(x0_pred)]))

    return lambda params: np.asarray(preview(params, batch))


def text2img_fn(run: Run, prompts, steps: int) -> SampleFn:
    """Sample grids from the text-to-image pipeline with the current (EMA) weights, seed 0."""
    from jaxdiff.pipelines import StableDiffusion
    from jaxdiff.pipelines.images import to_uint8

    def sample(params):
        host = jax.device_get(params)
        weights = dataclasses.replace(
            run.base,
            configs={**run.base.configs, **run.setup.configs},
            params={**run.base.params, **host},
        )
        pipe = StableDiffusion(weights, devices=list(run.mesh.devices.flat))
        images = pipe.generate(list(prompts), steps=steps, seed=0, progress=False).images
        return to_uint8(images)  # [0, 1] -> uint8

    return sample


def _x0(setup, out, x_t, t):
    from jaxdiff.schedules import to_x0_and_eps

    alpha = setup.schedule.sqrt_alphas_cumprod[t][:, None, None, None]
    sigma = setup.schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    return to_x0_and_eps(out.astype(jnp.float32), x_t, alpha, sigma, setup.prediction_type)


# ----------------------------------------------------------------------------- logging


class _Logger:
    """metrics.jsonl, TensorBoard and the progress bar; only process 0 writes."""

    def __init__(self, workdir: Path, start: int, total: int, progress: bool):
        self.active = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not self.active:
            return
        # A killed run may have logged steps after its last checkpoint: those are redone.
        if self.path.exists():
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:
            print("jaxdiff: tensorboardX is not installed; no TensorBoard event files")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            self.bar.update(1)

    def image(self, step: int, path: Path, images: np.ndarray) -> None:
        if self.tb is not None:
            self.tb.add_images("samples", images, step, dataformats="NHWC")

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- train


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    start_step: int  # the step the run resumed from (0: a fresh start)
    final_step: int
    losses: list[float]  # of the steps this call ran
    state: st.TrainState | None = None


def _sample_params(state: st.TrainState) -> dict:
    return {**state.frozen, **state.ema_tree()}


def train(
    cfg: TrainConfig,
    workdir,
    *,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    return_state: bool = False,
) -> TrainResult:
    """Trains `cfg.steps` steps in total, resuming from `workdir` if it holds a checkpoint.

    sample_fn(params) -> uint8 [N, H, W, 3]: called every `cfg.sample_every` steps with every
    component's parameters (EMA weights for the trained ones); default: `preview_fn`.
    """
    workdir = Path(workdir)
    if not cfg.data_dir:
        from jaxdiff.train.config import ConfigError

        raise ConfigError("data_dir is not set (--set data_dir=FOLDER)")
    dataset = ImageCaptionFolder.scan(cfg.data_dir)
    run = prepare(cfg, mesh)
    if jax.process_index() == 0:
        text = cfg.to_json()  # a resume and `export` read it: never half-written
        atomic.write_file(workdir / "config.json", lambda tmp: Path(tmp).write_text(text))
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
    )
    start = ckpt.latest_step()
    if start is None:
        start, state, position = 0, fresh_state(run), 0
    else:
        state, position = restored_state(run, ckpt, start)
        if jax.process_index() == 0:
            print(f"jaxdiff: resuming {workdir} from step {start}", flush=True)
    run = without_host_params(run)
    batches = Batches(run, dataset, position)
    if cfg.cache_latents and cfg.task == "unet":
        batches.cache_latents(state)
    if sample_fn is None and cfg.sample_every:
        if cfg.sample_prompts and cfg.task == "unet":
            sample_fn = text2img_fn(run, cfg.sample_prompts, cfg.sample_steps)
        else:
            sample_fn = preview_fn(run, batches)
    step_fn = jit_train_step(run.setup, run.state_shardings, run.mesh)
    key = jax.random.key(cfg.seed)
    logger = _Logger(workdir, start, cfg.steps, progress)
    losses = []
    tick = time.perf_counter()

    def finish(step: int, metrics: dict) -> None:
        """Reads a dispatched step's metrics (waiting for it), checks and logs them."""
        nonlocal tick
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        metrics["steps_per_sec"] = 1.0 / max(now - tick, 1e-9)
        tick = now
        loss = float(metrics["loss"])
        if not np.isfinite(loss) or not metrics.pop("params_finite"):
            what = f"the loss is {loss}" if not np.isfinite(loss) else "a weight is not finite"
            last = ckpt.latest_step()
            raise NonFiniteError(
                f"step {step}: {what}; stopped. The last checkpoint "
                + (f"(step {last}) holds finite weights." if last else "does not exist.")
            )
        losses.append(loss)
        logger.log(step, metrics)

    # One step stays in flight: step k is queued behind step k-1 before the host waits for k-1's
    # metrics, logs them and prepares the next batch, so the device does not wait for the host.
    # Checkpoints and samples wait for their step first (the state is donated to the next one).
    try:
        pending = None  # (step, metrics) dispatched and not yet read
        batch = batches.next() if start < cfg.steps else None
        for step in range(start + 1, cfg.steps + 1):
            state, metrics = step_fn(state, batch, key)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            save = step % cfg.checkpoint_every == 0 or step == cfg.steps
            sample = sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0
            if save or sample:
                finish(*pending)
                pending = None
            if save:
                ckpt.save(
                    step,
                    state.checkpointed(),
                    data={"position": batches.stream.position},
                    config=cfg.to_dict(),
                )
            if sample:
                images = np.asarray(sample_fn(_sample_params(state)))
                if jax.process_index() == 0:
                    path = save_grid(
                        images, workdir / "samples" / f"step_{step:06d}.png", cfg.num_samples
                    )
                    logger.image(step, path, images)
            if step < cfg.steps:  # while the device runs this step
                batch = batches.next()
    finally:
        logger.close()
        ckpt.close()
    return TrainResult(workdir, start, cfg.steps, losses, state if return_state else None)


# ----------------------------------------------------------------------------- export


def read_run_config(workdir) -> TrainConfig:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training work directory (no config.json)")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def export(workdir, out_dir, *, use_ema: bool = True, step: int | None = None, overwrite=False):
    """Writes the run's model (EMA weights by default) as a diffusers-format folder."""
    from jaxdiff.convert.diffusers import save_pipeline

    workdir = Path(workdir)
    cfg = read_run_config(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, async_save=False)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        # Restore on one host device: export needs no accelerator and no mesh of the run's size.
        cpu = jax.devices("cpu")[:1]
        cfg = dataclasses.replace(cfg, batch_size=cfg.grad_accum)
        run = prepare(cfg, shd.make_mesh(1, 1, devices=cpu))
        restored, _ = restore_checkpointed(
            run, ckpt, latest if step is None else step, run.abstract
        )
    finally:
        ckpt.close()
    trained = st.ema_tree(restored) if use_ema else restored["params"]
    weights = run.base
    params = dict(weights.params)
    for name, p in trained.items():
        params[name] = jax.tree_util.tree_map(np.asarray, jax.device_get(p))
    scheduler_config = st.trained_scheduler_config(cfg, weights.scheduler_config)
    weights = dataclasses.replace(weights, params=params, scheduler_config=scheduler_config)
    return save_pipeline(weights, out_dir, overwrite=overwrite)
