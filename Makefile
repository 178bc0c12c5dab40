# Every target works from a clean clone: `install` creates .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install system-packages test test-fast lint demo sandbox bench proto clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,flower,sandbox,console]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with its dev, flower, sandbox and console extras

system-packages: ## Debian's prometheus and chromium, which the monitoring and console tests run (apt, when missing)
	@.ci/system-packages

test: $(STAMP) system-packages ## Run the tests (real Redis, RabbitMQ, workers and simulators)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## Only the fast tier: the state machine in-process on real Redis (seconds)
	$(BIN)/pytest -m fast $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, mypy and the import layers (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy provisioning tasks celeryconfig.py bench
	$(BIN)/lint-imports

demo: $(STAMP) ## The end-to-end demo: sandbox, listener, two workers, 50 Orders
	$(BIN)/provisioning demo

sandbox: $(STAMP) ## Start the simulators and write sandbox.env
	$(BIN)/provisioning sandbox

bench: $(STAMP) ## Run the benchmarks with small defaults
	$(BIN)/python -m bench.run_all

PROTO_DIR := provisioning/salesforce/pubsub

proto: $(STAMP) ## Regenerate the Pub/Sub API stubs from pubsub_api.proto (committed; needs grpcio-tools)
	$(BIN)/python -m provisioning.salesforce.pubsub.generate $(PROTO_DIR)

clean: ## Remove .venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .sandbox
