import os

import pytest
import torch

import hf_stochact  # noqa: F401  (registers "stochastic")
from hf_stochact import kernels

REQUIRE_KERNELS = os.environ.get("HF_STOCHACT_REQUIRE_KERNELS", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    if REQUIRE_KERNELS and not kernels.built():
        raise pytest.UsageError("HF_STOCHACT_REQUIRE_KERNELS is set but the C kernels (hf_stochact.kernels._C) "
                                "were not built: the tests of the compiled path would silently not run")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["c", "torch"])
def path(request):
    """Run a test on the C loops and on the operators' torch implementation."""
    if request.param == "torch":
        with kernels.torch_only():
            yield request.param
        return
    if not kernels.built():
        if REQUIRE_KERNELS:
            pytest.fail("C kernels required (HF_STOCHACT_REQUIRE_KERNELS) but not built")
        pytest.skip("C kernels not built")
    yield request.param
