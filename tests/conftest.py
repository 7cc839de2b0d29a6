import pytest
import torch

from minidsv3 import set_seed


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so random inputs are repeatable."""
    set_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
