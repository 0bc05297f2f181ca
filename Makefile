# aicredits: `make run` starts the app, `make test` runs everything CI runs.
# Both set themselves up: Python venv, Node.js and bun from the npm registry, the database.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JS_PATH = $$($(PY) scripts/js_runtime.py)
REFLEX_ENV = REFLEX_USE_SYSTEM_BUN=1 REFLEX_TELEMETRY_ENABLED=false

.DEFAULT_GOAL := help
.PHONY: help setup run migrate lint format test test-fast bench clean

help:
	@echo "make run     install what is missing, migrate the database, start the app on :3000"
	@echo "             (with Dev sign-in and the other local stand-ins)"
	@echo "make test    install what is missing, start Postgres/Redis, lint, type-check, run all tests"
	@echo "make bench   measure the ledger against plain psycopg (needs Postgres)"
	@echo "make lint    ruff + mypy only;  make format  apply ruff's formatting"

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)
	@$(PY) scripts/js_runtime.py >/dev/null

migrate: $(STAMP)
	$(PY) -m aicredits migrate

run: setup migrate
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) -m aicredits dev

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup
	bash scripts/services.sh
	bash scripts/chromium.sh
	$(MAKE) --no-print-directory lint
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) -m pytest

# Unit and integration tests only, no browser: for a quick loop while editing.
test-fast: $(STAMP)
	bash scripts/services.sh
	$(PY) -m pytest tests/unit tests/integration

bench: $(STAMP)
	bash scripts/services.sh
	$(PY) bench/ledger.py

clean:
	rm -rf .web .states .pytest_cache .mypy_cache .ruff_cache .hypothesis
