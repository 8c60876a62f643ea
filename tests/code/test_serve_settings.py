"""Settings of the inference service: environment parsing, refusals, bounded MLflow HTTP retries."""

from __future__ import annotations

import pytest

from covid_tasks.registry import MLFLOW_HTTP_LIMITS, bound_mlflow_http
from covid_tasks.serve.settings import ServeSettings


def test_settings_from_the_environment() -> None:
    s = ServeSettings.from_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000", "COVID_SERVE_POLL_S": "5",
                                "COVID_SERVE_MAX_FILE_MB": "2", "COVID_SERVE_MAX_FILES": "8"})
    assert s.tracking_uri == "http://mlflow:5000" and s.poll_interval_s == 5.0
    assert s.max_file_bytes == 2 * 1024 * 1024 and s.max_files == 8
    assert s.model_name == "covid-xray-classifier" and s.alias == "champion"
    both = ServeSettings.from_env({"MLFLOW_TRACKING_URI": "http://a", "COVID_MLFLOW_TRACKING_URI": "http://b"})
    assert both.tracking_uri == "http://b"  # the project's own variable wins


@pytest.mark.parametrize(("env", "words"), [
    ({}, "set COVID_MLFLOW_TRACKING_URI"),
    ({"COVID_MLFLOW_TRACKING_URI": "http://x", "COVID_SERVE_POLL_S": "soon"},
     "COVID_SERVE_POLL_S must be a number"),
    ({"COVID_MLFLOW_TRACKING_URI": "http://x", "COVID_SERVE_MAX_FILES": "0"}, "max_files must be positive"),
])
def test_bad_settings_are_refused_with_the_variable_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServeSettings.from_env(env)


def test_mlflow_http_retries_are_bounded_unless_set() -> None:
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    got = bound_mlflow_http(env)
    assert got["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"  # an operator's value is kept
    assert got["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert int(got["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2
    assert float(got["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) <= 1


def test_pixel_limits_and_docs_defaults_and_environment() -> None:
    s = ServeSettings.from_env({"COVID_MLFLOW_TRACKING_URI": "http://x"})
    assert s.max_pixels == 25_000_000 and s.max_request_pixels == 100_000_000 and s.docs is False
    assert s.max_pixels >= 4000 * 5000  # a 4,000 x 5,000 px digital radiograph is admitted
    s = ServeSettings.from_env({"COVID_MLFLOW_TRACKING_URI": "http://x", "COVID_SERVE_MAX_PIXELS": "1e6",
                                "COVID_SERVE_MAX_REQUEST_PIXELS": "3000000", "COVID_SERVE_DOCS": "on"})
    assert (s.max_pixels, s.max_request_pixels, s.docs) == (1_000_000, 3_000_000, True)
    with pytest.raises(ValueError, match="COVID_SERVE_DOCS must be on or off"):
        ServeSettings.from_env({"COVID_MLFLOW_TRACKING_URI": "http://x", "COVID_SERVE_DOCS": "maybe"})
    with pytest.raises(ValueError, match="max_request_pixels must be positive"):
        ServeSettings.from_env({"COVID_MLFLOW_TRACKING_URI": "http://x",
                                "COVID_SERVE_MAX_REQUEST_PIXELS": "0"})
