# Two commands do all set-up on a fresh machine (see README):
#   make serve  - the main job: the gateway on the embedded default organ CT model
#   make test   - the test suite (what CI runs through .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test test-fast lint demo serve default-model clean image image-test

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

# Style, the import directions between the layers (pyproject [tool.importlinter], see
# docs/architecture.md) and types of the torch-free layers, the gateway and the clients.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# dciodvfy (Debian's dicom3tools), the DICOM standard's validator, checks the SEG we write;
# Orthanc with its DICOMweb plugin is the real PACS of the client tests; dcmtk's storescu plays
# the modality of the push tests (tests/test_listen.py); PostgreSQL is the database of the
# distributed jobs tests (tests/test_jobs_distributed.py).
SYSTEM_PACKAGES := dicom3tools orthanc orthanc-dicomweb dcmtk postgresql
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: system-deps $(STAMP) $(TRITON_VENV)/.installed lint
	$(BIN)/python -m pytest -q

# The inner loop (under 2 minutes): no slow tests (training, evaluation) and no integration tests
# (real tritonserver, Orthanc, gateway processes). `make test` runs everything and is what CI runs.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration"

demo: setup
	$(BIN)/sfpc demo --out runs/demo

# Re-create the shipped default model (sfpc/default_model/) from data/organs (`sfpc sample-data
# data`) or ../shared/data/organs.
ORGANS ?= $(or $(wildcard data/organs),../shared/data/organs)
# Then the robustness benchmark on the new export, and its table into the model card.
default-model: setup
	$(BIN)/sfpc build-default-model --data $(ORGANS) --no-progress
	$(BIN)/python benchmarks/robustness.py --data $(ORGANS) --json benchmarks/robustness_default_model.json
	$(BIN)/sfpc build-default-model --card-only --robustness benchmarks/robustness_default_model.json

# The main job: the gateway on http://127.0.0.1:8000 with the embedded default model
# (sfpc/default_model/), or another export with: make serve MODEL=runs/demo/export
serve: setup
	$(BIN)/sfpc serve $(if $(MODEL),--model $(MODEL))

# The gateway/worker image from this checkout (podman or docker): the base is made locally with
# debootstrap when no registry is reachable (PYTHON_IMAGE=python:3.12-slim to use one instead).
image:
	bash scripts/build_image.sh

# The image against a real PostgreSQL: a gateway and a worker container segment one CT as a job.
image-test: image setup
	$(BIN)/python scripts/image_test.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
