"""Credentials in the tracking URI (``http://user:password@host``) are never shown (issue 19, item 3).

Every output is searched for the password: the service's answers and log, the tasks' results,
logs, files and what they log to MLflow, the summary, and the errors of an unreachable registry.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tiny_run
from tests.helpers.mlflow_server import closed_port_uri, shared_server
from tests.helpers.serve_stack import MODEL as SERVE_MODEL
from tests.helpers.serve_stack import SAMPLES

pytestmark = pytest.mark.mlflow_server

PASSWORD = "SuperSecret123"
MODEL = "covid-xray-classifier-redaction-test"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://inference:{PASSWORD}@", 1)


def assert_hidden(*texts: Any) -> None:
    for text in texts:
        assert PASSWORD not in str(text), str(text)[:2000]


@pytest.fixture
def bounded_mlflow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_redact_uri_hides_user_and_password_in_uris_and_messages() -> None:
    from covid_tasks.config import redact_uri

    assert redact_uri(f"http://inference:{PASSWORD}@127.0.0.1:9") == "http://***@127.0.0.1:9"
    assert redact_uri(f"API request to http://u:{PASSWORD}@h:5/api failed; see postgresql://a:b@db/x") == \
        "API request to http://***@h:5/api failed; see postgresql://***@db/x"
    assert redact_uri(f"https://u:p@{PASSWORD}@host/x") == "https://***@host/x"  # an unescaped @ in it
    for plain in ("sqlite:////tmp/a@b/mlflow.db", "http://mlflow:5000", "s3://bucket/key", "mail me@x.org"):
        assert redact_uri(plain) == plain


def _client(settings: Any, holder: Any) -> Any:
    from fastapi.testclient import TestClient

    from covid_tasks.serve.app import create_app

    return TestClient(create_app(settings, holder))


def _all_answers(client: Any) -> list[str]:
    image = SAMPLES[0]
    predict = client.post("/v1/predict?explain=true", files={"file": (image.name, image.read_bytes())})
    return [predict.text, *(client.get(path).text for path in ("/readyz", "/v1/model", "/metrics", "/",
                                                                  "/openapi.json", "/healthz"))]


def test_service_with_an_unreachable_registry_hides_the_password_and_says_it_retries(
        bounded_mlflow_http: None, caplog: pytest.LogCaptureFixture) -> None:
    from covid_tasks.serve.model_holder import ModelHolder
    from covid_tasks.serve.settings import ServeSettings

    down = closed_port_uri()
    settings = ServeSettings(tracking_uri=with_credentials(down), poll_interval_s=7)
    holder = ModelHolder(settings)
    with caplog.at_level(logging.DEBUG):
        holder.refresh()
        client = _client(settings, holder)
        answers = _all_answers(client)
        ready = client.get("/readyz").json()
    assert ready["registry"]["reachable"] is False
    assert ready["registry"]["uri"] == down.replace("http://", "http://***@")
    assert "retrying every 7 s in the background" in ready["reason"]
    assert "Airflow" not in ready["reason"] and "the task fails" not in ready["reason"]
    assert "Airflow" not in ready["registry"]["error"]
    assert "***@" in caplog.text  # the URI was logged, without its credentials
    assert_hidden(*answers, caplog.text)


def test_service_serving_from_a_registry_with_credentials_hides_them(
        serve_stack: Any, bounded_mlflow_http: None, caplog: pytest.LogCaptureFixture) -> None:
    from covid_tasks.serve.model_holder import ModelHolder
    from covid_tasks.serve.settings import ServeSettings

    settings = ServeSettings(tracking_uri=with_credentials(serve_stack.registry.url), model_name=SERVE_MODEL)
    holder = ModelHolder(settings)
    with caplog.at_level(logging.DEBUG):
        holder.refresh()
        assert holder.current is not None, holder.status()
        client = _client(settings, holder)
        answers = _all_answers(client)
    info = json.loads(answers[2])
    assert info["registry"] == serve_stack.registry.url.replace("http://", "http://***@")
    assert json.loads(answers[0])["predictions"][0]["model_version"] == holder.current.version
    assert_hidden(*answers, caplog.text)


def test_service_log_hides_the_password(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    import uvicorn

    from covid_tasks.registry import MLFLOW_HTTP_LIMITS
    from covid_tasks.serve.__main__ import main

    uri = with_credentials(closed_port_uri())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.setenv("COVID_MLFLOW_TRACKING_URI", uri)
    for key, value in MLFLOW_HTTP_LIMITS.items():  # main sets them; restored afterwards
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.INFO):
        assert main(["--port", "8999"]) == 0
    assert "serving models:/covid-xray-classifier@champion from http://***@127.0.0.1:" in caplog.text
    assert_hidden(caplog.text)
    from covid_tasks.serve.__main__ import _RedactingFormatter

    try:  # the service's own log format also hides URIs quoted in messages and tracebacks
        raise RuntimeError(f"API request to {uri}/api/2.0/x failed")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "lookup of %s failed", (uri,),
                                   sys.exc_info())
    line = _RedactingFormatter("%(message)s").format(record)
    assert line.count("http://***@127.0.0.1:") == 2
    assert_hidden(line)


def test_tasks_hide_the_password_in_results_logs_files_and_mlflow(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, bounded_mlflow_http: None,
        caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    from covid_tasks.config import Config
    from covid_tasks.predict import load_model
    from covid_tasks.registry import RegistryUnavailableError
    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register
    from covid_tasks.summary import summary

    server = shared_server(tmp_path_factory)
    uri = with_credentials(server.url)
    root = tiny_run.make_data_root(tmp_path / "data")
    cfg = Config(data_root=str(root), mlflow_tracking_uri=uri, model_name=MODEL, experiment_name="redaction",
                 batch_size=8, img_size=32, backbone="mobilenet_v3_small", min_sensitivity=0.0,
                 min_specificity=0.0, source_uri=str(root))
    tiny_run.write_model_run(cfg, "run1", tiny_run.channel_model(tiny_run.GOOD, 32, 10.0))
    with caplog.at_level(logging.DEBUG):
        evaluated = evaluate(cfg, "run1")
        registered = register(cfg, "run1", context={"dataset_version": "ds-1"})
        text, facts = summary(cfg)
        with pytest.raises(RuntimeError) as missing:
            load_model("models:/no-such-model@champion", uri)
        with pytest.raises(RegistryUnavailableError) as down:
            register(cfg.replace(mlflow_tracking_uri=with_credentials(closed_port_uri())), "run1")
    assert registered["registered"] and registered["tracking_uri"] == server.url.replace("http://", "http://***@")
    assert facts["tracking_uri"] == registered["tracking_uri"] and "***@" in text
    assert "is unreachable" in str(down.value) and "***@" in str(down.value)
    assert "Airflow" not in str(down.value)
    client = MlflowClient(server.url, registry_uri=server.url)
    run = client.get_run(registered["mlflow_run_id"])
    version = client.get_model_version(MODEL, str(registered["version"]))
    files = [p.read_bytes().decode(errors="replace") for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name == "metrics.json" for p in root.rglob("metrics.json"))
    assert_hidden(json.dumps(evaluated, default=str), json.dumps(registered), text, json.dumps(facts),
                  str(missing.value), str(down.value), caplog.text, *files, json.dumps(run.data.params),
                  json.dumps(run.data.tags), json.dumps(version.tags), version.description)
