# The two front-door commands: `make run` (set up, then the DVC pipeline) and `make test`.
# Each installs what it needs and no more, at the versions in constraints.txt (`make lock` renews them).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
# torch first, pinned to the build pip finds on this project's machines.
TORCH ?= torch==2.14.1
# On every core; with trainings, one test file per worker (a module's shared training or sweep is made once).
PYTEST := PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n auto

.PHONY: help setup run test test-fast test-e2e bench gpu-check lint format params lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# One stamp per set of extras: `make run` installs the pipeline only, the test targets add theirs.
$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.dev: $(VENV)/.test
	$(PIP) -e '.[dev]'
	touch $@

setup: $(VENV)/.dev  ## create .venv with cnnlab (editable) and every test tool and extra

run: $(VENV)/.base  ## fetch -> train -> evaluate on params.yaml; DATA=fashion_mnist composes that dataset first
ifdef DATA
	$(BIN)/cnnlab params data=$(DATA)
endif
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.dev  ## every tier, fastest first: fast, then trainings, then end-to-end (what CI runs)
	$(PYTEST) --dist loadfile

test-fast: $(VENV)/.test  ## the edit loop: no training subprocess, no server (at most 2 minutes)
	$(PYTEST) -m fast

test-e2e: $(VENV)/.dev  ## the end-to-end tier only: dvc repro, sweeps, kills, servers, clusters, browser
	$(PYTEST) --dist loadfile -m e2e

bench: $(VENV)/.base  ## speed suite: cnnlab vs a plain PyTorch loop vs Keras (TensorFlow: pip install -e '.[bench]')
	$(BIN)/python benchmarks/speed.py

# Exit status 0 passed, 1 a step failed, 3 nothing checked (no CUDA here); logs and report in outputs/gpu-check/.
$(VENV)/.gpu: $(VENV)/.dev
	$(PIP) -e '.[gpu]'
	touch $@

gpu-check: $(VENV)/.gpu  ## on a CUDA machine: GPU tests, syncs per step, e2e, precisions, resume, NCCL, speed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(VENV)/.test  ## ruff check (rules in pyproject.toml)
	$(BIN)/ruff check src tests benchmarks

format: $(VENV)/.test  ## ruff: fix what it can
	$(BIN)/ruff check --fix src tests benchmarks

params: $(VENV)/.base  ## recompose params.yaml from conf/
	$(BIN)/cnnlab params

# The newest versions pyproject.toml allows, into .venv, then pinned: run `make test` before committing it.
lock: $(VENV)/.base  ## renew constraints.txt: upgrade within pyproject's bounds, pin what got installed
	$(BIN)/python -m pip install -q --upgrade $(TORCH) -e '.[dev]'
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i '^cnnlab' > constraints.txt
	touch $(VENV)/.base $(VENV)/.test $(VENV)/.dev

clean:  ## remove outputs of runs and reports (not data, models or the MLflow store)
	rm -rf outputs reports
