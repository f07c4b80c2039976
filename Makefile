# One command per chore. Each target makes its own virtual environment.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv build demo test test-fast test-pure lint bench bench-quick clean

$(BIN)/diktyo: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/diktyo

venv: $(BIN)/diktyo

# The compiled hot path (mypyc; setup.py, docs/decisions.md): `pip install -e .` builds it in
# place; this rebuilds it when one of its sources changed, since a stale .so would shadow the
# edit (diktyo then runs pure Python and warns; `diktyo --version` says which build runs).
HOT_PATH_SRC := $(shell $(PY) -c "import runpy; print(' '.join('src/' + m.replace('.', '/') + '.py' for m in runpy.run_path('src/diktyo/_build.py')['HOT_PATH']))" 2>/dev/null)
build: venv src/diktyo/_build_info.json

src/diktyo/_build_info.json: $(HOT_PATH_SRC) src/diktyo/_build.py setup.py src/diktyo/_idle_order.py \
  src/diktyo/proxy/codec/_nghttp2_build.py | $(BIN)/diktyo
	$(BIN)/python setup.py -q build_ext --inplace

demo: venv
	$(BIN)/diktyo demo

# Tests run on 3 pytest-xdist workers (most e2e time is waiting on processes and sockets);
# tests/conftest.py groups each module, and the modules sharing a machine-wide resource, onto
# one worker. `make test PARALLEL=` runs them one at a time. docs/testing.md has the figures.
PARALLEL ?= -n 3 --dist loadgroup --no-loadscope-reorder

test: venv build
	$(BIN)/python -m pytest $(PARALLEL)

# the proxy's fast tests on the pure-Python sources (the compiled build is what `test` runs)
test-pure: venv
	DIKTYO_PURE=1 $(BIN)/python -m pytest tests/proxy tests/integration/test_sidecar_forwarding.py \
	  -m "not (e2e or browser or bench or slow)"

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
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/diktyo/_build_info.json
	find src -name '*.so' -delete
