"""Shared pytest fixtures. Helpers that are more than fixtures live in helpers_*.py.

``--device cuda`` (default ``cpu``) runs the device-aware tests (modules marked
``pytest.mark.device_aware``: the layer tests, tests/test_device.py) on that device:
their factories create tensors there by default, as scripts/gpu_check.sh does on a GPU node.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the device-aware tests (pytest.mark.device_aware): cpu or "
                          "cuda (default cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "device_aware: runs on --device (default cpu)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The --device the device-aware tests run on."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: this torch build sees no CUDA device; run on a "
                                "GPU node or drop --device")
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {dev}: choose cpu or cuda")
    return dev


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same global RNG state (torch.manual_seed(0))."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def _device_aware_default(request):
    """Marked tests create their tensors and modules on --device (torch's default device)."""
    if request.node.get_closest_marker("device_aware") is None:
        yield
        return
    dev = request.getfixturevalue("device")
    if dev.type == "cpu":
        yield
        return
    prev = torch.get_default_device()
    torch.set_default_device(dev)
    try:
        yield
    finally:
        torch.set_default_device(prev)
