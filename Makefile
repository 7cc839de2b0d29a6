# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Both create .venv if it is missing and install the package into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel keeps installs fast on laptops and CI; users with a GPU can
# `pip install torch` themselves first (any torch>=2.4 works).
TORCH_PIN ?= torch==2.13.0

.PHONY: install train test lab notebooks lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" || $(PY) -m pip install --quiet "torch>=2.4"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m minidsv3.train

test: install
	MINIDSV3_QUICK=1 $(PY) -m pytest -q tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

lab: install
	$(VENV)/bin/jupyter lab notebooks

notebooks: install
	$(PY) notebooks/execute.py
	$(PY) -m minidsv3.exercises build

lint: install
	$(VENV)/bin/ruff check minidsv3 tests

clean:
	rm -rf $(VENV) runs
