"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``tpu`` / ``gpu`` run only where jax's default backend is that device (run them
    with JAX_PLATFORMS unset or set to the device, e.g. ``JAX_PLATFORMS=cuda pytest -m gpu``)."""
    import pytest

    wanted = [i for i in items if i.get_closest_marker("tpu") or i.get_closest_marker("gpu")]
    if not wanted:
        return
    import jax

    backend = jax.default_backend()
    for item in wanted:
        for device in ("tpu", "gpu"):
            if item.get_closest_marker(device) and backend != device:
                item.add_marker(pytest.mark.skip(reason=f"needs a {device} (jax backend is {backend})"))
