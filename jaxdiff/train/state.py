"""The train state, the static setup of a run, and born-sharded initialization.

`TrainState` is the pytree a step carries: float32 master parameters of the trained components,
their EMA, the optimizer state, the step, and the frozen components' parameters (rebuilt from
the config on resume, so never checkpointed). `TrainSetup` is everything static a step needs
(modules, schedule, optimizer), bound into `train_step` with `functools.partial`.

Initialization follows the house rule: `jax.eval_shape(init)` gives the abstract state with its
logical axis names, the rules table turns them into shardings, and `jax.jit(init,
out_shardings=...)` creates every array already on its devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sharding as shd
from jaxdiff.models.build import compile_one_shot, logical_axes, module_for, random_params
from jaxdiff.models.presets import PRESETS
from jaxdiff.train.config import ConfigError, TrainConfig

# Leaves of at most this many elements are reduced together (`global_norm`, `all_finite`) where
# no parameter is split over devices (`small_leaf_limit`).
SMALL_LEAF = 1 << 16


@struct.dataclass
class TrainState:
    """The arrays a step carries. Where no parameter is split over devices (`TrainSetup.packed`),
    the EMA and each of the Adam moments are a few float32 arrays of every parameter's elements
    in `jax.tree_util.tree_leaves(params)` order (`pack`; `unpack` and `ema_tree` give the tree):
    a step takes and returns each array of its state, at a cost a call pays per array (on an
    H200, about 38 ms of a traced SD 1.5 step's host time went to its 3,194 arguments and their
    results; docs/benchmarks.md, session 19), and the optimizer then updates a few long arrays
    rather than a parameter at a time."""

    step: jax.Array  # [] int32: optimizer updates done
    params: Any  # component name -> float32 params of the trained components
    ema_params: Any  # exponential moving average of `params`: the same tree, or `pack`ed
    opt_state: Any  # optax state of `params` (Adam's moments the same tree, or `pack`ed)
    frozen: Any  # component name -> params of the frozen components (not checkpointed)

    def checkpointed(self) -> dict:
        """The part of the state a checkpoint holds."""
        return {
            "step": self.step,
            "params": self.params,
            "ema_params": self.ema_params,
            "opt_state": self.opt_state,
        }

    def ema_tree(self):
        """The EMA of `params` as their tree, packed or not."""
        return ema_tree(self.checkpointed())


# Leaves a `pack`ed array holds at most. XLA:GPU fuses a concatenation of this many operands
# into the kernel that reads it: the moments' update reads each group's gradients where the
# backward wrote them. With one array per tree it first copied the gradients into pieces of up
# to 128 (SD 1.5's train step compiled for an H200; docs/benchmarks.md, session 19).
PACK_LEAVES = 64


# A 4-D leaf (a convolution kernel, [kh, kw, in, out]) packs as [out, kh, kw, in]: the order a
# GPU keeps it in (jaxdiff.sharding.CONV_KERNEL_LAYOUTS), so there packing it moves no data. One
# order everywhere: a checkpoint unpacks the same on any platform.
PACK_KERNEL_ORDER = (3, 0, 1, 2)


def _groups(leaves: list) -> list:
    return [leaves[i : i + PACK_LEAVES] for i in range(0, len(leaves), PACK_LEAVES)]


def pack(tree) -> list:
    """`tree`'s leaves as a list of 1-D arrays, each the elements of up to `PACK_LEAVES` leaves
    after one another (in `jax.tree_util.tree_leaves` order, each leaf in row-major order, a 4-D
    one after `PACK_KERNEL_ORDER`)."""

    def flat(x):
        return jnp.reshape(jnp.transpose(x, PACK_KERNEL_ORDER) if x.ndim == 4 else x, (-1,))

    return [
        jnp.concatenate([flat(x) for x in group])
        for group in _groups(jax.tree_util.tree_leaves(tree))
    ]


def unpack(packed: list, like):
    """`pack` undone: `packed` cut into arrays shaped as the leaves of `like` (arrays or
    `jax.ShapeDtypeStruct`s), in its tree. numpy arrays give numpy views. Device arrays are cut
    in one jitted program, compiled once per tree of shapes: eagerly, each leaf's slice, reshape
    and transpose was a program of its own (the tiny preset's EMA, 208 leaves on 2 CPU cores:
    3.0-4.4 s the first time and 31-56 ms a call after, against 2.3-3.6 s and 2-4 ms;
    docs/benchmarks.md, session 21)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    shapes = tuple(tuple(x.shape) for x in leaves)
    if any(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in packed):
        return _cut_program(packed, treedef, shapes)
    return _cut(packed, treedef, shapes)


def _cut(packed: list, treedef, shapes: tuple):
    groups = _groups(list(shapes))
    sizes = [[math.prod(shape) for shape in group] for group in groups]
    packed_shapes = [tuple(np.shape(x)) for x in packed]
    if packed_shapes != [(sum(s),) for s in sizes]:
        raise ValueError(f"packed arrays of {packed_shapes} for {[sum(s) for s in sizes]} elements")
    back = tuple(int(a) for a in np.argsort(PACK_KERNEL_ORDER))
    out = []
    for flat, group, group_sizes in zip(packed, groups, sizes, strict=True):
        start = 0
        for shape, size in zip(group, group_sizes, strict=True):
            part = flat[start : start + size]
            if len(shape) == 4:
                part = part.reshape([shape[a] for a in PACK_KERNEL_ORDER]).transpose(back)
            out.append(part.reshape(shape))
            start += size
    return jax.tree_util.tree_unflatten(treedef, out)


_cut_program = jax.jit(_cut, static_argnums=(1, 2))


def _packed(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on the `pack`ed updates (`optax.flatten` in groups): its state holds `pack`ed
    arrays, its updates come back as the parameters' tree. `inner` must not read the parameters
    (Adam's scaling does not): they are not packed for it."""

    def init(params):
        return inner.init(pack(params))

    def update(updates, state, params=None):
        del params
        flat, state = inner.update(pack(updates), state)
        return unpack(flat, updates), state

    return optax.GradientTransformation(init, update)


def is_packed(checkpointed: dict) -> bool:
    """Whether a (checkpointed) state holds its EMA and moments `pack`ed."""
    return not isinstance(checkpointed["ema_params"], dict)


def ema_tree(checkpointed: dict):
    """The EMA of a (checkpointed) state's `params` as their tree."""
    ema = checkpointed["ema_params"]
    return unpack(ema, checkpointed["params"]) if is_packed(checkpointed) else ema


def _map_shadows(checkpointed: dict, fn) -> dict:
    """`checkpointed` with `fn` applied to its EMA and to each of Adam's moments."""

    def moments(x):
        if isinstance(x, optax.ScaleByAdamState):
            return x._replace(mu=fn(x.mu), nu=fn(x.nu))
        return x

    return {
        **checkpointed,
        "ema_params": fn(checkpointed["ema_params"]),
        "opt_state": jax.tree_util.tree_map(
            moments,
            checkpointed["opt_state"],
            is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState),
        ),
    }


def repack(checkpointed: dict, packed: bool) -> dict:
    """A (checkpointed) state with its EMA and Adam moments `pack`ed, or as the tree of its
    `params`: a checkpoint of one layout resumed by a run of the other."""
    if is_packed(checkpointed) == packed:
        return checkpointed
    params = checkpointed["params"]
    return _map_shadows(checkpointed, pack if packed else lambda x: unpack(x, params))


def repack_abstract(abstract: dict, packed: bool, sharding) -> dict:
    """`repack` of an abstract checkpointed state (`jax.ShapeDtypeStruct`s with shardings): a
    `pack`ed array is placed by `sharding`, a tree as the parameters are."""
    if is_packed(abstract) == packed:
        return abstract
    params = abstract["params"]
    flat = [
        jax.ShapeDtypeStruct(
            (sum(math.prod(x.shape) for x in group),), jnp.float32, sharding=sharding
        )
        for group in _groups(jax.tree_util.tree_leaves(params))
    ]
    return _map_shadows(abstract, lambda _: flat if packed else params)


# ----------------------------------------------------------------------------- the base model


def base_weights(cfg: TrainConfig, *, skip=()):
    """The pipeline a run starts from: a preset with random weights or a diffusers folder.

    Config overrides (`cfg.unet`, `cfg.vae`) apply to the component configs; a preset's
    components draw their random weights from `cfg.seed`, except those in `skip` (the trained
    ones, which `init_state` creates sharded instead).
    """
    from jaxdiff.convert.diffusers import PipelineWeights, load_pipeline
    from jaxdiff.tokenizer import bundled_clip_tokenizer

    if not cfg.model:
        raise ConfigError(
            f"model is not set (--set model=FOLDER of a diffusers model, or a preset: "
            f"{', '.join(PRESETS)})"
        )
    if cfg.model in PRESETS:
        preset = PRESETS[cfg.model]
        configs = _override(preset.components(), cfg)
        params = {
            name: None if name in skip else random_params(c, cfg.seed + i)
            for i, (name, c) in enumerate(configs.items())
        }
        tokenizers = {}
        if preset.text_encoder is not None:
            tokenizers["tokenizer"] = bundled_clip_tokenizer()
        if preset.text_encoder_2 is not None:
            tokenizers["tokenizer_2"] = bundled_clip_tokenizer()
        return PipelineWeights(
            preset.model_index(), configs, params, dict(preset.scheduler), tokenizers
        ), True
    weights = load_pipeline(cfg.model)
    if cfg.unet or cfg.vae:
        raise ConfigError("unet/vae overrides apply to presets, not to a pretrained model folder")
    return weights, False


def _override(configs: dict, cfg: TrainConfig) -> dict:
    out = dict(configs)
    for name, overrides in (("unet", cfg.unet), ("vae", cfg.vae)):
        if overrides:
            try:
                out[name] = dataclasses.replace(out[name], **overrides)
            except TypeError as e:
                raise ConfigError(f"{name} overrides: {e}") from None
    return out


def trained_components(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.task == "vae":
        return ("vae",)
    return ("unet", "text_encoder") if cfg.train_text_encoder else ("unet",)


# ----------------------------------------------------------------------------- the static setup


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
    """Everything static a train step needs; bound with `functools.partial`."""

    cfg: TrainConfig
    configs: dict  # component name -> model config
    modules: dict  # component name -> flax module in the compute dtype
    trained: tuple[str, ...]
    schedule: Any  # jaxdiff.schedules.NoiseSchedule (None for the VAE task)
    prediction_type: str
    tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    empty_ids: np.ndarray | None  # [77] int32: the tokenized empty caption
    empty_ids_2: np.ndarray | None = None  # ... by the second tokenizer (SDXL)
    small_leaf: int = SMALL_LEAF  # `small_leaf_limit` of the run's mesh
    packed: bool = False  # the EMA and Adam's moments `pack`ed (`packed_state`; `tx` so too)

    @property
    def sdxl(self) -> bool:
        """SDXL-style conditioning: two text encoders, a pooled embedding and size ids."""
        return "text_encoder_2" in self.modules

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        vae = self.configs["vae"]
        size = self.cfg.resolution // vae.downsampling_factor
        return (size, size, vae.latent_channels)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine decay to min_lr_ratio * peak."""
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(cfg.schedule_steps or cfg.steps, cfg.warmup_steps + 1),
            end_value=cfg.learning_rate * cfg.min_lr_ratio,
        )
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
            optax.constant_schedule(cfg.learning_rate),
        ],
        [cfg.warmup_steps],
    )


def frozen_mask(prefixes: tuple):
    """params -> a tree of bools, True where a parameter's path starts with one of `prefixes`."""

    def mask(params):
        used = set()

        def frozen(path, _):
            name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            hits = {p for p in prefixes if name == p or name.startswith(p.rstrip("/") + "/")}
            used.update(hits)
            return bool(hits)

        out = jax.tree_util.tree_map_with_path(frozen, params)
        unused = [p for p in prefixes if p not in used]
        if unused:
            raise ConfigError(f"freeze_params {unused} match no trained parameter")
        return out

    return mask


def _decay_mask(cfg: TrainConfig):
    """Weight decay on kernels and embeddings, not on biases, norm scales or frozen parameters."""
    frozen = frozen_mask(tuple(cfg.freeze_params)) if cfg.freeze_params else None

    def mask(params):
        if frozen is None:
            return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)
        return jax.tree_util.tree_map(lambda x, f: x.ndim > 1 and not f, params, frozen(params))

    return mask


def small_leaf_limit(fsdp: int) -> int:
    """The largest leaf `global_norm` and `all_finite` reduce together with the others, on a mesh
    whose FSDP axis has `fsdp` devices: SMALL_LEAF where no parameter is split, else 0 (each leaf
    on its own). Under FSDP the concatenation changes how XLA partitions the whole step: on 8 CPU
    devices as 2 x 4, the test config's step had 743 all-gathers against 113, and 544 with only
    the leaves the sharding rules never split (under `min_shard_size`) put together."""
    return SMALL_LEAF if fsdp == 1 else 0


def packed_state(fsdp: int) -> bool:
    """Whether a run on a mesh whose FSDP axis has `fsdp` devices keeps its EMA and Adam's
    moments `pack`ed: where no parameter is split. Under FSDP each stays a tree of arrays split
    as their parameters are: a flat array would have to be gathered and scattered across them."""
    return fsdp == 1


def _major_axis(x) -> int:
    """The axis of a state leaf (or its gradient) that is major in its memory order on a GPU: a
    convolution kernel's output channels (the last axis of HWIO, first in cuDNN's order), else
    the first axis (the default order)."""
    return x.ndim - 1 if x.ndim == 4 else 0


def _reduce_together(tree, elementwise, reduce, small: int, fence: bool = False):
    """`reduce` of `elementwise` of every element of `tree`, in one final reduction where
    `small` > 0: the leaves of at most `small` elements concatenated (in float32), and each
    larger leaf first reduced to its major axis (`_major_axis`). XLA launches kernels per
    reduction: SD 1.5's UNet has 404 biases and norm scales (SDXL's 886), which one
    concatenation makes one kernel; and XLA splits a large leaf's reduction to a scalar in two
    kernels, where its reduction to one axis is one. The axis major in memory makes it a
    reduction along rows: XLA:GPU gives a reduction that keeps the minor axis only a block of
    threads per 128 of it (10 blocks for a 1280 x 1280 dense kernel's columns;
    docs/benchmarks.md, session 17). `fence`: each large leaf goes through an optimization
    barrier first, so that XLA does not fuse its reduction into the kernel that computes it
    (`all_finite`). With `small` 0 (FSDP), each leaf is reduced on its own, as XLA
    partitions that best."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not small:
        return reduce(jnp.stack([reduce(elementwise(x)) for x in leaves] or [reduce(jnp.zeros(0))]))

    def to_major_axis(x):
        if x.ndim == 1:
            return elementwise(x)
        if fence:
            x = jax.lax.optimization_barrier(x)
        return reduce(elementwise(x), axis=tuple(a for a in range(x.ndim) if a != _major_axis(x)))

    parts = [to_major_axis(x) for x in leaves if x.size > small]
    together = [x.reshape(-1).astype(jnp.float32) for x in leaves if x.size <= small]
    if together:
        parts.append(elementwise(jnp.concatenate(together)))
    if not parts:
        return reduce(jnp.zeros(0))
    # XLA turns a reduction of a concatenation into one of each part, each of which it splits
    # in two kernels again: the barrier keeps the concatenation.
    return reduce(jax.lax.optimization_barrier(jnp.concatenate([p.reshape(-1) for p in parts])))


def global_norm(tree, small: int = SMALL_LEAF) -> jax.Array:
    """The l2 norm of all of `tree`'s leaves together (`optax.tree.norm`), in float32, reduced
    as `_reduce_together` says: each large leaf to its major axis (`_major_axis`)."""
    return jnp.sqrt(
        _reduce_together(tree, lambda x: jnp.square(x.astype(jnp.float32)), jnp.sum, small)
    )


def all_finite(tree, small: int = SMALL_LEAF) -> jax.Array:
    """Whether every element of `tree` is finite (a bool scalar), reduced as `_reduce_together`
    says, each large leaf behind a barrier: without, XLA fused the reductions of the train
    step's dense kernels into the update that writes the new weights, and copied 198 of them
    into the donated state's buffers (deviceless; docs/benchmarks.md, session 17)."""
    return _reduce_together(tree, jnp.isfinite, jnp.all, small, fence=True)


def clip_by_global_norm(max_norm: float, small: int = SMALL_LEAF) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (the same state, an empty one, and the same arithmetic) with
    `global_norm`: updates scaled by max_norm / norm where the norm is at least max_norm."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, small)
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(
    cfg: TrainConfig,
    learning_rate: optax.Schedule,
    small_leaf: int = SMALL_LEAF,
    packed: bool = False,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. A frozen parameter (`freeze_params`) gets exactly zero
    updates: the step drops its gradient (step._without_frozen), so its Adam moments stay zero,
    and it has no weight decay. small_leaf: `small_leaf_limit` of the run's mesh.

    `optax.adamw`'s pieces, in its order and with its state's structure; `packed` keeps Adam's
    moments `pack`ed, while the weight decay and the learning rate apply to each parameter as
    before."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(clip_by_global_norm(cfg.grad_clip, small_leaf))
    adam = optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    parts.append(
        optax.chain(
            _packed(adam) if packed else adam,
            optax.add_decayed_weights(cfg.weight_decay, _decay_mask(cfg)),
            optax.scale_by_learning_rate(learning_rate),
        )
    )
    return optax.chain(*parts)


def trained_scheduler_config(cfg: TrainConfig, scheduler_config: dict) -> dict:
    """The base model's diffusers scheduler config with the run's objective written in: what the
    run trains with, and what its export writes, so a sampler reads the model as trained."""
    out = dict(scheduler_config)
    if cfg.task == "vae":
        return out
    if cfg.prediction_type:
        out["prediction_type"] = cfg.prediction_type
    if cfg.rescale_betas_zero_snr:
        out["rescale_betas_zero_snr"] = True
    return out


def build_setup(
    cfg: TrainConfig,
    configs: dict,
    scheduler_config: dict,
    tokenizers: dict | None = None,
    *,
    fsdp: int = 1,
) -> TrainSetup:
    """tokenizers: "tokenizer" (and "tokenizer_2") of the base model, for the empty caption
    (default: the bundled CLIP tokenizer). fsdp: the size of the mesh's FSDP axis."""
    from jaxdiff.schedules import NoiseSchedule, ScheduleConfig

    dtype = jnp.dtype(cfg.compute_dtype)
    small_leaf = small_leaf_limit(fsdp)
    packed = packed_state(fsdp)
    trained = trained_components(cfg)
    needed = ("vae",) if cfg.task == "vae" else ("unet", "vae", "text_encoder")
    sdxl = cfg.task == "unet" and "text_encoder_2" in configs
    if sdxl:
        if "text_encoder" not in configs:
            raise ConfigError(
                f"model {cfg.model!r} is an SDXL refiner (one text encoder, aesthetic-score "
                "conditioning): training it is not supported"
            )
        if cfg.train_text_encoder:
            raise ConfigError("train_text_encoder=True is not supported for SDXL models")
        needed += ("text_encoder_2",)
    for name in needed:
        if name not in configs:
            raise ConfigError(f"model {cfg.model!r} has no {name}")
    # Frozen components compute in float32 unless the run is bf16 throughout.
    modules = {
        name: module_for(configs[name], dtype=dtype, param_dtype=jnp.float32) for name in needed
    }
    schedule, prediction_type, empty_ids, empty_ids_2 = None, "", None, None
    if cfg.task == "unet":
        trained_config = trained_scheduler_config(cfg, scheduler_config)
        sched_cfg = ScheduleConfig.from_diffusers(
            {k: v for k, v in trained_config.items() if not k.startswith("_")}
        )
        class_name = trained_config.get("_class_name", "DDPMScheduler")
        try:
            schedule = NoiseSchedule.from_config(sched_cfg, class_name)
        except ValueError as e:
            if cfg.rescale_betas_zero_snr:
                raise ConfigError(f"rescale_betas_zero_snr=True: {e}") from None
            schedule = NoiseSchedule.from_config(sched_cfg)
        prediction_type = schedule.prediction_type
        if cfg.rescale_betas_zero_snr and prediction_type != "v_prediction":
            raise ConfigError(
                "rescale_betas_zero_snr=True needs prediction_type='v_prediction' "
                f"(the model's scheduler says {prediction_type!r})"
            )
        from jaxdiff.tokenizer import bundled_clip_tokenizer, tokenize

        tokenizers = tokenizers or {}
        empty_ids = tokenize(tokenizers.get("tokenizer") or bundled_clip_tokenizer(), [""])[0]
        if sdxl:
            tokenizer_2 = tokenizers.get("tokenizer_2") or bundled_clip_tokenizer()
            empty_ids_2 = tokenize(tokenizer_2, [""])[0]
    lr = learning_rate_schedule(cfg)
    return TrainSetup(
        cfg=cfg,
        configs=configs,
        modules=modules,
        trained=trained,
        schedule=schedule,
        prediction_type=prediction_type,
        tx=optimizer(cfg, lr, small_leaf, packed),
        learning_rate=lr,
        empty_ids=empty_ids,
        empty_ids_2=empty_ids_2,
        small_leaf=small_leaf,
        packed=packed,
    )


# ----------------------------------------------------------------------------- born-sharded init


def _box(params, axes):
    """Plain arrays -> `nn.Partitioned` boxes carrying their logical axis names."""
    return jax.tree_util.tree_map(
        lambda names, x: nn.Partitioned(x, tuple(names)),
        axes,
        params,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _init_boxed(setup: TrainSetup, key, pretrained: dict):
    """The checkpointed part of a fresh state, with logical axis boxes (not yet unboxed)."""
    params = {}
    for i, name in enumerate(setup.trained):
        if pretrained.get(name) is not None:
            params[name] = _box(pretrained[name], logical_axes(setup.configs[name]))
        else:
            module = module_for(setup.configs[name], param_dtype=jnp.float32)
            from jaxdiff.models.build import init_inputs

            params[name] = module.init(jax.random.fold_in(key, i), **init_inputs(module))["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": (
            pack(nn.meta.unbox(params))
            if setup.packed
            else jax.tree_util.tree_map(lambda x: x, params)
        ),
        "opt_state": setup.tx.init(params),
    }


def _specs_of_boxed(tree, mesh: Mesh, cfg: TrainConfig):
    """PartitionSpecs of a (partly) boxed tree: rules for named leaves, the FSDP default else."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            names, shape = tuple(leaf.names), tuple(leaf.value.shape)
        else:
            names, shape = (None,) * len(leaf.shape), tuple(leaf.shape)
        spec = shd.logical_to_spec(names, shape, mesh, cfg.logical_axis_rules, cfg.min_shard_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def frozen_for_compute(frozen_params: dict, cfg: TrainConfig) -> dict:
    """The frozen components' host parameters as the step reads them: with a compute dtype other
    than float32, each parameter of two or more dimensions (kernels, embeddings) in that dtype,
    which the modules cast it to on every use anyway, so their outputs are the same bit for bit
    (tests/test_train_step.py); norm scales and biases stay float32. Half the memory, and no
    cast each step: SD 1.5's text encoder is 0.74 GB read and written a step in casts, SDXL's two
    4.9 GB. The loop's sample grids take the state's frozen weights, so these too; an export
    writes the base model's float32 weights for the frozen components."""
    dtype = jnp.dtype(cfg.compute_dtype)
    if dtype == jnp.float32:
        return frozen_params

    def one(x):
        return np.asarray(x).astype(dtype) if np.ndim(x) >= 2 else x

    return {name: jax.tree_util.tree_map(one, p) for name, p in frozen_params.items()}


def frozen_shardings(setup: TrainSetup, frozen_params: dict, mesh: Mesh):
    out = {}
    for name, p in frozen_params.items():
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
        out[name] = shd.param_shardings(
            abstract,
            logical_axes(setup.configs[name]),
            mesh,
            setup.cfg.logical_axis_rules,
            setup.cfg.min_shard_size,
        )
    return out


def state_shardings(setup: TrainSetup, mesh: Mesh, pretrained: dict, frozen: dict):
    """(abstract checkpointed state with shardings, its shardings, the frozen params' shardings)."""
    boxed = jax.eval_shape(lambda k: _init_boxed(setup, k, pretrained), jax.random.key(0))
    shardings = _specs_of_boxed(boxed, mesh, setup.cfg)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings, frozen_shardings(setup, frozen, mesh)


def init_state(
    setup: TrainSetup, mesh: Mesh, key, pretrained: dict, frozen: dict, *, shardings=None
) -> TrainState:
    """A fresh TrainState, every array created on its devices by one jitted init.

    shardings: what `state_shardings` returns for these arguments, when the caller has it
    (tracing the model for it again costs a second on the CPU)."""
    abstract, shardings, frozen_sh = shardings or state_shardings(setup, mesh, pretrained, frozen)
    # Pretrained weights go host -> their shards directly, never whole onto one device.
    pretrained_sh = {
        name: shardings["params"][name] for name in pretrained if pretrained[name] is not None
    }
    pretrained = {k: v for k, v in pretrained.items() if v is not None}
    pretrained = jax.device_put(pretrained, pretrained_sh)
    init = jax.jit(
        lambda k, p: nn.meta.unbox(_init_boxed(setup, k, p)),
        out_shardings=shd.placements(abstract),
    )
    part = compile_one_shot(init, key, pretrained, platform=mesh.devices.flat[0].platform)(
        key, pretrained
    )
    return assemble_state(part, jax.device_put(frozen, frozen_sh))


def assemble_state(checkpointed: dict, frozen: dict) -> TrainState:
    return TrainState(
        step=checkpointed["step"],
        params=checkpointed["params"],
        ema_params=checkpointed["ema_params"],
        opt_state=checkpointed["opt_state"],
        frozen=frozen,
    )


def train_state_shardings(abstract: dict, frozen_sh: dict) -> TrainState:
    """Where each array of a whole TrainState lives, for jit's in/out shardings: the checkpointed
    part's `jaxdiff.sharding.placements` (on a GPU, each convolution kernel a `Format` of the
    order cuDNN reads, and, where they are trees, its Adam moments and EMA with it, so the
    optimizer's update reads and writes every array in one order, transposing nothing), the
    frozen params' shardings.

    abstract: the checkpointed state's tree of `jax.ShapeDtypeStruct`s with shardings
    (`state_shardings`)."""
    return assemble_state(shd.placements(abstract), frozen_sh)


def replicated_spec(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
