"""The service against its own OpenAPI schema, with Schemathesis (issue 19, item 6).

Schemathesis reads ``/openapi.json`` and sends requests generated from it, schema-valid ones and
(for the operations that take input) invalid ones, then checks every answer: no 5xx, a documented
status code (``ST103``), a documented content type and body, the documented headers
(``Retry-After`` on a 503), and that schema-valid requests are accepted (``ST202``: the request
body is declared with its image media types, so Schemathesis sends real image files) and invalid
ones refused.

Two targets: the real service of ``serve_stack`` (a model is served) and the app in process with
no registry (every model endpoint answers 503). Examples are few and derandomized, with no
deadline (no timing is asserted).
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis",
                                   reason="schemathesis is not installed (requirements-dev.txt)")
from hypothesis import HealthCheck, settings  # noqa: E402 - schemathesis brings hypothesis

pytestmark = pytest.mark.mlflow_server

EXAMPLES = settings(max_examples=6, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def conforms(schema: Any, **call: Any) -> list[str]:
    """Run Schemathesis' checks on every operation of ``schema``, positive and negative examples.

    The pytest plugin's lazy loader does not run under pytest 9, so each operation's Hypothesis
    strategy is driven here. Returns the operations checked (``GET /readyz``, ...).

    Raises:
        AssertionError: Schemathesis' report of the first failing check.
    """
    from hypothesis import given
    from schemathesis import GenerationMode

    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        checked.append(f"{operation.method.upper()} {operation.path}")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not (operation.query or operation.body):
                continue  # nothing to make invalid

            @given(case=operation.as_strategy(generation_mode=mode))
            @EXAMPLES
            def check(case: Any) -> None:
                case.call_and_validate(**call)

            check()
    return checked


def image_files_for_binary_fields() -> None:
    """Have Schemathesis send a small chest X-ray, in each accepted format, for every binary field
    (its own file samples include PDF and ZIP files, which the service rightly refuses)."""
    import io

    from hypothesis import strategies as st
    from PIL import Image

    from covid_tasks.serve.inputs import ACCEPTED_FORMATS
    from tests.helpers.serve_stack import SAMPLES

    xray = Image.open(SAMPLES[0]).convert("L").resize((96, 96))
    files = []
    for fmt in ACCEPTED_FORMATS:
        if not fmt.pillow:  # DICOM: Pillow writes none
            import numpy as np

            from tests.helpers.dicom_files import film_dicom

            files.append(film_dicom(np.asarray(xray)))
            continue
        buffer = io.BytesIO()
        xray.save(buffer, format=fmt.pillow[0])
        files.append(buffer.getvalue())
    schemathesis.openapi.format("binary", st.sampled_from(files))


def test_the_running_service_conforms_to_its_schema(serve_stack: Any) -> None:
    image_files_for_binary_fields()
    schema = schemathesis.openapi.from_url(f"{serve_stack.service.url}/openapi.json")
    checked = conforms(schema, timeout=120)
    assert {"POST /v1/predict", "GET /v1/model", "GET /readyz", "GET /healthz"} <= set(checked)


def test_the_service_without_a_model_conforms_to_its_schema(tmp_path: Any) -> None:
    from covid_tasks.serve.app import create_app
    from covid_tasks.serve.model_holder import ModelHolder
    from covid_tasks.serve.settings import ServeSettings

    s = ServeSettings(tracking_uri=f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", max_files=4)
    holder = ModelHolder(s)
    holder.refresh()  # the store does not exist: no model, every model endpoint answers 503
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(s, holder))
    # A 503 is this state's documented answer (status, body and Retry-After are still checked), and
    # without a model no valid request can succeed.
    checked = conforms(schema, excluded_checks=[not_a_server_error, positive_data_acceptance])
    assert "POST /v1/predict" in checked


def test_predict_declares_its_body_and_every_error(serve_stack: Any) -> None:
    import requests

    spec = requests.get(f"{serve_stack.service.url}/openapi.json", timeout=10).json()
    post = spec["paths"]["/v1/predict"]["post"]
    body = post["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["items"] == {"type": "string", "format": "binary"}
    assert body["schema"]["properties"]["file"]["maxItems"] == 4  # the stack's COVID_SERVE_MAX_FILES
    assert {"200", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
