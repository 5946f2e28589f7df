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
