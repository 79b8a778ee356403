# CouponOps — the front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STATE ?= $(CURDIR)/.couponops
STAMP := $(VENV)/.installed

export COUPONOPS_STATE_DIR ?= $(STATE)
export AIRFLOW_HOME ?= $(STATE)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(STATE)/airflow/airflow.db
export AIRFLOW__LOGGING__LOGGING_LEVEL ?= WARNING
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow.db
export GIT_PYTHON_REFRESH := quiet
export TQDM_DISABLE := 1
export PYTHONWARNINGS ?= ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning

.DEFAULT_GOAL := help
.PHONY: help venv browser demo demo-loop dag up up-check test lint format bench screenshots airflow mlflow-ui clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel; a looser request would pull gigabytes of CUDA wheels.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install CouponOps with its pinned stack

# The demo and `make up` read the simulated shop's exports from the landing zone, on the shop's clock.
demo up up-check dag: export COUPONOPS_SOURCE ?= simulator
demo up up-check dag: export COUPONOPS_CLOCK ?= data

demo: $(STAMP) ## Run one weekly round of the loop through Airflow on embedded stores and print the summary
	@$(BIN)/couponops init > /dev/null
	@$(BIN)/airflow db migrate > $(STATE)/airflow-migrate.log 2>&1 || (tail -20 $(STATE)/airflow-migrate.log; exit 1)
	@$(BIN)/python -m plugins.couponops_demo 2> $(STATE)/demo.log || (tail -60 $(STATE)/demo.log; exit 1)
	$(BIN)/couponops report
	$(BIN)/couponops history --limit 5

DAG ?= couponops_retrain
dag: $(STAMP) ## Run one DAG through Airflow now: make dag DAG=couponops_retrain
	$(BIN)/airflow dags test $(DAG)

UP_MINUTES ?= 0
up: $(STAMP) ## Start Airflow (scheduler, dag-processor, triggerer, API server) and the simulated shop on an accelerated clock
	$(BIN)/couponops init > /dev/null
	$(BIN)/airflow db migrate > $(STATE)/airflow-migrate.log 2>&1 || (tail -20 $(STATE)/airflow-migrate.log; exit 1)
	$(BIN)/python -m plugins.couponops_up --minutes $(UP_MINUTES)

up-check: $(STAMP) ## Check the Airflow metadata DB of `make up`: scheduled ingest/allocate/feedback and an asset-triggered retrain succeeded
	$(BIN)/python -m plugins.couponops_up --check

ROUNDS ?= 5
CUSTOMERS ?= 20000
BUDGET ?= 1500
demo-loop: $(STAMP) ## Run ROUNDS weekly rounds of the closed loop from a cold start (CUSTOMERS=20000, BUDGET=1500)
	rm -rf $(STATE)/loop
	COUPONOPS_STATE_DIR=$(STATE)/loop $(BIN)/couponops-sim loop --rounds $(ROUNDS) \
		--customers $(CUSTOMERS) --budget $(BUDGET)

# The browser tests drive Debian's Chromium (never a downloaded one). Installed when missing and
# apt-get can run; elsewhere the browser tests skip and say so.
CHROMIUM ?= /usr/bin/chromium
APT_LOG := /tmp/couponops-apt.log
browser: ## Install Debian's chromium for the browser tests (apt-get; needs root)
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then \
		echo "no $(CHROMIUM) and no root apt-get: the browser tests will skip"; exit 0; fi; \
	echo "installing Debian's chromium for the browser tests (apt-get)"; \
	apt-get install -y -q --no-install-recommends chromium > $(APT_LOG) 2>&1 || \
	{ apt-get update -q >> $(APT_LOG) 2>&1 && \
	  apt-get install -y -q --no-install-recommends chromium >> $(APT_LOG) 2>&1; } || \
	{ tail -5 $(APT_LOG); echo "chromium could not be installed: the browser tests will skip"; }

test: $(STAMP) browser ## Lint, then run the whole test suite (unit, dags, integration, model, browser)
	$(BIN)/ruff check .
	$(BIN)/pytest

screenshots: $(STAMP) browser ## Refresh the README's screenshots (docs in README.md) from the browser tour
	COUPONOPS_SCREENSHOTS_DIR=$(CURDIR)/tests/screenshots $(BIN)/pytest -q \
		tests/integration/test_browser_tour.py

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check .

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format mlpkg dags plugins tests
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## Run the benchmarks; results print as a table and land in bench-results/*.json
	$(BIN)/python -m tests.benchmarks.run --out bench-results

airflow: $(STAMP) ## Start Airflow (standalone) on the embedded stores for the UI
	$(BIN)/couponops init
	$(BIN)/airflow standalone

mlflow-ui: $(STAMP) ## Start the MLflow UI on the embedded store
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

clean: ## Remove the state folder (warehouse, MLflow, Airflow metadata) and bench results
	rm -rf $(STATE) bench-results
