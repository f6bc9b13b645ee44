# `make demo`: set up and run the main job on the embedded digits data set.
# `make test`: set up, check the import layering (import-linter contracts in pyproject.toml), lint (ruff: import order, unused
#              imports, undefined names, syntax; package, benchmarks and tests) and their formatting (ruff format --check;
#              `make format` rewrites them), type-check (mypy: the whole
#              package, [tool.mypy]), run the fast suite
#              (unit and CLI tests on tiny models, about 2 minutes on a 2-core EPYC, 3 on a Xeon: the loop while changing code).
# `make test-all`: the same checks and every test, the slow ones too (demo, torchrun, signals, exports to every
#              runtime, DeiT-S sized runs; about 14 minutes on a quiet 2-core EPYC, 20 on a busy one or a 2-core Xeon): what CI runs (bash .ci/run).
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

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check p3bkit benchmarks tests
	$(BIN)/ruff format --check p3bkit benchmarks tests
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format p3bkit benchmarks tests
	$(BIN)/ruff check --fix p3bkit benchmarks tests

test: lint
	$(BIN)/python -m pytest

test-all: lint
	$(BIN)/python -m pytest -m 'slow or not slow'

.PHONY: setup demo lint format test test-all
