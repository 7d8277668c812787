"""Suite-wide settings: tiny models run faster on one intra-op thread (and leave the other core to
the subprocesses some tests start)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One thread for the test, and the count it found back afterwards (for tests that change it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
