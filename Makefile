# The two front-door commands: `make run` (set up, then the DVC pipeline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch first, pinned to the build pip finds on this project's machines.
TORCH ?= torch==2.14.1

.PHONY: help setup run test test-fast bench lint format params clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with cnnlab (editable) and its dev tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: setup  ## fetch -> train -> evaluate on params.yaml; DATA=fashion_mnist composes that dataset first
ifdef DATA
	$(BIN)/cnnlab params data=$(DATA)
endif
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup  ## the whole suite, end-to-end tests included
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

test-fast: setup  ## everything but the slow end-to-end tests
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow"

bench: setup  ## speed suite: cnnlab vs a plain PyTorch loop vs Keras (TensorFlow: pip install -e '.[bench]')
	$(BIN)/python benchmarks/speed.py

lint: setup  ## ruff check (rules in pyproject.toml)
	$(BIN)/ruff check src tests benchmarks

format: setup  ## ruff: fix what it can
	$(BIN)/ruff check --fix src tests benchmarks

params: setup  ## recompose params.yaml from conf/
	$(BIN)/cnnlab params

clean:  ## remove outputs of runs and reports (not data, models or the MLflow store)
	rm -rf outputs reports
