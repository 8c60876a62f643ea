# covid-xray-retrain: two commands do everything on a fresh machine.
#   make run   - venv, install, local Airflow + MLflow, one full DAG run on sample_data/
#   make test  - install test tools and run the test suite
#   make airflow - the Airflow UI on http://127.0.0.1:8080 (AIRFLOW_HOST, AIRFLOW_PORT change it)
#   make stack / stack-down / stack-test - docker-compose.yaml's services as local processes (docs/deployment.md)
#   make season [QUICK=1] - weekly retraining replayed through the scheduler (docs/season.md)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check

export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__EXECUTOR := LocalExecutor
export AIRFLOW__CORE__PARALLELISM := 4
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN := sqlite:///$(AIRFLOW_HOME)/airflow.db
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT := 120
# The DAG starts unpaused: its schedule never starts a run for a week already begun (docs/pipeline.md).
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := False
export COVID_DATA_ROOT ?= $(CURDIR)/data
export COVID_MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db
export COVID_SOURCE_URI ?= $(CURDIR)/sample_data
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(BIN):$(PATH)

# What `make run` changes for a CPU: 2 fine-tuning epochs so it ends in a minute, and a demo gate
# (docs/pipeline.md). Everything else (backbone, lung gate, probe head...) is the Trigger form's default:
# covid_tasks.config.Config's.
RUN_CONF ?= {"img_size": 224, "finetune_epochs": 2, "batch_size": 16, \
  "min_sensitivity": 0.5, "min_specificity": 0.0, "force": true}

# `make airflow` listens on this address only. 127.0.0.1 keeps the UI (simple auth manager, for
# development) on this machine; AIRFLOW_HOST=0.0.0.0 or an address opens it: firewall it then.
AIRFLOW_HOST ?= 127.0.0.1
AIRFLOW_PORT ?= 8080
AIRFLOW_URL_HOST := $(if $(filter 0.0.0.0 ::,$(AIRFLOW_HOST)),127.0.0.1,$(AIRFLOW_HOST))

.PHONY: install install-dev install-stack run airflow-init airflow test lint bench clean stack stack-down stack-test season

# `make stack`: the compose topology as local processes; state, logs and credentials in STACK_HOME.
STACK_HOME ?= $(CURDIR)/.stack
STACK_PORT_BASE ?= 41000

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python requirements.txt constraints.txt pyproject.toml
	$(PIP) install -r requirements.txt -c constraints.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -r requirements-dev.txt -c constraints.txt
	touch $@

$(VENV)/.installed-stack: $(VENV)/.installed requirements-stack.txt
	$(PIP) install -r requirements-stack.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-stack: $(VENV)/.installed-stack

airflow-init: install
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || { cat $(AIRFLOW_HOME)/db-migrate.log; exit 1; }
	$(BIN)/airflow pools set gpu 1 "GPU slots for train and finetune" > /dev/null

run: airflow-init
	@echo "make run: one run of covid_retraining (make run RUN_CONF='{...}' changes the settings):"
	@echo "  $$($(BIN)/python -m covid_tasks.run_report settings --conf '$(RUN_CONF)')"
	@rc=0; $(BIN)/airflow dags test covid_retraining --conf '$(RUN_CONF)' > $(AIRFLOW_HOME)/last-run.log 2>&1 \
	  || rc=$$?; $(BIN)/python -m covid_tasks.run_report tasks 2>> $(AIRFLOW_HOME)/last-run.log; \
	  if [ $$rc -ne 0 ]; then $(BIN)/python -m covid_tasks.run_report errors $(AIRFLOW_HOME)/last-run.log; \
	  echo "DAG run failed; full log: $(AIRFLOW_HOME)/last-run.log"; exit 1; fi
	@echo "Full Airflow log: $(AIRFLOW_HOME)/last-run.log"
	@$(BIN)/python -m covid_tasks summary 2>/dev/null | sed '$$d'

airflow: export AIRFLOW__API__HOST := $(AIRFLOW_HOST)
airflow: export AIRFLOW__API__PORT := $(AIRFLOW_PORT)
airflow: export AIRFLOW__CORE__EXECUTION_API_SERVER_URL := http://$(AIRFLOW_URL_HOST):$(AIRFLOW_PORT)/execution/
airflow: airflow-init
	@echo "make airflow: Airflow on http://$(AIRFLOW_URL_HOST):$(AIRFLOW_PORT), listening on $(AIRFLOW_HOST) only"
	@echo "  (AIRFLOW_HOST=0.0.0.0 make airflow opens it to the network; no log server port is opened)"
	@echo "  Trigger form defaults: $$($(BIN)/python -m covid_tasks.run_report settings)"
	@echo "  covid_retraining runs Sundays 00:00 UTC and starts unpaused: a Trigger runs at once"
	$(BIN)/python -m covid_tasks.local_airflow

# Test files run on TEST_WORKERS processes (pytest-xdist), a file's tests on one of them, in order;
# TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2

test: install-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

stack: install-stack
	$(BIN)/python -m stack up --home $(STACK_HOME) --port-base $(STACK_PORT_BASE)

# Stops exactly the processes `make stack` recorded in $(STACK_HOME)/state.json (standard library only).
stack-down:
	@PY=$(BIN)/python; [ -x $$PY ] || PY=python3; PYTHONPATH=$(CURDIR) $$PY -m stack down --home $(STACK_HOME)

# Starts its own stack on free ports in a temporary folder, runs tests/deploy/stack/, stops it.
stack-test: install-dev install-stack
	STACK_TEST=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/deploy/stack

lint: install-dev
	$(PIP) install -q ruff==0.17.6
	$(BIN)/ruff check dags covid_tasks tests stack docker

# A season of weekly runs through the scheduler (docs/season.md): the full shared data set in 13
# weeks (about 25 minutes on 2 cores), or QUICK=1: the sample data in 5 weeks (about 7 minutes).
season: install
	$(BIN)/python benchmarks/season.py $(if $(QUICK),--quick,)

bench: install-dev
	$(BIN)/python benchmarks/pull_bench.py
	$(BIN)/python benchmarks/input_pipeline_bench.py

# The inference service on the registry `make run` fills (see docs/serving.md).
SERVE_PORT ?= 8000
.PHONY: serve bench-serve
serve: install
	@echo "Inference service: http://127.0.0.1:$(SERVE_PORT)/ (page), /v1/predict, /v1/model, /readyz, /metrics"
	@echo "following models:/covid-xray-classifier@champion in $(COVID_MLFLOW_TRACKING_URI); Ctrl-C stops it"
	$(BIN)/python -m covid_tasks.serve --host 127.0.0.1 --port $(SERVE_PORT)

bench-serve: install
	$(BIN)/python benchmarks/serve_bench.py

clean:
	-$(MAKE) stack-down
	rm -rf $(VENV) .airflow data mlflow .pytest_cache .stack
