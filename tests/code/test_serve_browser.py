"""The web page in a real browser: Debian's Chromium, driven by Selenium through ``chromedriver``.

The page at ``/`` is opened, a sample X-ray is chosen in its file input, and the class, the
version and the heat map shown on the page are read back and compared with the API's answer for
the same file. Skips, saying why, where Chromium, chromedriver or Selenium is missing
(``.ci/run`` installs ``chromium`` and ``chromium-driver`` before the tests).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.helpers.serve_stack import MODEL, SAMPLES

pytestmark = pytest.mark.mlflow_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (requirements-dev.txt)")
    driver = _chrome(webdriver, javascript=True)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_classifies_an_uploaded_x_ray_and_shows_version_and_heat_map(
        browser: Any, serve_stack: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = SAMPLES[5]
    browser.get(serve_stack.service.url + "/")
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and "Research tool, not for diagnosis" in notice.text
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-details").is_displayed())
    browser.find_element(By.ID, "file-input").send_keys(str(image))
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                      or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text

    shown = {key: browser.find_element(By.ID, f"result-{key}").text for key in ("class", "version", "file")}
    api = requests.post(f"{serve_stack.service.url}/v1/predict",
                        files={"file": (image.name, image.read_bytes())}, timeout=60).json()["predictions"][0]
    assert shown == {"class": api["class"], "version": api["model_version"], "file": image.name}
    assert browser.find_element(By.ID, "model-version").text == api["model_version"]
    assert f"{100 * api['prob_covid']:.1f}%" in browser.find_element(By.ID, "result-prob").text

    heat = browser.find_element(By.ID, "heatmap")
    assert heat.is_displayed() and heat.get_attribute("src").startswith("data:image/png;base64,")
    loaded = browser.execute_script("return [arguments[0].complete, arguments[0].naturalWidth]", heat)
    assert loaded[0] and loaded[1] == api_img_size(serve_stack)
    xray, heat_box = browser.find_element(By.ID, "xray").rect, heat.rect  # the map lies over the image
    assert abs(xray["x"] - heat_box["x"]) < 1 and abs(xray["width"] - heat_box["width"]) < 1
    assert abs(xray["height"] - heat_box["height"]) < 1 and xray["height"] > 100
    browser.save_screenshot(str(tmp_path / "page.png"))


def api_img_size(stack: Any) -> int:
    return requests.get(f"{stack.service.url}/v1/model", timeout=10).json()["img_size"]


def test_page_shows_the_service_s_message_for_a_bad_file(browser: Any, serve_stack: Any,
                                                         tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(serve_stack.service.url + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    text = browser.find_element(By.ID, "error").text
    assert "(415)" in text and "'notes.png' is not an image" in text
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_page_shows_the_champion_s_model_card_as_text_and_the_history(browser: Any,
                                                                     serve_stack: Any) -> None:
    """The card's Markdown becomes headings and tables, never HTML: a hostile file name stays text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = serve_stack.service.url
    champion = requests.get(f"{url}/readyz", timeout=5).json()["model"]["version"]
    hostile = '<img src=x id=injected onerror="document.title=1">|x.csv'
    serve_stack.tag_validation(champion, hostile, run_id="hostile-run")
    WebDriverWait(browser, 30, poll_frequency=0.5).until(
        lambda d: "hostile-run" in requests.get(f"{url}/v1/model/card", timeout=10).text)
    browser.get(url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "card-details").is_displayed()
                                     and d.find_element(By.ID, "history-details").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#card-details summary").click()
    card = browser.find_element(By.ID, "model-card")
    heading = card.find_element(By.CSS_SELECTOR, "h3").text
    assert heading == f"Model card: {MODEL} version {champion}"
    assert "Research tool, not for diagnosis." in card.find_element(By.TAG_NAME, "blockquote").text
    assert hostile in card.text  # shown as text, in one table cell
    assert browser.find_elements(By.ID, "injected") == []
    assert card.find_elements(By.CSS_SELECTOR, "img, script, a, iframe") == []
    assert len(card.find_elements(By.TAG_NAME, "table")) >= 5

    history = requests.get(f"{url}/v1/history", timeout=10).json()
    rows = browser.find_elements(By.CSS_SELECTOR, "#history-table tbody tr")
    assert [r.get_attribute("data-version") for r in rows] == [v["version"] for v in history["versions"]]
    top = browser.find_element(By.CSS_SELECTOR, "#history-table tr.champion")
    assert top.get_attribute("data-version") == champion
    cells = top.find_elements(By.TAG_NAME, "td")
    row = next(v for v in history["versions"] if v["version"] == champion)
    assert cells[5].text.startswith(f"{row['roc_auc']:.3f} [") and "champion" in cells[10].text
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "history-timeline").is_displayed())
    timeline = browser.find_element(By.ID, "history-timeline")
    assert browser.execute_script("return arguments[0].naturalWidth", timeline) > 100


def _chrome(webdriver: Any, javascript: bool) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser_without_javascript() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (requirements-dev.txt)")
    driver = _chrome(webdriver, javascript=False)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_without_javascript_says_so_and_classifies_with_a_plain_form(
        browser_without_javascript: Any, serve_stack: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_without_javascript
    driver.get(serve_stack.service.url + "/")
    assert not driver.find_element(By.ID, "model-status").is_displayed()  # no endless "Looking up"
    assert "Looking up the model" not in driver.find_element(By.TAG_NAME, "body").text
    assert "JavaScript is off" in driver.find_element(By.ID, "no-js-model").text
    assert not driver.find_element(By.ID, "upload").is_displayed()  # the drop zone needs JavaScript
    form = driver.find_element(By.CSS_SELECTOR, "#plain-form form")
    assert form.is_displayed()
    image = SAMPLES[4]
    form.find_element(By.NAME, "file").send_keys(str(image))
    form.submit()
    WebDriverWait(driver, 120).until(lambda d: '"predictions"' in d.find_element(By.TAG_NAME, "body").text)
    answer = driver.find_element(By.TAG_NAME, "body").text
    assert f'"filename":"{image.name}"' in answer.replace(" ", "") and '"model_version"' in answer


def test_page_shows_what_the_model_was_trained_on_and_marks_a_demo(browser: Any, serve_stack: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = requests.get(f"{serve_stack.service.url}/readyz", timeout=5).json()["model"]["version"]
    shown = {}
    try:
        for version in ("2", "1"):  # version 2 was trained on sample_data's file names: a demo
            serve_stack.set_champion(version)
            serve_stack.service.wait_for(lambda b, v=version: (b["model"] or {}).get("version") == v,
                                         what=f"version {version} served")
            browser.get(serve_stack.service.url + "/")
            WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-details").is_displayed())
            demo = browser.find_element(By.ID, "model-demo")
            training = browser.find_element(By.ID, "model-training").text
            shown[version] = (demo.is_displayed(), demo.text, training)
    finally:
        serve_stack.set_champion(before)
        serve_stack.service.wait_for(lambda b: (b["model"] or {}).get("version") == before,
                                     what="champion back")
    assert shown["2"][0]
    assert shown["2"][1].startswith("Demo model: trained on a copy of the repository's sample_data/")
    assert not shown["1"][0]
    for version in ("1", "2"):
        assert shown[version][2].startswith(
            "67 images (train 8: 4 covid, val 24: 12 covid, test 35: 15 covid)")
        assert f"dataset ds-serve_v{version}" in shown[version][2]
