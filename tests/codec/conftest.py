"""Shared fixtures of the codec tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run each codec test module on one thread (small vectorized ops are faster so, far faster on a
    loaded machine); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
