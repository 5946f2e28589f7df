"""The device mesh, the logical-axis rules, and the shardings of parameters and batches.

Sharding is data: the models name the logical axes of every parameter (`embed`, `heads`, `mlp`,
`conv_in`, `conv_out`, `norm`, `vocab`, see `jaxdiff.models.layers`); a rules table maps those
names to the two mesh axes, `data` and `fsdp`. Batches are split over both axes (every device
sees different examples); parameters are split over `fsdp` only (ZeRO-3 / FSDP: each device
holds 1/fsdp of the weights, which XLA gathers per layer), and replicated over `data`.

A parameter gets at most one sharded dimension: the first rule (in table order) whose logical
name it carries and whose dimension the mesh axis divides. A parameter no rule shards, and that
is not small, falls to the default FSDP rule: its largest dimension that the `fsdp` axis divides.
Small tensors (norm scales, biases) stay replicated: sharding them saves nothing and costs a
collective each.

The pipelines use `batch_sharding` / `shard_batch` with `replicated` parameters to split a batch
of images over all devices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every device: data parallel times FSDP.
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or None: never sharded), in priority order.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("norm", None),
)
# Parameters with fewer elements than this stay replicated.
DEFAULT_MIN_SHARD_SIZE = 2**10


# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (`data`, `fsdp`) mesh over `devices` (default: all); -1 takes the remaining devices.

    Devices keep `jax.devices()` order (process by process), so each process's devices hold a
    contiguous block of the batch: what `jax.make_array_from_process_local_data` expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data * fsdp != n or data < 1:
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} does not fit {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- parameters


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def logical_to_spec(
    names: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules=DEFAULT_RULES,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> PartitionSpec:
    """The PartitionSpec of one parameter from its logical axis names and shape."""
    if math.prod(shape) < min_size:
        return PartitionSpec()
    spec: list = [None] * len(shape)
    used: set = set()
    for logical, axis in rules:
        if axis is None or _axis_size(mesh, axis) == 1:  # size 1: replicated anyway
            continue
        axis_names = set(axis) if isinstance(axis, tuple) else {axis}
        for dim, name in enumerate(names):
            if (
                name == logical
                and spec[dim] is None
                and not (axis_names & used)
                and shape[dim] % _axis_size(mesh, axis) == 0
            ):
                spec[dim] = axis
                used |= axis_names
    if not used and "fsdp" in mesh.shape and mesh.shape["fsdp"] > 1:
        # The default FSDP rule: the largest dimension the fsdp axis divides (the first on ties).
        candidates = [d for d in range(len(shape)) if shape[d] % mesh.shape["fsdp"] == 0]
        if candidates:
            dim = max(candidates, key=lambda d: (shape[d], -d))
            spec[dim] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_specs(abstract, axes, mesh: Mesh, rules=DEFAULT_RULES, min_size=DEFAULT_MIN_SHARD_SIZE):
    """PartitionSpecs of a parameter tree.

    abstract: arrays or `jax.ShapeDtypeStruct`s; axes: a matching tree of logical-name tuples
    (`jaxdiff.models.build.logical_axes`), or None for a tree with no annotations.
    """
    if axes is None:
        axes = jax.tree_util.tree_map(lambda x: (None,) * len(x.shape), abstract)
    return jax.tree_util.tree_map(
        lambda names, x: logical_to_spec(tuple(names), tuple(x.shape), mesh, rules, min_size),
        axes,
        abstract,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def param_shardings(
    abstract, axes, mesh: Mesh, rules=DEFAULT_RULES, min_size=DEFAULT_MIN_SHARD_SIZE
):
    """NamedShardings of a parameter tree (see `param_specs`)."""
    specs = param_specs(abstract, axes, mesh, rules, min_size)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def fsdp_shardings(tree, mesh: Mesh, min_size=DEFAULT_MIN_SHARD_SIZE):
    """Shardings by the default FSDP rule alone, for trees without logical names."""
    return param_shardings(tree, None, mesh, (), min_size)


def describe(shardings) -> dict[str, str]:
    """'path/to/param' -> its PartitionSpec as text: for golden files and logs."""
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, PartitionSpec))
    )[0]
    out = {}
    for path, s in flat:
        spec = s.spec if isinstance(s, NamedSharding) else s
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = str(tuple(spec))
    return out


# ----------------------------------------------------------------------------- placement

# The memory order (major to minor) in which each platform's convolutions read a kernel that
# flax stores as [kh, kw, in, out]. On a GPU, XLA hands NHWC convolutions to cuDNN, which reads
# [out, kh, kw, in]. A kernel in the default (row-major) order is then transposed by XLA on every
# call of a program that takes it as an argument: 98 transposes, 1.2 GB read and written, for
# SD 1.5's UNet in bfloat16 (XLA's program for an H200, compiled without a device,
# docs/benchmarks.md, session 13). Inside a jitted sampling loop XLA hoists them out, and keeps the
# transposed copy for the whole call. The CPU's convolutions read the default order.
CONV_KERNEL_LAYOUTS = {"gpu": (3, 0, 1, 2)}


def _layout_api():
    try:
        from jax.experimental.layout import Format, Layout
    except ImportError:  # a jax without the layout API: the default order everywhere
        return None
    return Format, Layout


def _platform(sharding) -> str:
    return next(iter(sharding.device_set)).platform


def placement(path, shape, sharding, platform: str | None = None):
    """Where `put_params` puts the leaf at `path` (a key path) of this shape: `sharding`, or for
    a convolution kernel (a 4-D `kernel`) on a platform in `CONV_KERNEL_LAYOUTS`, a
    `jax.experimental.layout.Format` of that memory order and `sharding`. Also what an abstract
    argument (`jax.ShapeDtypeStruct(..., sharding=placement(...))`) takes to compile the same."""
    api = _layout_api()
    order = CONV_KERNEL_LAYOUTS.get(platform or _platform(sharding))
    last = path[-1] if path else None
    if api is None or order is None or getattr(last, "key", None) != "kernel" or len(shape) != 4:
        return sharding
    format_, layout = api
    return format_(layout(major_to_minor=order), sharding)


def placements(abstract, platform: str | None = None):
    """`placement` of every leaf of a tree of `jax.ShapeDtypeStruct`s with shardings: the tree
    to give a jitted function as its in/out shardings (a train state's, where the optimizer's
    moments and the EMA of a kernel follow the kernel's order; jaxdiff.train.state)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: placement(path, x.shape, x.sharding, platform), abstract
    )


def relayout(tree, targets):
    """`tree` with each array whose target (a matching tree of `placements`, or of
    `jax.ShapeDtypeStruct`s placed so) is a `Format` of another memory order moved into it, its
    old buffer donated: one array's worth of memory at a time. For arrays that arrive in the
    default order (`jaxdiff.checkpoint` restores through it)."""
    api = _layout_api()

    def one(x, target):
        target = getattr(target, "format", target)  # a ShapeDtypeStruct's placement
        if api is None or not isinstance(target, api[0]) or target.layout is None:
            return x
        if x.format.layout.major_to_minor == target.layout.major_to_minor:
            return x
        return jax.device_put(x, target, donate=True)

    return jax.tree_util.tree_map(one, tree, targets)


def put_params(params, shardings, platform: str | None = None):
    """`jax.device_put(params, shardings)`, with each convolution kernel (a 4-D `kernel`) laid
    out in memory as the platform's convolutions read it (`CONV_KERNEL_LAYOUTS`; `platform`
    defaults to the devices').

    `shardings` is one sharding for every array or a matching tree of them. A jitted function
    takes such arrays as they are: jax compiles it for their layout, so XLA transposes nothing.
    Each call's dispatch checks their layouts, about 1 us an array on this project's CPU (0.1 ms
    for SD 1.5's 98 kernels; docs/benchmarks.md). A runtime that refuses the layout gets the
    default order, with a warning.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if isinstance(shardings, jax.sharding.Sharding):
        targets = [shardings] * len(leaves)
    else:
        targets = treedef.flatten_up_to(shardings)
    out = [
        placement(path, np.shape(leaf), sharding, platform)
        for (path, leaf), sharding in zip(leaves, targets, strict=True)
    ]
    if any(o is not t for o, t in zip(out, targets, strict=True)):
        try:
            return jax.device_put(params, jax.tree_util.tree_unflatten(treedef, out))
        except (ValueError, TypeError, NotImplementedError, jax.errors.JaxRuntimeError) as error:
            # A runtime that refuses the layout: XLA transposes the kernels, as without it.
            warnings.warn(
                f"convolution kernels placed in the default memory order ({error})",
                RuntimeWarning,
                stacklevel=2,
            )
    return jax.device_put(params, jax.tree_util.tree_unflatten(treedef, targets))


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold (its share to load)."""
    if global_batch % mesh.size:
        raise ValueError(f"global batch {global_batch} is not divisible by {mesh.size} devices")
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    if hi - lo != global_batch * len(index_map) // mesh.size:
        raise ValueError("this process's devices do not hold a contiguous block of the batch")
    return slice(lo, hi)


def shard_batch(local_batch, mesh: Mesh, global_batch: int | None = None):
    """Host arrays (this process's rows, or all rows in a single process) -> global jax arrays."""
    sharding = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        n = global_batch if global_batch is not None else x.shape[0] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, (n,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local_batch)
