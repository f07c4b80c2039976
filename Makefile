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

test: venv
	$(BIN)/python -m pytest

# between edits: pure and socket-level tests; no whole-mesh e2e, browser or benchmark smoke
test-fast: venv
	$(BIN)/python -m pytest -m "not (e2e or browser or bench or slow)"

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
