# `make demo`: set up and run the main job on the embedded digits data set.
# `make test`: set up, check the import layering (import-linter contracts in pyproject.toml), run the tests (what CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/p3bkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/p3bkit

demo: setup
	$(BIN)/p3bkit demo -o runs/demo --target-speedup 2

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

.PHONY: setup demo test
