# aicredits: `make run` starts the app, `make test` runs everything CI runs.
# Both set themselves up: Python venv, Node.js and bun from the npm registry, the database.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JS_PATH = $$($(PY) scripts/js_runtime.py)
REFLEX_ENV = REFLEX_USE_SYSTEM_BUN=1 REFLEX_TELEMETRY_ENABLED=false

.DEFAULT_GOAL := help
.PHONY: help setup run prod check-config migrate lint format test test-fast bench clean bench-scale bench-chat bench-gateway \
	image image-check

help:
	@echo "make run     install what is missing, migrate the database, start the app on :3000"
	@echo "             (with Dev sign-in and the other local stand-ins)"
	@echo "make test    install what is missing, start Postgres/Redis, lint, type-check, run all tests"
	@echo "make prod    production mode: refuse dev defaults, migrate, reflex run --env prod"
	@echo "             (PROD_ARGS='--workers 4 --port 3000' or '--backend-only --backend-port 8000')"
	@echo "make bench   measure the ledger against plain psycopg (needs Postgres)"
	@echo "make bench-gateway  added latency: direct vs the LiteLLM proxy vs the prod app, interleaved"
	@echo "make bench-scale  metered req/s and p99 of the prod app with 1, 2 and 4 workers"
	@echo "make bench-chat   the chat in Chromium vs the /v1 API, then a 100-session soak"
	@echo "make lint    ruff, mypy, the layer contract (import-linter), hadolint;  make format  apply ruff's formatting"
	@echo "make image   build the container image with podman, base Debian from the Debian mirror"
	@echo "make image-check  start that image and wait for /healthz (needs Redis on 127.0.0.1)"

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

# Production: needs DATABASE_URL, REDIS_URL, SESSION_SECRET... (docs/deployment.md). The
# command checks them, migrates, and runs several backend workers.
PROD_ARGS ?=
prod: setup
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) -m aicredits prod $(PROD_ARGS)

check-config: $(STAMP)
	$(PY) -m aicredits check-config

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup
	bash scripts/services.sh
	bash scripts/chromium.sh
	$(PY) scripts/axe_core.py >/dev/null
	$(MAKE) --no-print-directory lint
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) -m pytest

# Unit and integration tests only, no browser: for a quick loop while editing.
test-fast: $(STAMP)
	bash scripts/services.sh
	$(PY) -m pytest tests/unit tests/integration

bench: $(STAMP)
	bash scripts/services.sh
	$(PY) bench/ledger.py

# Starts its own Postgres cluster, Redis, fake upstream, the app in production mode and the
# LiteLLM proxy (installed from PyPI into .bench/litellm-venv, never into .venv).
# BENCH_ARGS, e.g. "--against HEAD~3": the app of that revision measured beside this one.
BENCH_ARGS ?=
bench-gateway: setup
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) bench/gateway.py $(BENCH_ARGS)

# Starts its own Postgres cluster, Redis, fake upstream and the app in production mode.
bench-scale: setup
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) bench/scale.py

# The real app, Postgres, Redis, the fake upstream and Chromium (scripts/chromium.sh).
bench-chat: setup
	bash scripts/services.sh
	bash scripts/chromium.sh
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) bench/chat_ui.py
	PATH="$(JS_PATH):$$PATH" $(REFLEX_ENV) $(PY) bench/chat_soak.py

# The container image without Docker Hub (docs/deployment.md, "Building the image without Docker Hub").
# Not part of `make test`: it needs root, podman and debootstrap, and takes minutes.
image:
	bash scripts/build_image.sh build

image-check:
	bash scripts/build_image.sh check

clean:
	rm -rf .web .states .pytest_cache .mypy_cache .ruff_cache .hypothesis
