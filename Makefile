# touchstream: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install touchstream with its dev tools

demo: $(STAMP) ## start broker, Redis, services and a receiver; replay CDNOW; print a summary
	$(BIN)/touchstream demo

up-local: $(STAMP) ## start the local stack in the background (touchstream local up)
	$(BIN)/touchstream local up

down-local: $(STAMP) ## stop the local stack
	$(BIN)/touchstream local down

lint: $(STAMP) ## ruff
	$(BIN)/ruff check touchstream services tests bench

typecheck: $(STAMP) ## mypy
	$(BIN)/mypy

test: lint typecheck ## lint, typecheck, unit and integration tests (starts its own broker and Redis)
	$(BIN)/pytest -q -m "not chaos"

test-chaos: $(STAMP) ## long fault-injection tests
	$(BIN)/pytest -q -m chaos

bench: $(STAMP) ## run the benchmarks; each prints JSON
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean: ## remove the venv and run files
	rm -rf $(VENV) .run test-artifacts

.PHONY: help install demo up-local down-local lint typecheck test test-chaos bench clean
