"""The service's answers to costly uploads, its headers, its page and what it says about the model.

Most tests use the shared ``serve_stack`` (a real uvicorn and ``mlflow server``; limits of
``tests/helpers/serve_stack.py``: 20 Mpx per image, 30 Mpx per request). The in-process tests
at the end build the app with ``create_app`` and need no model.
"""

from __future__ import annotations

import io
import re
from typing import Any, Iterator

import pytest
import requests

from tests.helpers.serve_stack import MODEL, SAMPLES

pytestmark = pytest.mark.mlflow_server


def _png(width: int, height: int) -> bytes:
    """A real, fully decodable greyscale PNG: a few KB on disk, ``width * height`` pixels decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def _predict(stack: Any, files: list[tuple[str, bytes]], **kwargs: Any) -> requests.Response:
    parts = [("file", (name, data)) for name, data in files]
    return requests.post(f"{stack.service.url}/v1/predict", files=parts, timeout=120, **kwargs)


# --------------------------------------------------------------------------- pixels (issue 19, item 4)
def test_a_small_png_of_49_megapixels_is_refused_with_413_before_decoding(serve_stack: Any) -> None:
    bomb = _png(7000, 7000)
    assert len(bomb) < 200_000  # tiny on the wire: the byte limits alone let it through
    response = _predict(serve_stack, [("big.png", bomb)])
    assert response.status_code == 413, response.text
    assert response.json()["detail"].startswith("'big.png' is 7000 x 7000 = 49.0 Mpx; the limit is 20 Mpx")


def test_the_request_pixel_budget_counts_every_file_of_a_request(serve_stack: Any) -> None:
    film = _png(4000, 4000)  # 16 Mpx: under the 20 Mpx per image, two are over the 30 Mpx budget
    response = _predict(serve_stack, [("a.png", film), ("b.png", film)])
    assert response.status_code == 413, response.text
    assert "the 2 images of this request have 32.0 Mpx in all; the limit is 30 Mpx per request" in \
        response.json()["detail"]
    alone = _predict(serve_stack, [("a.png", film)])  # each one alone is served
    assert alone.status_code == 200, alone.text
    assert alone.json()["predictions"][0]["filename"] == "a.png"


# --------------------------------------------------------------------------- media type (item 7)
@pytest.mark.parametrize("media_type", ["Multipart/Form-Data", "MULTIPART/FORM-DATA"])
def test_the_multipart_media_type_is_case_insensitive(serve_stack: Any, media_type: str) -> None:
    files = [("file", (SAMPLES[0].name, SAMPLES[0].read_bytes()))]
    body, content_type = requests.models.RequestEncodingMixin._encode_files(files, {})
    header = content_type.replace("multipart/form-data", media_type)
    response = requests.post(f"{serve_stack.service.url}/v1/predict", data=body,
                             headers={"Content-Type": header}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["filename"] == SAMPLES[0].name


# --------------------------------------------------------------------------- headers (item 8)
def _security_headers_of(response: requests.Response) -> None:
    csp = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, (response.url, csp)
    assert "script-src 'self';" in csp and "http" not in csp  # nothing from elsewhere
    assert response.headers.get("X-Content-Type-Options") == "nosniff", response.url
    assert response.headers.get("X-Frame-Options") == "DENY", response.url


def test_every_answer_carries_the_security_headers(serve_stack: Any) -> None:
    url = serve_stack.service.url
    for path in ("/", "/static/app.js", "/static/style.css", "/healthz", "/readyz", "/v1/model", "/metrics",
                 "/openapi.json", "/no-such-page"):
        _security_headers_of(requests.get(url + path, timeout=10))
    _security_headers_of(_predict(serve_stack, [("notes.txt", b"not an image")]))  # a 415
    too_big = [("file", (f"p{i}.jpg", b"\xff\xd8" + b"\0" * 900_000)) for i in range(4)]
    body_limit = requests.post(f"{url}/v1/predict", files=too_big, timeout=30)  # the body-size middleware
    assert body_limit.status_code == 413
    _security_headers_of(body_limit)


def test_head_of_the_page_and_no_swagger_ui_from_a_cdn_by_default(serve_stack: Any) -> None:
    url = serve_stack.service.url
    head = requests.head(f"{url}/", timeout=10)
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html")
    assert requests.get(f"{url}/docs", timeout=10).status_code == 404
    assert requests.get(f"{url}/openapi.json", timeout=10).status_code == 200
    page = requests.get(f"{url}/", timeout=10).text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page loads something from elsewhere"


def test_not_ready_answers_say_when_to_ask_again(serve_stack: Any) -> None:
    early = serve_stack.early  # before any champion (see tests/helpers/serve_stack.py)
    for key in ("readyz", "predict", "model"):
        assert early[key].status_code == 503
        assert int(early[key].headers["Retry-After"]) >= 1, key


# --------------------------------------------------------------------------- the page (item 9)
def test_the_page_lists_the_accepted_formats_and_works_without_javascript(serve_stack: Any) -> None:
    page = requests.get(f"{serve_stack.service.url}/", timeout=10).text
    assert "choose a file (JPEG, PNG, DICOM, BMP or GIF)" in page and "(JPEG or PNG)" not in page
    form = "".join(re.findall(r"<noscript>(.*?)</noscript>", page, flags=re.S))
    assert 'action="/v1/predict"' in form and 'method="post"' in form
    assert 'enctype="multipart/form-data"' in form and 'name="file"' in form
    assert re.search(r'<p id="model-status" hidden>', page), "the lookup message needs JavaScript"

    from covid_tasks.serve.inputs import ACCEPTED_FORMATS, accept_attribute, accepted_names

    assert accepted_names() == "JPEG, PNG, DICOM, BMP or GIF"
    for fmt in ACCEPTED_FORMATS:
        assert all(m in accept_attribute() for m in fmt.media_types + fmt.extensions)
    assert page.count(f'accept="{accept_attribute()}"') == 2  # the drop zone and the plain form


# --------------------------------------------------------------------------- training data (item 15)
@pytest.fixture
def champion_restored(serve_stack: Any) -> Iterator[Any]:
    before = requests.get(f"{serve_stack.service.url}/readyz", timeout=5).json()["model"]["version"]
    yield serve_stack
    serve_stack.set_champion(before)
    serve_stack.service.wait_for(lambda b: (b["model"] or {}).get("version") == before, what="champion back")


def _serve(stack: Any, version: str) -> dict[str, Any]:
    stack.set_champion(version)
    stack.service.wait_for(lambda b: (b["model"] or {}).get("version") == version, what=f"version {version}")
    return requests.get(f"{stack.service.url}/v1/model", timeout=10).json()


def test_model_info_says_what_the_champion_was_trained_on_and_marks_a_demo(champion_restored: Any) -> None:
    from tests.helpers.tiny_run import SPLIT_SIZES

    stack = champion_restored
    real = _serve(stack, "1")["training_data"]
    assert real["demo"] is False and real["demo_reason"] is None
    assert real["dataset_version"] == "ds-serve_v1" and real["images"] == 67
    for split, (n_covid, n_non) in SPLIT_SIZES.items():
        assert real["splits"][split] == {"images": n_covid + n_non, "covid": n_covid, "non_covid": n_non,
                                         "patients": n_covid + n_non}
    demo = _serve(stack, "2")["training_data"]  # its images carry sample_data's file names
    assert demo["demo"] is True and demo["images"] == 67
    assert demo["demo_reason"].startswith("trained on a copy of the repository's sample_data/ (67 images)")
    answer = _predict(stack, [(SAMPLES[0].name, SAMPLES[0].read_bytes())]).json()
    assert answer["model"]["version"] == "2" and answer["model"]["demo"] is True


# --------------------------------------------------------------------------- in process, no model
def _app(**settings: Any) -> Any:
    from fastapi.testclient import TestClient

    from covid_tasks.serve.app import create_app
    from covid_tasks.serve.model_holder import ModelHolder
    from covid_tasks.serve.settings import ServeSettings

    s = ServeSettings(tracking_uri="sqlite:////nonexistent/mlflow.db", model_name=MODEL, **settings)
    return TestClient(create_app(s, ModelHolder(s)))


def test_swagger_ui_when_turned_on_gets_its_own_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _app(docs=True)
    docs = client.get("/docs")
    csp = docs.headers["Content-Security-Policy"]
    assert docs.status_code == 200 and "https://cdn.jsdelivr.net" in csp and "'sha256-" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "cdn.jsdelivr.net" not in client.get("/").headers["Content-Security-Policy"]


def test_the_accepted_formats_come_from_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from covid_tasks.serve import inputs

    tiff = inputs.ImageFormat("TIFF", ("TIFF",), ("image/tiff",), (".tif",))
    monkeypatch.setattr(inputs, "ACCEPTED_FORMATS", (*inputs.ACCEPTED_FORMATS, tiff))
    client = _app()
    page = client.get("/").text
    assert "choose a file (JPEG, PNG, DICOM, BMP, GIF or TIFF)" in page and "image/tiff" in page
    assert page.count(".tif") == 2
    spec = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    assert "TIFF" in spec["responses"]["415"]["description"]
    assert "image/tiff" in spec["requestBody"]["content"]["multipart/form-data"]["encoding"]["file"][
        "contentType"]
    with pytest.raises(inputs.BadInputError, match="as JPEG, PNG, DICOM, BMP, GIF or TIFF"):
        inputs.check_upload(inputs.Upload("notes.txt", b"text"), 10**6, 10**6)
