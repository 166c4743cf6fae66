# Two entry points: `make demo` and `make test`. Both create .venv on first use and are fast afterwards.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_DIR := graphdb/neo4j/lint
LINT_STAMP := $(LINT_DIR)/node_modules/.installed
# pip on this machine lists local indexes that may not exist; their warnings are noise.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev]" $(PIP_QUIET)
	touch $(STAMP)

$(LINT_STAMP): $(LINT_DIR)/package.json
	cd $(LINT_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $(LINT_STAMP)

install: $(STAMP) $(LINT_STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/diffgraph demo

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf var .pytest_cache
