"""The compose file's ``inference`` service matches what ``covid_tasks.serve`` listens on and reads."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _service() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]["inference"]


def test_inference_runs_the_service_against_the_stack_s_registry() -> None:
    svc = _service()
    assert svc["entrypoint"][-3:] == ["python", "-m", "covid_tasks.serve"]
    assert svc["command"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert svc["ports"] == ["${BIND_IP:-127.0.0.1}:8000:8000"]
    env = svc["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_INFERENCE_USER")
    assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_INFERENCE_PASSWORD:?")
    assert svc["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_inference_health_check_calls_an_endpoint_the_app_has() -> None:
    from covid_tasks.serve.app import create_app
    from covid_tasks.serve.settings import ServeSettings

    check = " ".join(_service()["healthcheck"]["test"])
    assert "http://localhost:8000/healthz" in check
    app = create_app(ServeSettings(tracking_uri="http://mlflow:5000"))
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {"/healthz", "/readyz", "/v1/predict", "/v1/model", "/metrics", "/"} <= paths
