# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the local virtualenv on first use. torch==2.13.0 is pinned first so pip takes the
# machine's local CPU wheel instead of resolving a multi-GB CUDA build from the index.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradledger-installed
SRC := ledger instrument audit

.PHONY: demo test lint typecheck unit bench setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[postgres,dev]"
	touch $(STAMP)

setup: $(STAMP)

# demo-out/ is regenerated on every run (the demo refuses a directory that already holds one).
demo: $(STAMP)
	rm -rf demo-out
	$(VENV)/bin/gradledger demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SRC) tests benchmarks examples
	$(VENV)/bin/ruff format --check $(SRC) tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy $(SRC)

unit: $(STAMP)
	$(PY) -m pytest -n 2 -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
