"""From a component config to its Flax module, its abstract parameters, and real ones."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig
from jaxdiff.threads import parallel_map

_MODULES = (
    (UNetConfig, UNet2DConditionModel),
    (VAEConfig, AutoencoderKL),
    (CLIPTextConfig, CLIPTextModel),
)


def module_for(config, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    """The Flax module of a component config (UNet, VAE or CLIP text encoder)."""
    for config_cls, module_cls in _MODULES:
        if isinstance(config, config_cls):
            return module_cls(config, dtype=dtype, param_dtype=param_dtype)
    raise TypeError(f"not a component config: {type(config).__name__}")


def init_inputs(module):
    """The smallest inputs that create every parameter."""
    if isinstance(module, UNet2DConditionModel):
        f = module.config.downsampling_factor
        return module.dummy_inputs(1, f, f)
    if isinstance(module, AutoencoderKL):
        return module.dummy_inputs(1, module.config.downsampling_factor)
    return module.dummy_inputs(1)


def _init_fn(config, param_dtype):
    module = module_for(config, param_dtype=param_dtype)
    inputs = init_inputs(module)
    return lambda key: module.init(key, **inputs)["params"]


def boxed_abstract_params(config, param_dtype=jnp.float32):
    """Parameter shapes wrapped in `nn.Partitioned` boxes that carry logical axis names.

    Finding them traces the whole model (1 s for the tiny preset's components, 2 s for SD 1.5's,
    4 s for SDXL's on a 2-core CPU), so the result is kept in jaxdiff's cache folder (`params/`,
    see `compilation_cache.base_dir`), keyed by the config, the dtype, the source of
    `jaxdiff.models` and the jax and flax versions: loading a model's weights needs no trace."""
    from jaxdiff import compilation_cache

    return compilation_cache.memoized(
        "params",
        lambda: _shapes_key(config, param_dtype),
        lambda: jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0)),
        dump=_boxed_to_json,
        load=_boxed_from_json,
    )


def _shapes_key(config, param_dtype) -> str:
    from jaxdiff.compilation_cache import entry_key

    text = f"{config!r}\n{jnp.dtype(param_dtype).name}\n{_models_source_digest()}"
    return entry_key(text, packages=("jax", "flax"))


@functools.cache
def _models_source_digest() -> str:
    """A hash of `jaxdiff.models`' source: any edit there may change the parameters."""
    h = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.name.encode() + b"\n" + source.read_bytes())
    return h.hexdigest()


def _boxed_to_json(boxed) -> str:
    flat = traverse_util.flatten_dict(boxed, sep="/")
    leaves = {}
    for name, leaf in flat.items():
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise TypeError(f"{name}: a parameter without logical axis names")
        value = leaf.value
        leaves[name] = [list(value.shape), jnp.dtype(value.dtype).name, list(leaf.names)]
    return json.dumps(leaves)


def _boxed_from_json(text: str):
    leaves = {
        name: nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)), names=tuple(names)
        )
        for name, (shape, dtype, names) in json.loads(text).items()
    }
    return traverse_util.unflatten_dict(leaves, sep="/")


def abstract_params(config, param_dtype=jnp.float32):
    """Parameter shapes and dtypes (`jax.ShapeDtypeStruct`), computed without allocating them."""
    return nn.meta.unbox(boxed_abstract_params(config, param_dtype))


def logical_axes(config):
    """The logical axis names of every parameter: a tree of tuples, one name (or None) per dim."""
    boxed = boxed_abstract_params(config)
    return jax.tree_util.tree_map(
        lambda leaf: tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


# Compiler options for programs that run once, per platform. XLA's CPU backend spends most of an
# init's compile in LLVM's optimizer (hundreds of random draws: 9.0 s for the tiny UNet's); level 1
# halves that, and the values are bitwise the same (docs/benchmarks.md, session 6).
ONE_SHOT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


# On GPUs jax lowers the threefry hash to an unrolled XLA expression, one kernel per random draw,
# and an initializer has hundreds: the SD 1.5 train state's init did not finish compiling in 100 s
# on an H200 (docs/benchmarks.md, session 11; 25 s on this CPU, where the hash is a rolled loop).
# jax's own CUDA and ROCm kernel for the hash is compiled already and gives the same bits
# (`jax_threefry_gpu_kernel_lowering`, off by default; it reads its option when lowering).
KERNEL_THREEFRY_PLATFORMS = ("gpu", "cuda", "rocm")


def _threefry_kernel_lowering():
    """jax's context manager for `jax_threefry_gpu_kernel_lowering`, or None where this jax has
    none (it is not public API)."""
    from jax._src import config

    return getattr(config, "threefry_gpu_kernel_lowering", None)


def compile_one_shot(jitted, *args, platform: str | None = None):
    """`jitted` lowered and compiled for `args` as an initializer, which runs once and compiles
    many kernels: with the platform's one-shot compiler options (`ONE_SHOT_COMPILER_OPTIONS`),
    and on a GPU with random draws through jax's precompiled threefry kernel (falling back to
    the default lowering if that does not compile). Under a transformation (`jax.eval_shape`, an
    outer `jit`) `jitted` itself is returned, to be traced into the caller's program."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
        return jitted
    platform = platform or jax.default_backend()
    options = ONE_SHOT_COMPILER_OPTIONS.get(platform)

    def compile(lowered):
        return lowered.compile(compiler_options=options) if options else lowered.compile()

    kernel_lowering = _threefry_kernel_lowering()
    if platform in KERNEL_THREEFRY_PLATFORMS and kernel_lowering is not None:
        try:
            with kernel_lowering(True):
                return compile(jitted.lower(*args))
        except Exception:  # no such kernel in this jaxlib: the default lowering below
            pass
    return compile(jitted.lower(*args))


def init_params(config, key, param_dtype=jnp.float32):
    """Random parameters (plain arrays) with the reference libraries' layouts and names."""
    init = jax.jit(_init_fn(config, param_dtype))
    return nn.meta.unbox(compile_one_shot(init, key)(key))


def random_params(config, seed: int = 0, param_dtype=np.float32):
    """Random parameters drawn on the host from the abstract shapes, without tracing the model.

    Kernels ~ N(0, 1/fan_in) (LeCun normal, like `init_params`), embeddings ~ N(0, 0.02^2), norm
    scales 1 and biases 0. Much faster than `init_params` on the CPU, where compiling the forward
    pass that `init` runs dominates: for tests, benchmarks and `jaxdiff init`. Each parameter has
    its own generator (spawned from `seed` in a fixed order), so the parameters are drawn on all
    cores (numpy fills an array without the GIL) and are the same whatever the thread count.
    """
    flat = traverse_util.flatten_dict(abstract_params(config))
    seeds = np.random.SeedSequence(seed).spawn(len(flat))

    def draw(path, leaf, seed_seq):
        kind = path[-1]
        if kind == "kernel":
            value = np.random.default_rng(seed_seq).standard_normal(leaf.shape, np.float32)
            value *= np.float32(1.0 / np.sqrt(np.prod(leaf.shape[:-1])))
        elif kind == "embedding":
            value = np.random.default_rng(seed_seq).standard_normal(leaf.shape, np.float32)
            value *= np.float32(0.02)
        elif kind == "scale":
            value = np.ones(leaf.shape, np.float32)
        else:
            value = np.zeros(leaf.shape, np.float32)
        return value.astype(param_dtype, copy=False)

    values = parallel_map(draw, flat, flat.values(), seeds)
    return traverse_util.unflatten_dict(dict(zip(flat, values, strict=True)))
