"""The persistent compilation cache's folder (one per CPU) and one-shot compiler options.

The commands that use the cache are tested end to end elsewhere: `jaxdiff generate` in
test_pipelines.py, `jaxdiff train` (a resume compiles nothing new) in test_train_loop.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stand_ins import missing_kernel

from jaxdiff import compilation_cache
from jaxdiff.models import build
from jaxdiff.models.presets import PRESETS


def test_each_cpu_has_its_own_cache_folder(monkeypatch, tmp_path):
    real = compilation_cache.host_tag()
    assert real == compilation_cache.host_tag()  # stable on one machine
    tags = {}
    for cpu in ("model name\t: A\nflags\t\t: sse2 avx2\n", "model name\t: A\nflags\t\t: sse2\n"):
        monkeypatch.setattr(compilation_cache, "_cpu_identity", lambda cpu=cpu: cpu)
        tags[cpu] = compilation_cache.host_tag()
    assert len(set(tags.values())) == 2  # the same model with other features is another folder

    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(tmp_path / "cache"))
    assert compilation_cache.cache_dir() == tmp_path / "cache" / compilation_cache.host_tag()
    monkeypatch.delenv("JAXDIFF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.cache_dir().parent == tmp_path / "xdg" / "jaxdiff" / "xla"
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", "off")
    assert compilation_cache.cache_dir() is None
    # An explicit folder (`jaxdiff bench --cache DIR`) gets the same per-CPU subfolder.
    assert (
        compilation_cache.cache_dir(tmp_path / "b") == tmp_path / "b" / compilation_cache.host_tag()
    )
    assert compilation_cache.enable() is None


def test_a_folder_that_cannot_be_created_turns_the_cache_off(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(blocker / "cache"))
    before = jax.config.jax_compilation_cache_dir
    assert compilation_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compilation cache off" in err[0] and str(blocker) in err[0]


def test_one_shot_compile_gives_the_same_parameters(monkeypatch):
    """Initializers compile with `ONE_SHOT_COMPILER_OPTIONS` on the CPU; the values are bitwise
    those of a default compile."""
    config = PRESETS["tiny"].components()["text_encoder"]
    key = jax.random.key(7)
    seen = []
    compile_ = jax.stages.Lowered.compile

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    params = build.init_params(config, key)
    assert seen == [build.ONE_SHOT_COMPILER_OPTIONS["cpu"]]
    reference = jax.jit(build._init_fn(config, jnp.float32))(key)
    reference = jax.tree_util.tree_leaves(nn.meta.unbox(reference))
    leaves = jax.tree_util.tree_leaves(params)
    assert len(leaves) == len(reference) > 10
    for a, b in zip(leaves, reference, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _init_reading_the_threefry_option(seen, refuse_kernel):
    """A jitted draw that notes `jax_threefry_gpu_kernel_lowering` when lowered; with
    `refuse_kernel`, it fails to compile under that option, as on a jaxlib without the kernel."""

    def init(key):
        on = build._threefry_kernel_lowering().value
        seen.append(on)
        x = jax.random.normal(key, (4, 3))
        return missing_kernel(x, x)[0] if on and refuse_kernel else x

    return jax.jit(init)


@pytest.mark.parametrize(
    "platform, refuse_kernel, expected",
    [("gpu", False, [True]), ("gpu", True, [True, False]), ("cpu", False, [False])],
)
def test_one_shot_compile_draws_through_the_threefry_kernel_on_gpus(
    platform, refuse_kernel, expected
):
    """On a GPU, initializers lower their random draws to jax's precompiled threefry kernel (the
    unrolled default compiles a kernel per draw); where that does not compile, the default
    lowering. The draws are the same either way."""
    seen = []
    key = jax.random.key(3)
    jitted = _init_reading_the_threefry_option(seen, refuse_kernel)
    compiled = build.compile_one_shot(jitted, key, platform=platform)
    assert seen == expected
    np.testing.assert_array_equal(
        np.asarray(compiled(key)), np.asarray(jax.random.normal(key, (4, 3)))
    )
    assert build._threefry_kernel_lowering().value is False  # restored


def _leaves(boxed):
    """(path, type, shape, dtype, names) of every boxed parameter, in tree order."""
    return [
        (jax.tree_util.keystr(path), type(leaf), leaf.value.shape, leaf.value.dtype, leaf.names)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    ]


def test_parameter_shapes_come_back_from_the_cache_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(tmp_path / "cache"))
    sdxl = PRESETS["tiny-sdxl"]
    configs = [sdxl.unet, sdxl.text_encoder_2, PRESETS["tiny"].vae]
    traced = [build.boxed_abstract_params(c) for c in configs]
    entries = sorted((tmp_path / "cache" / "params").iterdir())
    assert len(entries) == 3

    def no_trace(*args, **kwargs):
        raise AssertionError("traced the model again")

    monkeypatch.setattr(build.jax, "eval_shape", no_trace)
    for config, fresh in zip(configs, traced, strict=True):
        cached = build.boxed_abstract_params(config)
        assert jax.tree_util.tree_structure(cached) == jax.tree_util.tree_structure(fresh)
        assert _leaves(cached) == _leaves(fresh)
    with pytest.raises(AssertionError, match="traced"):  # another dtype: not in the cache
        build.boxed_abstract_params(sdxl.unet, jnp.bfloat16)


def test_parameter_shapes_key_covers_config_dtype_and_model_code(monkeypatch, tmp_path):
    import shutil
    from pathlib import Path

    unet = PRESETS["tiny"].unet
    key = build._shapes_key(unet, jnp.float32)
    assert build._shapes_key(unet, jnp.float32) == key
    assert build._shapes_key(unet, jnp.bfloat16) != key
    assert build._shapes_key(PRESETS["tiny-sdxl"].unet, jnp.float32) != key
    edited = tmp_path / "models"
    shutil.copytree(Path(build.__file__).parent, edited, ignore=shutil.ignore_patterns("__py*"))
    monkeypatch.setattr(build, "__file__", str(edited / "build.py"))
    build._models_source_digest.cache_clear()
    assert build._shapes_key(unet, jnp.float32) == key  # the same source, elsewhere
    layers = edited / "layers.py"
    layers.write_text(layers.read_text() + "\n# an edit\n")
    build._models_source_digest.cache_clear()
    assert build._shapes_key(unet, jnp.float32) != key
    monkeypatch.undo()
    build._models_source_digest.cache_clear()


def test_damaged_parameter_shapes_entry_is_traced_again(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(tmp_path / "cache"))
    vae = PRESETS["tiny"].vae
    fresh = build.boxed_abstract_params(vae)
    (entry,) = (tmp_path / "cache" / "params").iterdir()
    good = entry.read_text()
    entry.write_text(good[:100])
    assert _leaves(build.boxed_abstract_params(vae)) == _leaves(fresh)
    assert entry.read_text() == good
