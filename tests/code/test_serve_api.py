"""The inference service over HTTP: a real uvicorn process on loopback, a real ``mlflow server``.

The shared ``serve_stack`` registers versions 1 and 2 with the pipeline's own evaluate and
register, starts ``python -m covid_tasks.serve`` with no champion, then points ``champion`` at
version 1. The tests below that change the registry (the alias move, the registry stop) come
last in this file and leave the service serving version 2 with the registry back up.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.helpers.serve_stack import IMG_SIZE, MODEL, SAMPLES

pytestmark = pytest.mark.mlflow_server


def _post(stack: Any, paths: list[Path], params: str = "", timeout: float = 60) -> requests.Response:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return requests.post(f"{stack.service.url}/v1/predict{params}", files=files, timeout=timeout)


def _post_bytes(stack: Any, name: str, data: bytes) -> requests.Response:
    return requests.post(f"{stack.service.url}/v1/predict", files={"file": (name, data)}, timeout=60)


def _metric(text: str, metric: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --------------------------------------------------------------------------- before any champion
def test_before_any_champion_readyz_and_predict_answer_503_saying_why(serve_stack: Any) -> None:
    early = serve_stack.early
    for key in ("readyz", "predict", "model"):
        assert early[key].status_code == 503, (key, early[key].text)
    ready = early["readyz"].json()
    assert ready["ready"] is False and ready["model"] is None and ready["registry"]["reachable"] is True
    assert "no champion yet" in ready["reason"] and f"'{MODEL}'" in ready["reason"]
    assert "alias 'champion'" in ready["reason"] and serve_stack.registry.url in ready["reason"]
    assert early["predict"].json()["detail"] == ready["reason"]
    assert "no champion yet" in early["model"].json()["detail"]


def test_healthz_answers_and_readyz_names_the_version(serve_stack: Any) -> None:
    url = serve_stack.service.url
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{url}/readyz", timeout=5)
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True
    assert body["model"] == {"name": MODEL, "version": "1", "run_id": serve_stack.versions["1"].run_id}
    assert body["reason"] == f"serving version 1 (models:/{MODEL}@champion)"


# --------------------------------------------------------------------------- predict and model info
def test_predict_one_image_answers_with_the_champion_s_probability_and_identity(serve_stack: Any) -> None:
    image = SAMPLES[1]
    response = _post(serve_stack, [image])
    assert response.status_code == 200, response.text
    body = response.json()
    (item,) = body["predictions"]
    threshold = float(serve_stack.versions["1"].tags["threshold"])
    assert item["filename"] == image.name and item["model_name"] == MODEL and item["model_version"] == "1"
    assert item["run_id"] == serve_stack.versions["1"].run_id
    assert item["threshold"] == pytest.approx(threshold, abs=1e-6)
    # decoded with load_image as training does, and the same model: the same number
    assert item["prob_covid"] == pytest.approx(serve_stack.expected("1", image), abs=1e-5)
    assert item["class"] == ("covid" if item["prob_covid"] >= item["threshold"] else "non_covid")
    assert "heatmap_png" not in item
    assert body["model"]["version"] == "1" and body["model"]["calibrated"] is False
    assert body["model"]["img_size"] == IMG_SIZE and body["latency_ms"] > 0


def test_predict_several_images_keeps_their_order(serve_stack: Any) -> None:
    images = SAMPLES[2:6]
    body = _post(serve_stack, images).json()
    assert [p["filename"] for p in body["predictions"]] == [p.name for p in images]
    assert body["n_images"] == 4
    for image, item in zip(images, body["predictions"], strict=True):
        assert item["prob_covid"] == pytest.approx(serve_stack.expected("1", image), abs=1e-5)


def test_explain_adds_a_grad_cam_heat_map_png(serve_stack: Any) -> None:
    from PIL import Image

    body = _post(serve_stack, SAMPLES[:2], "?explain=true").json()
    for item in body["predictions"]:
        assert item["heatmap_class"] == item["class"]
        heat = Image.open(io.BytesIO(base64.b64decode(item["heatmap_png"])))
        assert heat.format == "PNG" and heat.mode == "RGBA" and heat.size == (IMG_SIZE, IMG_SIZE)
        alpha = np.asarray(heat)[..., 3]
        assert alpha.max() > 0 and alpha.min() < alpha.max()  # a map, not a flat sheet


def test_model_info_reports_version_alias_gate_data_and_dates(serve_stack: Any) -> None:
    from datetime import datetime

    response = requests.get(f"{serve_stack.service.url}/v1/model", timeout=10)
    info = response.json()
    tags = serve_stack.versions["1"].tags
    assert response.status_code == 200
    assert info["name"] == MODEL and info["version"] == "1" and info["alias"] == "champion"
    assert info["run_id"] == serve_stack.versions["1"].run_id and info["run_key"] == "serve_v1"
    assert info["dataset_version"] == "ds-serve_v1" and info["backbone"] == "efficientnet_lite0"
    assert info["gate"]["sensitivity"] == tags["sensitivity"] and info["gate"]["gate"] == "passed"
    assert info["gate"]["min_specificity"] == "0.0" and info["calibrated"] is False
    assert info["class_indices"] == {"non_covid": 0, "covid": 1} and info["img_size"] == IMG_SIZE
    for key in ("trained_at", "registered_at", "loaded_at"):
        assert datetime.fromisoformat(info[key]).tzinfo is not None, key


def test_model_card_is_linked_and_served_as_markdown_and_shows_new_validations(serve_stack: Any) -> None:
    url = serve_stack.service.url
    assert requests.get(f"{url}/v1/model", timeout=10).json()["model_card"] == "/v1/model/card"
    response = requests.get(f"{url}/v1/model/card", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.headers["x-model-version"] == "1"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    card = response.text
    assert card.startswith(f"# Model card: {MODEL} version 1") and "not for diagnosis" in card
    assert "dataset version ds-serve\\_v1" in card.lower() and "None logged yet" in card
    # validate --log re-renders the card; the service shows the new one within a poll interval.
    serve_stack.tag_validation("1", "st-mary.csv")
    deadline = time.monotonic() + 30
    while "st-mary.csv" not in card and time.monotonic() < deadline:
        time.sleep(0.3)
        card = requests.get(f"{url}/v1/model/card", timeout=10).text
    assert "st-mary.csv" in card and "0.625 [0.450, 0.800]" in card


def test_history_lists_every_registered_version_with_its_week_and_the_timeline(serve_stack: Any) -> None:
    import mlflow

    url = serve_stack.service.url
    body = requests.get(f"{url}/v1/history", timeout=10).json()
    assert body["model"] == MODEL and body["champion"] == "1" and body["served"] == "1"
    assert [v["version"] for v in body["versions"]][:2] == ["1", "2"]
    for number, row in zip(("1", "2"), body["versions"], strict=False):
        tags = serve_stack.versions[number].tags
        assert row["decision"] == tags["decision"] and row["data_check"] == tags["data_check"]
        assert row["roc_auc"] == pytest.approx(float(tags["roc_auc"]))
        assert row["sensitivity_ci95"] == pytest.approx(json_list(tags["sensitivity_ci95"]))
        assert row["training_images"] == 67 and row["dataset_version"] == f"ds-serve_v{number}"
        assert row["run_id"] == serve_stack.versions[number].run_id and row["archived"] is False
        assert row["registered_at"].startswith("20") and row["logical_date"] is None
    assert body["versions"][0]["champion_now"] and "champion" in body["versions"][0]["aliases"]
    assert not body["versions"][1]["champion_now"]
    png = requests.get(f"{url}{body['timeline']}", timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    local = mlflow.artifacts.download_artifacts(run_id=serve_stack.versions["1"].run_id,
                                                artifact_path="history/timeline.png",
                                                tracking_uri=serve_stack.registry.url)
    assert png.content == Path(local).read_bytes()


def json_list(text: str) -> list[float]:
    return [float(x) for x in text.strip("[]").split(",")]


def test_metrics_count_requests_errors_latency_and_the_version(serve_stack: Any) -> None:
    url = serve_stack.service.url
    before = requests.get(f"{url}/metrics", timeout=10).text
    _post(serve_stack, [SAMPLES[0]])
    _post_bytes(serve_stack, "notes.txt", b"not an image")
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert _metric(text, "covid_serve_model_version") == 1.0
    assert _metric(text, "covid_serve_model_info", name=MODEL, version="1") == 1.0
    assert _metric(text, "covid_serve_ready") == 1.0 and _metric(text, "covid_serve_registry_up") == 1.0
    for name, labels, grew_by in (
            ("covid_serve_requests_total", {"endpoint": "/v1/predict", "status": "200"}, 1),
            ("covid_serve_requests_total", {"endpoint": "/v1/predict", "status": "415"}, 1),
            ("covid_serve_errors_total", {"endpoint": "/v1/predict", "status": "415"}, 1),
            ("covid_serve_request_duration_seconds_count", {"endpoint": "/v1/predict"}, 2)):
        assert _metric(text, name, **labels) - _metric(before, name, **labels) == grew_by, (name, labels)
    assert _metric(text, "covid_serve_images_total", version="1") >= 1


# --------------------------------------------------------------------------- bad input
def _bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _tiff() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_UPLOADS = {
    "text file": ("notes.txt", lambda: b"patient notes, not an image\n" * 10, 415, "is not an image"),
    "truncated jpeg": ("cut.jpg", lambda: SAMPLES[0].read_bytes()[:4000], 422, "cannot be decoded"),
    "decompression bomb": ("bomb.png", lambda: _bomb_png(30000, 30000), 413,
                           "bomb (Image size (900000000 pixels)"),
    "over the pixel limit": ("wide.png", lambda: _bomb_png(5000, 5000), 413,
                             "25.0 Mpx; the limit is 20 Mpx per image"),
    "tiff": ("scan.tif", _tiff, 415, "is a TIFF image; send JPEG, PNG, DICOM, BMP or GIF"),
    "file over 1 MiB": ("big.jpg", lambda: SAMPLES[0].read_bytes() + b"\0" * 1_100_000, 413,
                        "1 MiB per file"),
    "empty file": ("empty.jpg", lambda: b"", 400, "is empty"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS), ids=list(BAD_UPLOADS))
def test_bad_upload_gets_a_4xx_with_a_clear_message(serve_stack: Any, case: str) -> None:
    name, make, status, words = BAD_UPLOADS[case]
    response = _post_bytes(serve_stack, name, make())
    assert response.status_code == status, response.text
    assert f"'{name}'" in response.json()["detail"] and words in response.json()["detail"]


def test_one_bad_file_refuses_the_whole_request(serve_stack: Any) -> None:
    files = [("file", ("good.jpg", SAMPLES[0].read_bytes())), ("file", ("bad.txt", b"text"))]
    response = requests.post(f"{serve_stack.service.url}/v1/predict", files=files, timeout=30)
    assert response.status_code == 415 and "'bad.txt'" in response.json()["detail"]


def test_too_many_files_413(serve_stack: Any) -> None:
    response = _post(serve_stack, SAMPLES[:5])
    assert response.status_code == 413
    assert response.json()["detail"] == "too many files: at most 4 images per request"
    assert _post(serve_stack, SAMPLES[:4]).status_code == 200


def test_request_over_the_body_limit_413_with_or_without_content_length(serve_stack: Any) -> None:
    url = f"{serve_stack.service.url}/v1/predict"
    files = [("file", (f"part{i}.jpg", b"\xff\xd8" + b"\0" * 900_000)) for i in range(4)]  # 3.4 MiB
    response = requests.post(url, files=files, timeout=30)
    assert response.status_code == 413 and "limit of 3 MiB per request" in response.json()["detail"]
    body, content_type = requests.models.RequestEncodingMixin._encode_files(files, {})

    def chunks() -> Any:  # no Content-Length: the limit is enforced while the body streams
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    response = requests.post(url, data=chunks(), headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 413 and "limit of 3 MiB" in response.json()["detail"]


def test_requests_without_an_image_400_or_415(serve_stack: Any) -> None:
    url = f"{serve_stack.service.url}/v1/predict"
    form_only = requests.post(url, files={"comment": (None, "no file here")}, timeout=10)
    assert form_only.status_code == 400 and "no image in the request" in form_only.json()["detail"]
    as_json = requests.post(url, json={"image": "abc"}, timeout=10)
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]


def test_service_survives_bad_input_and_still_predicts(serve_stack: Any) -> None:
    for name, make, _, _ in BAD_UPLOADS.values():
        _post_bytes(serve_stack, name, make())
    assert serve_stack.service.proc.poll() is None
    response = _post(serve_stack, [SAMPLES[0]])
    assert response.status_code == 200 and response.json()["predictions"][0]["model_version"] == "1"


# --------------------------------------------------------------------------- the registry changes
def test_alias_moves_from_v1_to_v2_while_a_client_keeps_sending(serve_stack: Any) -> None:
    image = SAMPLES[3]
    want = {v: serve_stack.expected(v, image) for v in ("1", "2")}
    assert abs(want["1"] - want["2"]) > 1e-3  # the two versions are told apart by their answer
    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(f"{serve_stack.service.url}/v1/predict",
                                 files={"file": (image.name, image.read_bytes())}, timeout=60)
                answers.append((r.status_code, r.json()))
            except requests.RequestException as exc:  # a failed request fails the test below
                answers.append((0, str(exc)))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(1 for s, _ in answers if s == 200) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        serve_stack.set_champion("2")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            recent = [a for s, a in answers[-5:] if s == 200]
            if len(recent) == 5 and all(a["predictions"][0]["model_version"] == "2" for a in recent):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
    failures = [(s, a) for s, a in answers if s != 200]
    assert not failures, failures[:3]
    seen = [a["predictions"][0]["model_version"] for _, a in answers]
    assert set(seen) == {"1", "2"}, seen
    assert seen == sorted(seen), "an answer from version 1 came after one from version 2"
    for _, a in answers:  # each answer is wholly one version's: identity and number agree
        item = a["predictions"][0]
        assert a["model"]["version"] == item["model_version"]
        assert item["prob_covid"] == pytest.approx(want[item["model_version"]], abs=1e-5)
        assert item["run_id"] == serve_stack.versions[item["model_version"]].run_id


def test_a_version_that_cannot_be_served_is_skipped_and_the_served_one_kept(serve_stack: Any) -> None:
    client, service = serve_stack.client, serve_stack.service
    v1 = serve_stack.versions["1"]
    # A version whose files are not a model of this pipeline (the evaluation folder of run 1).
    broken = client.create_model_version(MODEL, f"runs:/{v1.run_id}/evaluation", run_id=v1.run_id)
    serve_stack.set_champion(broken.version)
    body = service.wait_for(lambda b: broken.version in b["failed_versions"], what="broken version skipped")
    assert body["ready"] is True and body["model"]["version"] == "2"
    assert "operating_point.json" in body["failed_versions"][broken.version]
    assert f"points to version {broken.version}, which cannot be served" in body["reason"]
    response = _post(serve_stack, [SAMPLES[0]])
    assert response.status_code == 200 and response.json()["predictions"][0]["model_version"] == "2"
    serve_stack.set_champion("2")
    service.wait_for(lambda b: b["reason"].startswith("serving version 2 ("), what="alias back on version 2")


def test_registry_stopped_while_serving_keeps_serving_and_says_so(serve_stack: Any) -> None:
    service, registry = serve_stack.service, serve_stack.registry
    served = requests.get(f"{service.url}/readyz", timeout=5).json()["model"]["version"]
    registry.stop()
    try:
        body = service.wait_for(lambda b: b["registry"]["reachable"] is False, timeout=60,
                                what="registry reported unreachable")
        ready = requests.get(f"{service.url}/readyz", timeout=5)
        assert ready.status_code == 200 and body["ready"] is True and body["model"]["version"] == served
        assert "unreachable" in body["reason"] and f"http://127.0.0.1:{registry.port}" in body["reason"]
        assert body["registry"]["error"]
        response = _post(serve_stack, [SAMPLES[0]])
        assert response.status_code == 200 and response.json()["predictions"][0]["model_version"] == served
        metrics = requests.get(f"{service.url}/metrics", timeout=10).text
        history = requests.get(f"{service.url}/v1/history", timeout=60)
        assert history.status_code == 503 and "unreachable" in history.json()["detail"]
        card = requests.get(f"{service.url}/v1/model/card", timeout=60)  # the card as loaded
        assert card.status_code == 200 and card.text.startswith(f"# Model card: {MODEL} version {served}")
        assert _metric(metrics, "covid_serve_registry_up") == 0.0
        assert _metric(metrics, "covid_serve_ready") == 1.0
    finally:
        registry.start()  # same port and store: the next tests find it as it was
    service.wait_for(lambda b: b["registry"]["reachable"] is True, timeout=180, what="registry back")


def test_service_log_names_each_swap(serve_stack: Any) -> None:
    log = serve_stack.service.tail(200_000)
    assert "now serving covid-xray-classifier-serve-test version 1 (was none" in log
    assert "now serving covid-xray-classifier-serve-test version 2 (was 1" in log
