import pytest
import torch

import hf_stochact  # noqa: F401  (registers "stochastic")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
