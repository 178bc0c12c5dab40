# Every target works from a clean clone: `install` creates .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint demo sandbox bench proto clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with its dev and flower extras

test: $(STAMP) ## Run the tests (real Redis, RabbitMQ, workers and simulators)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy provisioning tasks celeryconfig.py bench

demo: $(STAMP) ## The end-to-end demo: sandbox, listener, two workers, 50 Orders
	$(BIN)/provisioning demo

sandbox: $(STAMP) ## Start the simulators and write sandbox.env
	$(BIN)/provisioning sandbox

bench: $(STAMP) ## Run the benchmarks with small defaults
	$(BIN)/python bench/run_all.py

PROTO_DIR := provisioning/salesforce/pubsub

proto: $(STAMP) ## Regenerate the Pub/Sub API stubs from pubsub_api.proto (committed; needs grpcio-tools)
	$(BIN)/python -m provisioning.salesforce.pubsub.generate $(PROTO_DIR)

clean: ## Remove .venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .sandbox
