# Two entry points that work on a fresh machine: `make train` and `make test` (`make docs` builds the site).
# Each creates the virtual environment and installs torch FIRST (a bare `torch` requirement resolved
# later would pull a multi-GB CUDA build): override TORCH_SPEC for another build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ENV_ID ?= HalfCheetah-v5
TIMESTEPS ?= 100000
PY := $(VENV)/bin/python

.PHONY: install train test docs lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) examples/train.py --env $(ENV_ID) --timesteps $(TIMESTEPS)

test: install
	$(PY) -m pytest -q

# The documentation site, warnings as errors, into docs/_build/html
docs: install
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy sb3_fasttd3

clean:
	rm -rf $(VENV) build docs/_build *.egg-info .pytest_cache .ruff_cache .hypothesis
