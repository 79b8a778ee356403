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
.PHONY: help venv demo demo-loop dag test lint format bench airflow mlflow-ui clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel; a looser request would pull gigabytes of CUDA wheels.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install CouponOps with its pinned stack

demo: $(STAMP) ## Run the whole loop once through Airflow on embedded stores and print the summary
	$(BIN)/couponops init
	$(BIN)/airflow db migrate > $(STATE)/airflow-migrate.log 2>&1 || (tail -20 $(STATE)/airflow-migrate.log; exit 1)
	# Register every DAG (and its asset schedule) so asset events queue the retrain DAG.
	$(BIN)/airflow dags reserialize >> $(STATE)/airflow-migrate.log 2>&1 || (tail -20 $(STATE)/airflow-migrate.log; exit 1)
	# Asset-scheduled retraining only queues for an unpaused DAG; the clock-scheduled ones stay paused.
	$(BIN)/airflow dags unpause couponops_retrain >> $(STATE)/airflow-migrate.log 2>&1
	@set -euo pipefail; \
	DAY=$$($(BIN)/couponops world-clock --next-round); \
	echo "== simulated shop clock: $$DAY"; \
	for dag in couponops_ingest couponops_train couponops_allocate couponops_feedback couponops_retrain; do \
	  echo "== airflow dags test $$dag $$DAY"; \
	  $(BIN)/airflow dags test $$dag "$$DAY" > $(STATE)/$$dag.log 2>&1 \
	    || { tail -60 $(STATE)/$$dag.log; echo "DAG $$dag failed (full log: $(STATE)/$$dag.log)"; exit 1; }; \
	  grep -E "DagRun Finished|state=" $(STATE)/$$dag.log | tail -1 || true; \
	done
	$(BIN)/couponops report
	$(BIN)/couponops history --limit 5

DAG ?= couponops_retrain
dag: $(STAMP) ## Run one DAG through Airflow at the shop's clock: make dag DAG=couponops_retrain
	$(BIN)/airflow dags test $(DAG) "$$($(BIN)/couponops world-clock)"

ROUNDS ?= 5
CUSTOMERS ?=
BUDGET ?=
demo-loop: $(STAMP) ## Run ROUNDS weekly rounds of the closed loop from a cold start (optional CUSTOMERS=, BUDGET=)
	rm -rf $(STATE)/loop
	COUPONOPS_STATE_DIR=$(STATE)/loop $(BIN)/couponops loop --rounds $(ROUNDS) \
		$(if $(CUSTOMERS),--customers $(CUSTOMERS)) $(if $(BUDGET),--budget $(BUDGET))

test: $(STAMP) ## Lint, then run the whole test suite (unit, dags, integration, model)
	$(BIN)/ruff check .
	$(BIN)/pytest

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
