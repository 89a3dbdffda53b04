# touchstream: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Apache Kafka broker the embedded runtime runs: its jars and their dependencies from
# Maven Central (version pinned in deploy/kafka/pom.xml, the same as compose's), copied into
# the venv; Maven's own cache (~/.m2) keeps the downloads. A JDK and Maven come from Debian
# when missing.
KAFKA_POM := deploy/kafka/pom.xml
KAFKA_LIBS := $(VENV)/kafka/libs
KAFKA_STAMP := $(VENV)/kafka/.installed
# apt-get needs root; CI runs as root, a developer may not.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(KAFKA_STAMP) ## create .venv, install touchstream with its dev tools and the Kafka broker

$(KAFKA_STAMP): $(KAFKA_POM) | $(STAMP)
	@missing=""; command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; fi
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f $(KAFKA_POM) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_LIBS))
	touch $(KAFKA_STAMP)

kafka: $(KAFKA_STAMP) ## resolve the Apache Kafka broker from Maven Central (and a JDK from Debian if missing)

# Debian packages the tests drive: promtool (ops checks) and headless Chromium (console pages).
APT_TOOLS := prometheus chromium

tools: ## install promtool and headless Chromium from Debian if missing; the tests drive them
	@missing=""; command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; fi

demo: $(STAMP) $(KAFKA_STAMP) ## start broker, Redis, services and a receiver; replay CDNOW; print a summary
	$(BIN)/touchstream demo

# The whole of CDNOW, as `make demo`: the model has learned by the end, so the pages show moving scores.
screenshots: $(STAMP) $(KAFKA_STAMP) tools ## regenerate the README's console screenshots from the CDNOW demo (headless Chromium)
	$(BIN)/touchstream demo --screenshots docs/images

up-local: $(STAMP) $(KAFKA_STAMP) ## start the local stack in the background (touchstream local up)
	$(BIN)/touchstream local up

down-local: $(STAMP) ## stop the local stack
	$(BIN)/touchstream local down

# The console's chart library is committed (static/vendor/); this re-derives it from the npm registry's
# tarball, checked against the pins in services/console/vendor.py (a unit test checks the committed file).
vendor-charts: $(STAMP) ## re-fetch the console's pinned chart library (Apache ECharts) and check it
	$(BIN)/python -m services.console.vendor

lint: $(STAMP) ## ruff
	$(BIN)/ruff check touchstream touchstream_cli services tests bench

typecheck: $(STAMP) ## mypy
	$(BIN)/mypy

# Test processes: one per core by default; each starts its own broker (each test gets a Valkey of its
# own), and a test file stays on one process (module fixtures such as a running stack are shared there).
TEST_WORKERS ?= auto

# mypy (~15 s of CPU from a cold cache) runs beside pytest, whose processes spend much of their
# time waiting on brokers and services; its verdict is printed and counted at the end.
test: lint tools $(KAFKA_STAMP) ## lint, then typecheck beside the unit and integration tests in parallel (own broker per process, own Valkey per test)
	@start=$$(date +%s); mkdir -p .run; \
	$(BIN)/mypy > .run/typecheck.log 2>&1 & typecheck=$$!; \
	$(BIN)/pytest -q -m "not chaos" -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	wait $$typecheck; typecheck_rc=$$?; cat .run/typecheck.log; \
	echo "make test: typecheck $$([ $$typecheck_rc -eq 0 ] && echo passed || echo FAILED); pytest took $$(( $$(date +%s) - start )) s with $(TEST_WORKERS) workers"; \
	[ $$rc -eq 0 ] && [ $$typecheck_rc -eq 0 ]

up: ## docker compose: Kafka (KRaft), Redis, services, Prometheus, Grafana (needs Docker: fails on dev/CI machines)
	docker compose up -d --build --wait

down: ## stop the compose stack (its volumes stay; `docker compose down -v` drops them)
	docker compose down

test-chaos: $(STAMP) $(KAFKA_STAMP) tools ## long fault runs: kill -9, Redis and broker restarts, receiver outage, 10,000 bad inputs
	$(BIN)/pytest -q -m chaos
	TOUCHSTREAM_FUZZ_COUNT=10000 $(BIN)/pytest -q tests/integration/test_bad_input.py

bench: $(STAMP) $(KAFKA_STAMP) ## run every benchmark (each prints JSON); summary table in bench/results/summary.md
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP) $(KAFKA_STAMP) ## the same with --quick where a benchmark supports it
	$(BIN)/python bench/run_all.py --quick

clean: ## remove the venv and run files
	rm -rf $(VENV) .run test-artifacts

.PHONY: help install kafka tools up down demo screenshots up-local down-local vendor-charts lint typecheck test test-chaos bench bench-quick clean
