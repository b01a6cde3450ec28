# GhostCloak Relay: the two commands of the README, and their parts.
#   make demo   set everything up, run dev node + relay + a scripted wallet session
#   make test   set everything up, run lint, types and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup setup-test setup-realnode lint typecheck pytest clean

demo: setup
	$(PY) -m ghostcloak_relay demo

test: setup-test setup-realnode lint typecheck pytest

setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh

setup-test:
	@PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh test

setup-realnode:
	@scripts/setup-realnode.sh

lint:
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .realnode .pytest_cache .mypy_cache .ruff_cache build dist
