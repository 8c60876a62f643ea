"""Predict: a ``.keras`` file, and the registered champion through the CLI (real ``mlflow server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from covid_tasks.config import Config
from tests.helpers import tiny_run
from tests.helpers.mlflow_server import closed_port_uri, shared_server

MODEL = "covid-xray-classifier-predict-test"


@pytest.fixture(scope="module", autouse=True)
def _boot_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start the shared server at once; it boots while the first tests import TensorFlow."""
    shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run.make_data_root(tmp_path_factory.mktemp("predict_data"))


def _images(root: Path) -> tuple[str, str]:
    """A clearly covid and a clearly non_covid image from the tiny test split."""
    images = root / "raw" / "images"
    return str(images / "test_covid_14.png"), str(images / "test_non_covid_00.png")


def test_predict_with_a_keras_file(data_root: Path, tmp_path: Path) -> None:
    from covid_tasks.predict import predict
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model

    path = tmp_path / "finetune.keras"
    save_model(tiny_run.channel_model(tiny_run.GOOD), path)
    write_json(tmp_path / "metrics.json", {"threshold": 0.3})
    covid, non_covid = _images(data_root)
    result = predict([covid, non_covid], str(path))
    assert result["version"] is None and result["threshold"] == 0.3 and result["img_size"] == 32
    first, second = result["predictions"]
    assert first["class"] == "covid" and first["confidence"] == pytest.approx(first["prob_covid"])
    assert second["class"] == "non_covid" and second["confidence"] == pytest.approx(1 - second["prob_covid"])
    assert first["prob_covid"] > 0.9 > 0.1 > second["prob_covid"]
    # An explicit threshold overrides the recorded one.
    assert predict([non_covid], str(path), threshold=0.0)["predictions"][0]["class"] == "covid"


def test_predict_refuses_bad_inputs(data_root: Path, tmp_path: Path) -> None:
    from covid_tasks.predict import predict
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model

    path = tmp_path / "finetune.keras"
    save_model(tiny_run.channel_model(tiny_run.GOOD), path)
    write_json(tmp_path / "metrics.json", {"threshold": 0.5})
    with pytest.raises(FileNotFoundError):
        predict([str(tmp_path / "missing.png")], str(path))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="decodable"):
        predict([str(tmp_path / "broken.png")], str(path))
    write_json(tmp_path / "class_indices.json", {"covid": 0, "non_covid": 1})  # the swapped mapping
    with pytest.raises(ValueError, match="class_indices"):
        predict([_images(data_root)[0]], str(path))


def test_keras_file_without_its_operating_point_needs_a_threshold(data_root: Path, tmp_path: Path) -> None:
    """A ``.keras`` file without ``operating_point.json`` once used threshold 0.5 silently."""
    from covid_tasks.predict import predict
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model

    path = tmp_path / "finetune.keras"
    save_model(tiny_run.channel_model(tiny_run.GOOD), path)
    covid, _ = _images(data_root)
    with pytest.raises(ValueError, match=r"no operating point beside it .* \(predict --threshold\)"):
        predict([covid], str(path))
    assert predict([covid], str(path), threshold=0.7)["threshold"] == 0.7
    write_json(tmp_path / "operating_point.json", {"threshold": 0.25, "img_size": 32})
    assert predict([covid], str(path))["threshold"] == 0.25


@pytest.fixture(scope="module")
def champion(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Evaluate + register one good model on the shared server: version 1 is ``@champion``."""
    server = shared_server(tmp_path_factory)
    model = tiny_run.channel_model(tiny_run.GOOD, 40)

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    cfg = Config(data_root=str(data_root), mlflow_tracking_uri=server.url, model_name=MODEL,
                 experiment_name="predict-test", img_size=40, batch_size=8)
    tiny_run.write_model_run(cfg, "predict_run", model)
    ev = evaluate(cfg, "predict_run")
    reg = register(cfg, "predict_run")
    assert reg["promoted"] and reg["version"] == 1
    return {"url": server.url, "threshold": ev["threshold"]}


@pytest.fixture
def elsewhere(tmp_path: Path) -> Any:
    """Point MLflow's process-wide URIs at an empty store: the code must use the URI it is given."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    store = tmp_path / "elsewhere.db"
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    yield store
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.mark.mlflow_server
def test_cli_predict_resolves_the_champion_and_prints_its_version(
        data_root: Path, champion: dict[str, Any], elsewhere: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from covid_tasks.cli import main

    covid, non_covid = _images(data_root)
    uri = f"models:/{MODEL}@champion"
    assert main(["predict", covid, non_covid, "--model", uri, "--tracking-uri", champion["url"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Model : {uri} (version 1), threshold {champion['threshold']:.3f}"
    assert lines[1:3] == [f"Image : {covid}", "Class : covid"]
    assert lines[3].startswith("Confidence : ") and "% for covid (" in lines[3]
    assert lines[4].startswith("P(covid) : ") and f">= {champion['threshold'] * 100:.1f}%" in lines[4]
    assert lines[5:7] == [f"Image : {non_covid}", "Class : non_covid"]
    # What the number means: the registered model's output is the calibrated probability.
    assert "(calibrated probability: platt fitted on the val split" in lines[3]
    assert not elsewhere.exists()


@pytest.mark.mlflow_server
def test_predict_reports_a_missing_champion_or_registry_clearly(
        data_root: Path, champion: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from covid_tasks.cli import main
    from covid_tasks.predict import predict

    covid = _images(data_root)[0]
    with pytest.raises(RuntimeError, match="no-such-model"):
        predict([covid], "models:/no-such-model@champion", champion["url"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert main(["predict", covid, "--model", f"models:/{MODEL}@champion",
                 "--tracking-uri", closed_port_uri()]) == 1
    assert "error:" in capsys.readouterr().err
