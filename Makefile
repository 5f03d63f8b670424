# slidebridge — every target installs what it needs. The two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CI has 2 cores and 90 minutes: pytest's timeout guards against a hung test eating that budget.
PYTEST_ARGS ?=

.PHONY: help setup demo serve test lint typecheck unit integration infra-test e2e bench clean

help:
	@echo "make demo   - install everything, run every front door end to end on a generated slide"
	@echo "make test   - install everything, run ruff, mypy and all tests (unit, integration, infra, e2e)"
	@echo "make serve  - the local stack on http://127.0.0.1:8000"
	@echo "make synth  - synthesise the CDK app into cdk.out/ (no Docker, no AWS credentials)"
	@echo "make deploy - cdk deploy (needs AWS credentials and Docker for the batch image)"
	@echo "make bench  - benchmarks against their baselines"

$(VENV)/.installed: requirements.txt requirements-dev.txt lambdas/requirements.txt batch_job/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	# Only the generated Platform API client (aignx.codegen) is used, as the contract tests' client.
	$(PIP) install -q --no-deps aignostics==1.6.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m local demo

serve: setup
	$(PY) -m local serve --host 127.0.0.1 --port 8000

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: setup
	$(PY) -m mypy slidebridge batch_job lambdas local

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules cdk.out build demo-output .pytest_cache .mypy_cache .ruff_cache

-include infra.mk
