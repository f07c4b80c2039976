# One command per chore. Each target makes its own virtual environment.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast lint bench bench-quick clean

$(BIN)/diktyo: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/diktyo

venv: $(BIN)/diktyo

demo: venv
	$(BIN)/diktyo demo

# Tests run on 3 pytest-xdist workers (most e2e time is waiting on processes and sockets);
# tests/conftest.py groups each module, and the modules sharing a machine-wide resource, onto
# one worker. `make test PARALLEL=` runs them one at a time. docs/testing.md has the figures.
PARALLEL ?= -n 3 --dist loadgroup --no-loadscope-reorder

test: venv
	$(BIN)/python -m pytest $(PARALLEL)

# between edits: pure and socket-level tests; no whole-mesh e2e, browser or benchmark smoke
test-fast: venv
	$(BIN)/python -m pytest $(PARALLEL) -m "not (e2e or browser or bench or slow)"

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

bench: venv
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run.py

bench-quick: venv
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
