"""External validation (``python -m covid_tasks validate``): figures that scikit-learn reproduces, bad
rows and files listed and skipped, one-class and empty CSVs, and ``--log`` against a real
``mlflow server`` and a SQLite store (version numbers come back as str from one, int from the other).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from tests.helpers import tiny_run
from tests.helpers.mlflow_server import shared_server

REPO = Path(__file__).resolve().parents[2]
MODEL = "covid-xray-classifier-validation-test"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny data root, an evaluated model (``model.keras`` with its operating point) and a film folder."""
    from covid_tasks.stages.evaluate import evaluate

    root = tiny_run.make_data_root(tmp_path_factory.mktemp("validation_data"))
    cfg = Config(data_root=str(root), mlflow_tracking_uri=f"sqlite:///{root / 'none' / 'mlflow.db'}",
                 img_size=32, batch_size=8, model_name=MODEL, experiment_name="validation-test",
                 backbone="mobilenet_v3_small")
    tiny_run.write_model_run(cfg, "v", tiny_run.channel_model(tiny_run.WORSE))
    evaluate(cfg, "v")
    films = tmp_path_factory.mktemp("hospital")
    (films / "films").mkdir()
    test = pd.read_csv(root / "splits.csv", dtype=str)
    test = test[test["split"] == "test"].reset_index(drop=True)
    for name in test["filename"]:
        shutil.copy(root / "raw" / "images" / name, films / "films" / name)
    test["image"] = "films/" + test["filename"]
    test["source"] = np.where(np.arange(len(test)) % 3 == 0, "hospital_a", "hospital_b")
    return {"cfg": cfg, "root": root, "model": DataRoot.of(cfg).run("v").model, "films": films, "test": test}


def _expected(model_path: Path, paths: list[Path]) -> np.ndarray:
    """P(covid) of each file, computed here with Keras and the project's decoder."""
    import keras

    from covid_tasks.images import load_image

    model = keras.saving.load_model(model_path)
    size = int(model.input_shape[1])
    return model.predict(np.stack([load_image(p, size) for p in paths]), verbose=0).ravel()


def _ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error written out here: sum over bins of |mean p - covid share| x share."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return total


def test_figures_agree_with_scikit_learn_and_bad_rows_and_files_are_listed(evaluated: dict[str, Any]
                                                                          ) -> None:
    from covid_tasks.registry import load_keras_file
    from covid_tasks.validation import validate

    films, test = evaluated["films"], evaluated["test"]
    (films / "films" / "notes.png").write_text("not an image")
    bad = pd.DataFrame([
        {"image": "films/missing.png", "label": "covid", "source": "hospital_a"},
        {"image": "films/notes.png", "label": "non_covid", "source": "hospital_a"},
        {"image": "films/x.png", "label": "pneumonia", "source": "hospital_a"},
        {"image": "", "label": "covid", "source": "hospital_a"},
        {"image": str(films / "films" / test["filename"][0]), "label": "covid", "source": "hospital_a"},
        {"image": "../elsewhere/a.png", "label": "covid", "source": "hospital_a"},
        {"image": test["image"][0], "label": test["label"][0], "source": "hospital_a"},  # listed twice
    ])
    rows = pd.concat([test[["image", "label", "source"]], bad], ignore_index=True)
    rows.insert(1, "label_upper", rows.pop("label").str.upper())  # labels in any case, columns in any order
    rows.rename(columns={"label_upper": "Label"}).to_csv(films / "labels.csv", index=False)

    result = validate(films / "labels.csv", str(evaluated["model"]))
    y = (test["label"] == "covid").astype(int).to_numpy()
    prob = _expected(evaluated["model"], [films / i for i in test["image"]])
    threshold = load_keras_file(evaluated["model"]).threshold
    assert result["threshold"] == threshold and result["model"]["version"] is None
    assert (result["n"], result["n_covid"], result["n_non_covid"]) == (35, 15, 20)
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-9)
    low, high = result["roc_auc_ci95"]
    assert low < result["roc_auc"] < high
    predicted = prob >= threshold
    assert result["sensitivity"] == pytest.approx(predicted[y == 1].mean())
    assert result["specificity"] == pytest.approx((~predicted[y == 0]).mean())
    assert result["ece"] == pytest.approx(_ece(y, prob.astype(float)), abs=1e-6)  # float32 scores
    # The test split's films scored by validate give the figures evaluate recorded for them.
    recorded = json.loads((evaluated["model"].parent / "metrics.json").read_text())
    for key in ("roc_auc", "sensitivity", "specificity"):
        assert result[key] == pytest.approx(recorded[key], abs=1e-9), key
    assert result["ece"] == pytest.approx(recorded["calibration"]["ece_after"], abs=1e-6)
    a = (test["source"] == "hospital_a").to_numpy()
    assert result["by_source"]["hospital_a"]["roc_auc"] == pytest.approx(roc_auc_score(y[a], prob[a]))
    assert result["by_source"]["hospital_b"]["n"] == int((~a).sum())

    reasons = {(s["image"], s["reason"].split(":")[0].split(" (")[0]) for s in result["skipped_rows"]}
    assert reasons == {("films/x.png", "unknown label 'pneumonia'"), ("", "empty image path"),
                       (str(films / "films" / test["filename"][0]), "absolute path"),
                       ("../elsewhere/a.png", "path leaves the CSV's folder"),
                       (test["image"][0], "duplicate row")}
    files = {s["image"]: s["reason"] for s in result["skipped_files"]}
    assert files["films/missing.png"] == "file not found"
    assert files["films/notes.png"].startswith("cannot decode")
    lines = {s["image"]: s["line"] for s in result["skipped_rows"] + result["skipped_files"]}
    assert lines["films/missing.png"] == 2 + 35  # the header is line 1


def test_a_one_class_csv_gives_nan_auc_and_a_note(evaluated: dict[str, Any]) -> None:
    from covid_tasks.validation import validate

    films, test = evaluated["films"], evaluated["test"]
    covid = test[test["label"] == "covid"][["image", "label"]]
    covid.to_csv(films / "covid_only.csv", index=False)
    result = validate(films / "covid_only.csv", str(evaluated["model"]))
    assert result["n"] == result["n_covid"] == 15 and result["n_non_covid"] == 0
    assert math.isnan(result["roc_auc"]) and math.isnan(result["specificity"])
    assert not math.isnan(result["sensitivity"])
    assert any("no non_covid film" in note for note in result["notes"])
    assert list(result["by_source"]) == ["unspecified"]
    assert "roc_auc" not in result["by_source"]["unspecified"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "covid_tasks", "validate", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=env)


def test_cli_prints_figures_and_json_and_refuses_an_empty_or_headerless_csv(evaluated: dict[str, Any]
                                                                           ) -> None:
    films, test = evaluated["films"], evaluated["test"]
    test[test["label"] == "covid"][["image", "label"]].to_csv(films / "covid_only.csv", index=False)
    out = _cli("--labels", str(films / "covid_only.csv"), "--model", str(evaluated["model"]), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    text, last = out.stdout.rsplit("\n", 2)[0], out.stdout.strip().splitlines()[-1]
    data = json.loads(last)
    assert data["n"] == 15 and data["roc_auc"] is None and data["model"]["threshold"] > 0
    assert "ROC AUC : nan" in text and "Note : no non_covid film" in text
    for key in ("n", "n_covid", "n_non_covid", "roc_auc", "roc_auc_ci95", "sensitivity", "sensitivity_ci95",
                "specificity", "specificity_ci95", "threshold", "ece", "by_source", "model", "skipped_rows",
                "skipped_files"):
        assert key in data

    (films / "empty.csv").write_text("")
    (films / "headerless.csv").write_text("films/a.png,covid\nfilms/b.png,non_covid\n")
    for name, message in (("empty.csv", "is empty"), ("headerless.csv", "no header row naming 'image'")):
        out = _cli("--labels", str(films / name), "--model", str(evaluated["model"]))
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr
    out = _cli("--labels", str(films / "covid_only.csv"), "--model", str(evaluated["model"]), "--log")
    assert out.returncode == 1 and "--log records the validation against a registered version" in out.stderr


@pytest.fixture(scope="module", params=["server", "sqlite"])
def registered(request: pytest.FixtureRequest, evaluated: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The evaluated model registered (with its model card) in a real server or a SQLite store."""
    from covid_tasks.stages.register import register

    if request.param == "server":
        url = shared_server(tmp_path_factory).url
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('validation_sqlite') / 'mlflow.db'}"
    cfg = evaluated["cfg"].replace(mlflow_tracking_uri=url)
    reg = register(cfg, "v", context={"dataset_version": "ds-v", "airflow_run_id": "manual__v"})
    return {**evaluated, "url": url, "version": str(reg["version"]), "register": reg}


def test_log_records_the_validation_against_the_version_and_its_model_card(registered: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from covid_tasks.model_card import CARD, read_artifact
    from covid_tasks.validation import EXPERIMENT, validate

    url, version = registered["url"], registered["version"]
    client = MlflowClient(url, registry_uri=url)
    card = read_artifact(client, MODEL, version, url, CARD)
    assert card and "None logged yet" in card  # register wrote the card before any validation

    films = registered["films"]
    registered["test"][["image", "label", "source"]].to_csv(films / "all.csv", index=False)
    result = validate(films / "all.csv", f"models:/{MODEL}@champion", url, log=True)
    assert result["model"]["name"] == MODEL and result["model"]["version"] == version
    assert result["model"]["run_id"] == registered["register"]["mlflow_run_id"]
    run = client.get_run(result["mlflow"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.tags["model_name"] == MODEL and run.data.tags["model_version"] == version
    assert run.data.tags["model_run_id"] == result["model"]["run_id"]
    assert run.data.metrics["external_roc_auc"] == pytest.approx(result["roc_auc"])
    assert run.data.metrics["external_sensitivity_ci95_low"] == pytest.approx(result["sensitivity_ci95"][0])
    assert run.data.metrics["external_n"] == 35 and run.info.status == "FINISHED"
    listed = {f.path for f in client.list_artifacts(run.info.run_id, "external_validation")}
    assert {f"external_validation/{n}" for n in ("reliability.png", "roc_curve.png", "scores.csv",
                                                 "validation.json")} <= listed
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=url,
                                                     artifact_path="external_validation",
                                                     dst_path=str(tmp_path)))
    assert (local / "roc_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = pd.read_csv(local / "scores.csv")
    assert roc_auc_score(scores["label"] == "covid", scores["prob_covid"]) == pytest.approx(result["roc_auc"])

    tags = client.get_model_version(MODEL, version).tags
    summary = json.loads(tags[result["mlflow"]["version_tag"]])
    assert summary["run_id"] == run.info.run_id and summary["roc_auc"] == pytest.approx(result["roc_auc"])
    card = read_artifact(client, MODEL, version, url, CARD)
    assert "None logged yet" not in card and run.info.run_id in card and "all.csv" in card
