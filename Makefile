# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Both create .venv if it is missing and install the package into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel keeps installs fast on laptops and CI; users with a GPU can
# `pip install torch` themselves first (any torch>=2.7 works: FSDP2 with ignored_params).
TORCH_PIN ?= torch==2.13.0

.PHONY: install train test lab notebooks lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" || $(PY) -m pip install --quiet "torch>=2.7"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

# Training stops by the clock, not by a step count: CPUs differ by 2x and more between
# machines, and a fixed 1,500 steps took 7 to 17 minutes on the 2-core machines we tried.
# 540 s of steps plus the final whole-split evaluation, samples and plots stay under 10 min.
TRAIN_SECONDS ?= 540

train: install
	$(PY) -m minidsv3.train --time-budget $(TRAIN_SECONDS)

# One thread per process: the suite runs notebook kernels and multi-process tests side by
# side, and oversubscribed OpenMP threads on a 2-core machine slow everything down badly.
# So each test runs on one core, and two pytest-xdist workers keep both cores busy (half the
# wall time on 2 cores). --dist loadfile gives each file, and so each notebook's cells, to one
# worker, which runs them in order in one kernel. TEST_WORKERS=0 runs the suite serially.
TEST_WORKERS ?= 2

test: install
	MINIDSV3_QUICK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider --durations=10

lab: install
	$(VENV)/bin/jupyter lab notebooks

notebooks: install
	$(PY) notebooks/execute.py
	$(PY) -m minidsv3.exercises build

lint: install
	$(VENV)/bin/ruff check minidsv3 tests

clean:
	rm -rf $(VENV) runs
