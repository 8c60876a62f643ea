"""The inference service takes DICOM: ``POST /v1/predict`` and the page, on a real registry.

Uses the shared ``serve_stack`` (tests/helpers/serve_stack.py: a real ``mlflow server``, an
EfficientNet-Lite0 version registered by the pipeline's own evaluate and register, a real uvicorn
process). A film sent as DICOM scores as the PNG of the same film within 0.01 (MONOCHROME1 and
16-bit included); bad DICOM files answer 4xx with their reason; ``explain=true`` returns the
windowed film, which the page shows under the heat map.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from covid_tasks.images import FORMATS
from tests.helpers.dicom_data import ROTATION, SAMPLE, grey_of, phi_for, phi_in_text
from tests.helpers.dicom_files import bomb_dicom, film_dicom
from tests.helpers.serve_stack import IMG_SIZE, SAMPLES

pytestmark = pytest.mark.mlflow_server
logger = logging.getLogger(__name__)
TOLERANCE = 0.01
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage: no image


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    return grey_of(sorted((SAMPLE / "images").glob("*.jpg"))[1])


def _png(grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()


def _post(stack: Any, parts: list[tuple[str, bytes, str]], params: str = "") -> requests.Response:
    files = [("file", part) for part in parts]
    return requests.post(f"{stack.service.url}/v1/predict{params}", files=files, timeout=120)


def test_a_dicom_film_scores_as_the_png_of_the_same_film(serve_stack: Any, film: np.ndarray) -> None:
    dicoms = [(f"film-{i}.dcm", film_dicom(film, patient=phi_for(f"s{i}"), **style), "application/dicom")
              for i, style in enumerate(ROTATION)]
    dicoms[1] = ("film-1", dicoms[1][1], "application/octet-stream")  # no name or type: DICOM by content
    answers = []
    for batch in (dicoms[:3], dicoms[3:]):  # the service under test takes 4 files per request
        response = _post(serve_stack, [("film.png", _png(film), "image/png"), *batch])
        assert response.status_code == 200, response.text
        assert not phi_in_text(response.text)
        answers.append(response.json()["predictions"])
    gaps = []
    for predictions in answers:
        png, *rest = predictions
        assert {p["model_version"] for p in predictions} == {png["model_version"]}  # one version answered
        for item in rest:
            gaps.append(abs(item["prob_covid"] - png["prob_covid"]))
            assert gaps[-1] <= TOLERANCE, (item["filename"], item, png)
            assert item["class"] == png["class"]
    inverse = _post(serve_stack, [("inverse.png", _png(255 - film), "image/png")]).json()["predictions"][0]
    seen = abs(inverse["prob_covid"] - answers[0][0]["prob_covid"])
    assert seen > 0.1, f"the model barely sees an inversion ({seen:.3f}): no power"
    logger.info("service: max |dP| DICOM vs PNG %.5f over %d styles; film vs inverse %.3f", max(gaps),
                len(gaps), seen)


@pytest.mark.parametrize("name, make, content_type, status, words", [
    ("cut.dcm", lambda g: film_dicom(g, bits_stored=16)[:-4000], "application/dicom", 422, "truncated: "),
    ("report.dcm", lambda g: film_dicom(g, extra={"SOPClassUID": SR_SOP}), "application/dicom", 415,
     "not_image: SOP class Basic Text SR Storage holds no image"),
    ("cine.dcm", lambda g: film_dicom(g, extra={"NumberOfFrames": "3"}), "application/dicom", 415,
     "unsupported: 3 frames"),
    ("bomb.dcm", lambda g: bomb_dicom(), "application/dicom", 413,
     "65000 x 65000 = 4225.0 Mpx; the limit is 20 Mpx per image"),
    ("notes.dcm", lambda g: b"not a DICOM file at all, " * 20, "application/dicom", 415,
     "is declared DICOM but is not a DICOM Part 10 file"),
    ("raw", lambda g: b"\0" * 128 + b"DICM" + b"\xff" * 40, "application/octet-stream", 422,
     "DICOM file the model"),
], ids=["truncated", "not-image", "multi-frame", "bomb", "declared-not-dicom", "broken-meta"])
def test_bad_dicom_files_answer_4xx_with_the_reason(serve_stack: Any, film: np.ndarray, name: str, make: Any,
                                                    content_type: str, status: int, words: str) -> None:
    response = _post(serve_stack, [(name, make(film), content_type)])
    assert response.status_code == status, response.text
    assert f"'{name}'" in response.json()["detail"] and words in response.json()["detail"], response.text
    alive = _post(serve_stack, [("film.dcm", film_dicom(film), "application/dicom")])
    assert alive.status_code == 200, alive.text  # the service keeps serving


def test_a_jpeg_declared_dicom_is_read_by_its_content(serve_stack: Any) -> None:
    response = _post(serve_stack, [("scan.dcm", SAMPLES[0].read_bytes(), "application/dicom")])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["prob_covid"] == pytest.approx(
        _post(serve_stack, [("scan.jpg", SAMPLES[0].read_bytes(), "image/jpeg")]).json()["predictions"][0][
            "prob_covid"], abs=1e-6)


def test_explain_returns_the_windowed_film_for_dicom_only(serve_stack: Any, film: np.ndarray,
                                                         tmp_path: Path) -> None:
    from covid_tasks.images import load_image

    data = film_dicom(film, photometric="MONOCHROME1", bits_stored=12, voi="lut")
    parts = [("film.dcm", data, "application/dicom"), ("film.png", _png(film), "image/png")]
    body = _post(serve_stack, parts, "?explain=true").json()
    dicom_item, png_item = body["predictions"]
    assert "image_png" not in png_item  # the browser draws a PNG itself
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(dicom_item["image_png"]))))
    (tmp_path / "film.dcm").write_bytes(data)
    assert shown.shape == (IMG_SIZE, IMG_SIZE, 3)
    np.testing.assert_array_equal(shown, load_image(tmp_path / "film.dcm", IMG_SIZE).astype(np.uint8))
    assert shown.mean() == pytest.approx(_png_mean(film), abs=1.0)  # bone bright: not inverted
    heat = Image.open(io.BytesIO(base64.b64decode(dicom_item["heatmap_png"])))
    assert heat.size == (IMG_SIZE, IMG_SIZE)


def _png_mean(grey: np.ndarray) -> float:
    """Mean of the PNG of ``grey`` as the model takes it."""
    from covid_tasks.images import load_image_bytes

    return float(load_image_bytes(_png(grey), IMG_SIZE).mean())


def test_the_page_offers_every_format_of_the_one_list(serve_stack: Any) -> None:
    page = requests.get(serve_stack.service.url + "/", timeout=10)
    assert page.status_code == 200 and "{{" not in page.text
    accept = page.text.split('accept="', 1)[1].split('"', 1)[0].split(",")
    assert sorted(accept) == sorted(item for media, exts in FORMATS.values() for item in (media, *exts))
    assert ".dcm" in accept and "application/dicom" in accept
    assert "(JPEG, PNG, DICOM, BMP or GIF)" in page.text


def test_the_page_shows_a_dicom_film_windowed_under_its_heat_map(serve_stack: Any, film: np.ndarray,
                                                                 tmp_path: Path) -> None:
    from tests.code.test_serve_browser import CHROMEDRIVER, CHROMIUM

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "film.dcm"
    path.write_bytes(film_dicom(film, photometric="MONOCHROME1", bits_stored=16))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(serve_stack.service.url + "/")
        driver.find_element(By.ID, "file-input").send_keys(str(path))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                         or d.find_element(By.ID, "error").is_displayed())
        error = driver.find_element(By.ID, "error")
        assert not error.is_displayed(), error.text
        xray = driver.find_element(By.ID, "xray")
        assert xray.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", xray) == IMG_SIZE  # drawn
        assert driver.find_element(By.ID, "heatmap").is_displayed()
        assert driver.find_element(By.ID, "result-file").text == "film.dcm"
    finally:
        driver.quit()
