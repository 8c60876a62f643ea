"""End to end on DICOM: a folder of ``.dcm`` films whose metadata.csv leaves view and modality empty.

The sample data set is written as DICOM films (tests/helpers/dicom_data.py: CR and DX, MONOCHROME1
and 2, 8 to 16 bits, five transfer syntaxes, each header carrying ViewPosition, Modality and
distinctive patient data), its ``metadata.csv`` with empty ``view`` and ``modality`` cells. One
``airflow dags test`` run of `make run`'s DAG, at 32 px, takes it to a registered champion: the
headers supplied every view and modality. Then nothing of the patient data is found in the data
root (the pulled films aside), the MLflow store, the Airflow home (its database and task logs) or
the run's output, and ``predict`` classifies a ``.dcm`` file with the champion.

The run uses an Airflow database of its own, so the order of the DAG tests does not matter.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dicom_data import SAMPLE, dicom_source, phi_hits, phi_in_text

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONF = {"img_size": 32, "epochs": 1, "finetune_epochs": 1, "batch_size": 16,
        "backbone": "mobilenet_v3_small", "weights": "none", "min_sensitivity": 0.0, "min_specificity": 0.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("dicom_e2e")
    home = tmp / "airflow"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "COVID_DATA_ROOT": str(tmp / "data"), "COVID_SOURCE_URI": str(dicom_source(tmp / "source")),
           "COVID_MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"}
    for cmd in (["db", "migrate"], ["pools", "set", "gpu", "1", "GPU slots"]):
        out = subprocess.run([str(BIN / "airflow"), *cmd], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cmd = [str(BIN / "airflow"), "dags", "test", "covid_retraining", "--conf", json.dumps(CONF)]
    return env, subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def _sample_views() -> dict[str, str]:
    with open(SAMPLE / "metadata.csv", newline="") as fh:
        return {f"{Path(r['filename']).stem}.dcm": r["view"] for r in csv.DictReader(fh)}


def test_dicom_films_with_empty_view_and_modality_reach_a_registered_model(run) -> None:
    env, done = run
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    root = Path(env["COVID_DATA_ROOT"])
    source_rows = list(csv.DictReader(open(Path(env["COVID_SOURCE_URI"]) / "metadata.csv", newline="")))
    assert {r["view"] for r in source_rows} == {r["modality"] for r in source_rows} == {""}
    pulled = json.loads((root / "pull_report.json").read_text())
    assert pulled["quarantined_files"] == [], pulled["quarantined_files"]
    relabel = json.loads((root / "relabel_report.json").read_text())
    n = len(source_rows)
    assert relabel["from_header"]["dicom_images"] == n
    assert relabel["from_header"]["filled"] == {"view": n, "modality": n, "patientid": 0}
    with open(root / "labeled.csv", newline="") as fh:
        labeled = {r["filename"]: r for r in csv.DictReader(fh)}
    assert len(labeled) == n  # as many as the JPEG sample keeps: every film's view and modality came
    assert {f: r["view"] for f, r in labeled.items()} == _sample_views()  # from its header
    assert {r["modality"] for r in labeled.values()} == {"X-ray"}

    from mlflow import MlflowClient

    uri = env["COVID_MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("covid-xray-classifier", "champion")
    run_dir = next((root / "runs").iterdir())
    assert champion.tags["run_key"] == run_dir.name and "register: done" in log


def test_no_patient_data_in_the_data_root_mlflow_airflow_or_the_log(run) -> None:
    env, done = run
    assert done.returncode == 0
    root = Path(env["COVID_DATA_ROOT"])
    assert phi_hits([root / "raw" / "images"]), "the films must carry the patient data this test looks for"
    searched = [root, Path(env["COVID_MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent,
                Path(env["AIRFLOW_HOME"])]
    assert phi_hits(searched, inputs=[root / "raw" / "images", root / "quarantine"]) == []
    assert phi_in_text(done.stdout + done.stderr) == []


def test_predict_classifies_a_dcm_file_with_the_champion(run) -> None:
    env, done = run
    assert done.returncode == 0
    film = sorted((Path(env["COVID_SOURCE_URI"]) / "images").glob("*.dcm"))[0]
    out = subprocess.run([sys.executable, "-m", "covid_tasks", "predict", str(film), "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (item,) = json.loads(out.stdout)["predictions"]
    assert item["class"] in ("covid", "non_covid") and 0.0 <= item["prob_covid"] <= 1.0
    assert phi_in_text(out.stdout + out.stderr) == []
