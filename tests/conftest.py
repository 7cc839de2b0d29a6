import pytest

from minidsv3 import set_seed


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so random inputs are repeatable."""
    set_seed(0)
