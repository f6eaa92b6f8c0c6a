# The two quickstart commands (`make run`, `make test`) and the rest of the developer loop.
# Every target creates .venv itself; nothing else needs to be installed beforehand but
# Python 3.11+ (and, for the PostgreSQL half of the suite and the console's browser tests,
# Debian's postgresql and chromium packages, which `make test` installs when it runs as root).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test test-reliability lint typecheck pytest bench migration format clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mailproc needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	@touch $@ $(RUN_STAMP)

## run: install, migrate and start the service on its built-in defaults (or $$MAILPROC_CONFIG)
run: $(RUN_STAMP)
	$(BIN)/mailproc db upgrade
	exec $(BIN)/mailproc serve

## test: lint, type checks and the whole suite, on SQLite and PostgreSQL
test: $(DEV_STAMP)
	tests/ensure_postgres.sh
	tests/ensure_chromium.sh
	$(MAKE) --no-print-directory lint typecheck pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check mailproc tests bench
	$(BIN)/ruff format --check mailproc tests bench

typecheck: $(DEV_STAMP)
	$(BIN)/mypy mailproc

pytest: $(DEV_STAMP)
	$(BIN)/pytest

## test-reliability: crashes under load, DNS/relay/webhook/database outages, malformed mail, SMTP abuse
test-reliability: $(DEV_STAMP)
	tests/ensure_postgres.sh
	$(BIN)/pytest tests/reliability

## bench: intake, end to end, scaling, memory, verification and console pages, each against its baseline; writes bench/results.json and bench/results.png
bench: $(DEV_STAMP)
	$(BIN)/python -m bench

## migration: generate a migration from the models (MSG="what changed")
migration: $(DEV_STAMP)
	@test -n "$(MSG)" || { echo 'usage: make migration MSG="what changed"'; exit 2; }
	$(BIN)/python -m mailproc.migrations.new "$(MSG)"

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix mailproc tests bench
	$(BIN)/ruff format mailproc tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
