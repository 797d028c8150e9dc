# The two commands of the README. Each sets up what it needs on a fresh machine.
#   make demo   the demo: example chain on an embedded etcd, cancelled midway
#   make test   the test suite (system tools, Python packages, then pytest)
# Also: make demo-a2a (the same chain speaking A2A, cancelled with cancel-task).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-a2a test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/otel-cancel demo

demo-a2a: $(VENV)/.demo-installed
	$(BIN)/otel-cancel demo --a2a

test: $(VENV)/.dev-installed
	.ci/install-system-deps
	$(BIN)/python -m pytest

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check otel_cancel tests
	$(BIN)/ruff format --check otel_cancel tests
	$(BIN)/mypy
