# The two front-door commands: `make run` (set up, then the DVC pipeline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch/torchvision first, pinned to the builds pip finds on this project's machines.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test test-fast params clean

setup: $(VENV)/.installed

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

params: setup  ## recompose params.yaml from conf/
	$(BIN)/cnnlab params
