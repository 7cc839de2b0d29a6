import pytest
import torch

from minidsv3 import budget, set_seed


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


class _StepClock:
    """``budget.perf_counter``, which reads the clock at the start and at the end of each
    training step: this process's step i takes ``seconds(i)``, and 100 s pass between two
    steps (evaluations, checkpoints, logging), which a --time-budget must not count."""

    def __init__(self, seconds):
        self.seconds, self.now, self.calls = seconds, 0.0, 0

    def __call__(self):
        self.calls += 1
        self.now += self.seconds(self.calls // 2) if self.calls % 2 == 0 else 100.0
        return self.now


@pytest.fixture
def step_clock(monkeypatch):
    """``step_clock(seconds)``: from now on, training step i of a process takes
    ``seconds(i)`` seconds for --time-budget (a new call starts a new process's clock)."""
    return lambda seconds: monkeypatch.setattr(budget, "perf_counter", _StepClock(seconds))
