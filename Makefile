# Parley: `make run` serves on embedded defaults, `make test` installs what the tests need and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONWARNINGS ?= default

.PHONY: help run test web-test lint style types bench venv services browser clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@tests/tools/ensure-python.sh "$(PYTHON)" "$(VENV)"
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP)  ## create .venv and install Parley with its dev tools

run: $(STAMP)  ## migrate and serve Parley on http://127.0.0.1:8080 (SQLite, local object store, simulator)
	$(BIN)/parley migrate
	$(BIN)/parley serve

services:  ## make sure the services the tests need are running (PostgreSQL)
	@tests/tools/ensure-postgres.sh

browser:  ## make sure Debian's Chromium is installed for the browser tests (apt, as root)
	@tests/tools/ensure-chromium.sh

web/node_modules/.installed: web/package-lock.json
	@command -v npm >/dev/null || { echo "The web client's tests need Node.js 20 and npm." >&2; exit 1; }
	cd web && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

web-test: web/node_modules/.installed  ## the web client's unit tests (Vitest + jsdom)
	cd web && npx --no-install vitest run

# Vitest first, so that pytest's summary is the last thing a run prints.
test: $(STAMP) services browser web-test  ## install what the tests need and run every test (Vitest, then pytest)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff and mypy --strict on relay/ and storage/
	$(BIN)/ruff check relay storage tests
	$(BIN)/ruff format --check relay storage tests
	$(BIN)/mypy

style: $(STAMP)  ## format and auto-fix
	$(BIN)/ruff format relay storage tests
	$(BIN)/ruff check --fix relay storage tests

types: $(STAMP)  ## mypy --strict
	$(BIN)/mypy

bench: $(STAMP) services  ## benchmarks; numbers go to tests/bench/RESULTS.md
	$(BIN)/python -m pytest -m bench -p no:randomly -s tests/bench $(PYTEST_ARGS)

clean:  ## remove the virtualenv and local data
	rm -rf $(VENV) data
