"""Test setup: eight fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JAXDIFF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set JAXDIFF_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Tests never write to the user's persistent compilation cache.
os.environ["JAXDIFF_CACHE_DIR"] = "off"
