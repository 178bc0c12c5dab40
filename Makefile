# Every target works from a clean clone: `install` creates .venv when needed, from the lock.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The lock (`make lock`): every dependency pinned with its hashes. dev.txt is what `make install`
# installs (every extra); runtime.txt is a production host's (docs/deployment.md).
LOCK_DEV     := requirements/dev.txt
LOCK_RUNTIME := requirements/runtime.txt
EXTRAS       := dev,flower,sandbox,console,otel
# `make test-latest`: a throw-away venv with the newest versions setup.cfg's ranges allow.
LATEST_VENV  ?= .venv-latest
LINT_PATHS   := provisioning tasks celeryconfig.py bench

.DEFAULT_GOAL := help
.PHONY: help install lock audit test test-fast test-latest lint system-packages salesforce-tools demo sandbox bench soak proto clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The locked set first, hash-checked (it brings pip and setuptools too), then the package itself on
# top of it without resolving anything again.
$(STAMP): setup.cfg pyproject.toml $(LOCK_DEV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK_DEV)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## Create .venv from the lock (requirements/dev.txt) and install the package with every extra

lock: $(STAMP) ## Regenerate requirements/*.txt from setup.cfg's ranges: the newest versions they allow
	$(BIN)/uv pip compile setup.cfg requirements/build.in --extra dev --extra flower --extra sandbox \
	  --extra console --extra otel --universal --python-version 3.11 --generate-hashes --upgrade --quiet -o $(LOCK_DEV)
	$(BIN)/uv pip compile setup.cfg requirements/build.in --extra flower --extra console --extra otel \
	  --constraint $(LOCK_DEV) --universal --python-version 3.11 --generate-hashes --quiet -o $(LOCK_RUNTIME)
	@echo "Locked. Review 'git diff requirements/', then make install test lint test-latest."

# pip-audit (pinned in the lock) on the locked set, hashes required; exits 2 naming the vulnerability
# service when this machine cannot reach it (docs/operations.md, "Dependency audit").
AUDIT_SERVICE ?= pypi

audit: $(STAMP) ## pip-audit on requirements/*.txt: fails on a known vulnerability with a fix (AUDIT_SERVICE=pypi|osv)
	$(BIN)/python .ci/audit.py --service $(AUDIT_SERVICE)

system-packages: ## Debian's prometheus, chromium and linux-perf, which the monitoring, console and bench.perf tests run (apt, when missing)
	@.ci/system-packages

# The pinned sf CLI and Lightning Flow Scanner that check salesforce/ offline (tests/salesforce_metadata):
# npm ci from salesforce/package-lock.json, again only when the lock changes. No install scripts run.
SF_DIR   := salesforce
SF_TOOLS := $(SF_DIR)/node_modules/.package-lock.json

$(SF_TOOLS): $(SF_DIR)/package.json $(SF_DIR)/package-lock.json
	cd $(SF_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $(SF_TOOLS)

salesforce-tools: $(SF_TOOLS) ## The pinned sf CLI and flow scanner in salesforce/node_modules (npm ci, when missing)

test: $(STAMP) system-packages salesforce-tools ## Run the tests (real Redis, RabbitMQ, workers and simulators)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## Only the fast tier: the state machine in-process on real Redis (seconds)
	$(BIN)/pytest -m fast $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, mypy and the import layers (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(LINT_PATHS)
	$(BIN)/lint-imports

test-latest: ## The fast tier and the linters on the newest versions setup.cfg allows (a throw-away venv)
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/pip list --format freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/pytest -m fast $(PYTEST_ARGS)
	$(LATEST_VENV)/bin/ruff check .
	$(LATEST_VENV)/bin/ruff format --check .
	$(LATEST_VENV)/bin/mypy --cache-dir $(LATEST_VENV)/.mypy_cache $(LINT_PATHS)
	$(LATEST_VENV)/bin/lint-imports --no-cache
	@echo "Green on the newest versions ($(LATEST_VENV)/versions.txt); make lock takes them into the lock."

demo: $(STAMP) ## The end-to-end demo: sandbox, listener, two workers, 50 Orders
	$(BIN)/provisioning demo

sandbox: $(STAMP) ## Start the simulators and write sandbox.env
	$(BIN)/provisioning sandbox

bench: $(STAMP) ## Run the benchmarks with small defaults
	$(BIN)/python -m bench.run_all

# The soak (docs/reliability.md): the issue's configuration by default, RabbitMQ and 50-thread workers.
SOAK_MINUTES     ?= 60
SOAK_BROKER      ?= rabbitmq
SOAK_CONCURRENCY ?= 50
SOAK_RATE        ?= 5
SOAK_OUT         ?= bench/results/soak-$(SOAK_BROKER)-$(SOAK_MINUTES)min.md

soak: $(STAMP) ## The stack at SOAK_RATE Orders/s with faults and worker kills for SOAK_MINUTES (60): drift per window
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --broker $(SOAK_BROKER) \
	  --concurrency $(SOAK_CONCURRENCY) --rate $(SOAK_RATE) --out $(SOAK_OUT)

PROTO_DIR := provisioning/salesforce/pubsub

proto: $(STAMP) ## Regenerate the Pub/Sub API stubs from pubsub_api.proto (committed; needs grpcio-tools)
	$(BIN)/python -m provisioning.salesforce.pubsub.generate $(PROTO_DIR)

clean: ## Remove .venv, salesforce/node_modules and caches
	rm -rf $(VENV) $(LATEST_VENV) .mypy_cache .ruff_cache .pytest_cache .sandbox $(SF_DIR)/node_modules
