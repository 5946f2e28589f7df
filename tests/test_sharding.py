"""The mesh, the logical-axis rules, the default FSDP rule, batch helpers, and a golden file of
the tiny preset's parameter shardings."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import sharding as shd
from jaxdiff.models.build import abstract_params, logical_axes
from jaxdiff.models.presets import PRESETS

GOLDEN = Path(__file__).parent / "golden" / "tiny_param_shardings.json"


def test_make_mesh():
    mesh = shd.make_mesh(2, 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert dict(shd.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}
    assert dict(shd.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    assert list(mesh.devices.flat) == jax.devices()  # process-contiguous batch blocks
    with pytest.raises(ValueError, match="does not fit"):
        shd.make_mesh(3, 2)


def test_rules_shard_one_dimension_over_fsdp():
    mesh = shd.make_mesh(2, 4)
    # The first rule in table order whose dimension divides wins: mlp before embed.
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P(None, "fsdp")
    # Not divisible by 4 -> the next named dimension.
    assert shd.logical_to_spec(("embed", "mlp"), (64, 37), mesh) == P("fsdp")
    # Small tensors stay replicated.
    assert shd.logical_to_spec(("norm",), (64,), mesh) == P()
    # Unannotated (or only 'norm'-named) large tensors: the largest divisible dimension.
    assert shd.logical_to_spec((None, None, None), (3, 40, 64), mesh) == P(None, None, "fsdp")
    assert shd.logical_to_spec((None, None), (6, 1022), mesh) == P()  # nothing divisible
    # Without an fsdp axis to speak of, everything is replicated.
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), shd.make_mesh(8, 1)) == P()


def test_custom_rules_table():
    mesh = shd.make_mesh(2, 4)
    rules = (("embed", "fsdp"), ("mlp", None))
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp")
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh, (), min_size=10**9) == P()


def _tiny_shardings():
    mesh = shd.make_mesh(2, 4)
    out = {}
    for name, config in PRESETS["tiny"].components().items():
        sh = shd.param_shardings(abstract_params(config), logical_axes(config), mesh)
        out.update({f"{name}/{k}": v for k, v in shd.describe(sh).items()})
    return out


def test_golden_tiny_param_shardings():
    """Regenerate with JAXDIFF_UPDATE_GOLDEN=1 after a deliberate change of rules or models."""
    actual = _tiny_shardings()
    if os.environ.get("JAXDIFF_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    changed = {k: (expected.get(k), actual.get(k)) for k in expected.keys() | actual.keys()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    assert not changed, f"{len(changed)} shardings differ, e.g. {sorted(changed.items())[:5]}"
    assert any("fsdp" in v for v in actual.values())


def test_batch_helpers():
    mesh = shd.make_mesh(2, 4)
    assert shd.process_batch_slice(mesh, 16) == slice(0, 16)
    with pytest.raises(ValueError, match="divisible"):
        shd.process_batch_slice(mesh, 12)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    arr = shd.shard_batch({"x": x}, mesh)["x"]
    assert arr.sharding == shd.batch_sharding(mesh)
    assert len({s.data.shape for s in arr.addressable_shards}) == 1
    assert arr.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(arr), x)
    rep = jax.device_put(x, shd.replicated(mesh))
    assert rep.sharding.is_fully_replicated


def _unet_and_inputs():
    import functools

    from jaxdiff.models.build import module_for, random_params

    config = PRESETS["tiny"].unet
    module = module_for(config)
    rng = np.random.default_rng(0)
    inputs = {
        k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in module.dummy_inputs(2, 16, 16).items()
    }
    inputs["timesteps"] = np.array([10, 500], np.int32)
    step = jax.jit(lambda p, x: module.apply({"params": p}, **x))
    return config, random_params(config, 0), functools.partial(step, x=inputs)


def test_put_params_lays_conv_kernels_out_for_the_platform():
    """On a GPU every 4-D `kernel` is placed as [out, kh, kw, in] in memory, the order cuDNN reads:
    the values, the shardings (FSDP here; replicated in tests/test_pipelines.py) and a jitted
    UNet's output are those of the default placement."""
    config, params, step = _unet_and_inputs()
    mesh = shd.make_mesh(1, 2, devices=jax.devices()[:2])
    shardings = shd.param_shardings(params, logical_axes(config), mesh)
    plain = shd.put_params(params, shardings)  # the CPU: default order everywhere
    laid = shd.put_params(params, shardings, platform="gpu")
    kernels = 0
    for (path, a), b, host in zip(
        jax.tree_util.tree_leaves_with_path(plain),
        jax.tree_util.tree_leaves(laid),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        conv = path[-1].key == "kernel" and a.ndim == 4
        kernels += conv
        assert a.format.layout.major_to_minor == tuple(range(a.ndim))
        expected = (3, 0, 1, 2) if conv else tuple(range(a.ndim))
        assert b.format.layout.major_to_minor == expected, jax.tree_util.keystr(path)
        assert b.sharding == a.sharding
        np.testing.assert_array_equal(np.asarray(b), host)
    assert kernels > 10
    specs = [str(k.sharding.spec) for k in jax.tree_util.tree_leaves(laid) if k.ndim == 4]
    assert any("fsdp" in spec for spec in specs)  # laid out and split over devices at once
    np.testing.assert_array_equal(np.asarray(step(laid)), np.asarray(step(plain)))


def test_put_params_falls_back_to_the_default_order_where_refused(monkeypatch):
    from jax.experimental.layout import Format

    params = {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32), "bias": np.zeros(4)}}
    put = jax.device_put

    def refusing(tree, targets):
        if any(isinstance(t, Format) for t in jax.tree_util.tree_leaves(targets)):
            raise ValueError("layout not supported")
        return put(tree, targets)

    monkeypatch.setattr(jax, "device_put", refusing)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.warns(RuntimeWarning, match="default memory order.*layout not supported"):
        out = shd.put_params(params, device, platform="gpu")
    assert out["conv"]["kernel"].format.layout.major_to_minor == (0, 1, 2, 3)
    np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"]), params["conv"]["kernel"])
