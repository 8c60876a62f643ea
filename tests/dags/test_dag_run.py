"""End to end: `airflow dags test` runs the whole DAG on the sample data at a tiny image size.

A first run pulls, trains, evaluates and registers a champion; a second, unforced run finds no
new data and skips everything after the pull; `predict` then uses the registered champion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONF = {"img_size": 32, "epochs": 1, "finetune_epochs": 1, "batch_size": 16,
        "backbone": "mobilenet_v3_small", "weights": "none",
        "min_sensitivity": 0.0, "min_specificity": 0.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, airflow_db: dict[str, str]) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("e2e")
    return {**airflow_db,
            "COVID_DATA_ROOT": str(tmp / "data"),
            "COVID_SOURCE_URI": str(REPO / "sample_data"),
            "COVID_MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"}


def _dags_test(env: dict[str, str], conf: dict) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "airflow"), "dags", "test", "covid_retraining", "--conf", json.dumps(conf)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def _task_states(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "state" in line)[-4000:]


@pytest.fixture(scope="module")
def first_run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return _dags_test(env, CONF)


def test_first_run_registers_a_champion(env, first_run):
    log = first_run.stdout + first_run.stderr
    assert first_run.returncode == 0, log[-6000:]
    runs = list((Path(env["COVID_DATA_ROOT"]) / "runs").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    for name in ("train.keras", "finetune.keras", "class_indices.json", "metrics.json", "predictions.csv",
                 "finetune_auc.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["passed"] is True
    assert json.loads((run_dir / "class_indices.json").read_text()) == {"non_covid": 0, "covid": 1}

    from mlflow import MlflowClient

    uri = env["COVID_MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("covid-xray-classifier", "champion")
    assert champion.tags["run_key"] == run_dir.name
    assert "register: done" in log


def test_second_run_without_new_data_skips_training(env, first_run):
    assert first_run.returncode == 0
    second = _dags_test(env, CONF)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert '"has_changes": false' in log
    assert "train: done" not in log and "register: done" not in log
    assert len(list((Path(env["COVID_DATA_ROOT"]) / "runs").iterdir())) == 1

    from mlflow import MlflowClient

    uri = env["COVID_MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name='covid-xray-classifier'")) == 1


def test_predict_cli_uses_the_champion(env, first_run):
    assert first_run.returncode == 0
    image = REPO / "sample_data" / "images" / "00cfd1c1.jpg"
    out = subprocess.run([sys.executable, "-m", "covid_tasks", "predict", str(image),
                          "--model", "models:/covid-xray-classifier@champion"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(version 1)" in out.stdout
    assert any(line in out.stdout for line in ("Class : covid", "Class : non_covid"))
    assert "Confidence : " in out.stdout
