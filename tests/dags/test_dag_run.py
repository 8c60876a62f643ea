"""End to end: `airflow dags test` runs the whole DAG on the sample data at a tiny image size.

A first run pulls, trains, evaluates and registers a champion; a second, unforced run finds no
new data and skips everything after the pull; `predict` then uses the registered champion. Then
a run whose gate cannot be met ends `register` as skipped, and a run with weights its backbone cannot
use fails `pull` in one try; `make run`'s per-task report reads the same Airflow DB.
"""

from __future__ import annotations

import json
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
    # Only the training chain skips: outcome (all_done) still runs and says why.
    latest = _latest_run()
    states = {t["task_id"]: t["state"] for t in latest["tasks"]}
    assert latest["state"] == "success"
    assert {k: v for k, v in states.items() if v != "skipped"} == {
        "pull": "success", "check_new_data": "success", "outcome": "success"}, states
    outcome = next(t for t in latest["tasks"] if t["task_id"] == "outcome")["result"]
    assert outcome["decision"] == "skipped" and "no new or changed data" in outcome["summary"], outcome

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


def _latest_run() -> dict:
    from covid_tasks.run_report import collect

    return collect("covid_retraining")


def _first_run_id() -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalars(select(DagRun.run_id).where(DagRun.dag_id == "covid_retraining")
                               .order_by(DagRun.id).limit(1)).one()


def _asset_events(run_id: str) -> dict[str, dict]:
    """The asset events the run emitted: asset name -> extra."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetModel.name, AssetEvent.extra).join(
            AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetEvent.source_run_id == run_id)).all()
    return {name: extra for name, extra in rows}


def test_make_run_report_has_one_line_per_task(env, first_run):
    """What `make run` prints after the run (it calls the same command)."""
    assert first_run.returncode == 0
    cmd = [sys.executable, "-m", "covid_tasks.run_report", "tasks", "--run-id", _first_run_id()]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    tasks = ["pull", "check_new_data", "relabel", "check_data", "split", "train", "finetune", "evaluate",
             "register", "outcome"]
    assert [line.split()[0] for line in lines[:-1]] == tasks, out.stdout
    assert all(line.split()[1] == "success" and line.split()[2].endswith("s") for line in lines[:-1])
    assert "data checks ok" in lines[3]
    assert "registered and promoted to @champion" in lines[-3]
    assert "promote: version 1 registered and promoted to @champion" in lines[-2]
    assert lines[-1].startswith("DAG run manual__") and ": success in " in lines[-1]


def test_a_gate_rejection_skips_register_and_says_why(env, first_run):
    """The run succeeds; register ends skipped; the decision is an asset event; nothing is registered."""
    assert first_run.returncode == 0
    run = _dags_test(env, {**CONF, "min_sensitivity": 1.0, "min_specificity": 1.0, "force": True})
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    latest = _latest_run()
    states = {t["task_id"]: t["state"] for t in latest["tasks"]}
    assert latest["state"] == "success"
    assert states["evaluate"] == "success" and states["register"] == "skipped", states
    register = next(t for t in latest["tasks"] if t["task_id"] == "register")
    assert register["result"]["registered"] is False and register["result"]["mlflow_run_id"]
    events = _asset_events(latest["run_id"])
    assert events["covid-xray-evaluation"]["gate"] == "rejected"
    assert events["covid-xray-evaluation"]["reasons"]
    assert "covid-xray-classifier" not in events  # no model version, so no model event
    assert "rejected by the gate" in (run.stdout + run.stderr)

    from mlflow import MlflowClient

    uri = env["COVID_MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name='covid-xray-classifier'")) == 1
    logged = client.search_runs([client.get_experiment_by_name("covid-retraining").experiment_id],
                                filter_string="tags.decision = 'reject'")
    assert len(logged) == 1  # the rejected run's metrics are still in MLflow


def test_first_run_published_the_registry_decision(env, first_run):
    assert first_run.returncode == 0
    events = _asset_events(_first_run_id())
    assert events["covid-xray-classifier"]["decision"] == "promoted"
    assert events["covid-xray-classifier"]["version"] == 1
    assert events["covid-xray-evaluation"]["gate"] == "passed"


def test_a_bad_setting_fails_at_once_without_retries(env, first_run):
    """An error no retry can fix fails the task in one try (pull has 3 retries, 1 minute and up)."""
    assert first_run.returncode == 0
    run = _dags_test(env, {**CONF, "weights": "bundled", "force": True})  # bundled: EfficientNet-Lite only
    assert run.returncode != 0
    latest = _latest_run()
    pull = next(t for t in latest["tasks"] if t["task_id"] == "pull")
    assert (pull["state"], pull["tries"]) == ("failed", 1), latest
    assert latest["state"] == "failed"
    assert "weights 'bundled' exist only for the efficientnet_lite backbones" in run.stdout + run.stderr
    assert "not retried: bad configuration or data" in run.stdout + run.stderr
