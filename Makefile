# Two commands do all set-up on a fresh machine (see README):
#   make demo   - the main job (until the server lands: synthetic data -> train -> evaluate)
#   make test   - the test suite (what CI runs through .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build 2.13 in pyproject; GPU users see README "GPU".
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

TRITON_VENV ?= .venv-triton

# A real tritonserver for the tests lives in its own venv (pytriton pins numpy<2).
$(TRITON_VENV)/.installed: scripts/setup_triton_env.sh
	bash scripts/setup_triton_env.sh $(TRITON_VENV)
	touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: $(STAMP) $(TRITON_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/sfpc demo --out runs/demo

clean:
	rm -rf runs .pytest_cache .ruff_cache
