"""Screenshot of the inference page after classifying one X-ray (the README's picture).

Opens the page of a running service (``--url``) in headless Chromium (Debian's ``chromium`` and
``chromium-driver``), uploads ``--image`` and saves a PNG of the page. Without ``--url`` it
registers EfficientNet-Lite0 at 224 px in a temporary store (as ``benchmarks/serve_bench.py``
does) and starts a service for the picture.

    python scripts/serve_screenshot.py --out docs/serve-page.png
    python scripts/serve_screenshot.py --url http://127.0.0.1:8000 --image sample_data/images/00cfd1c1.jpg
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shoot(url: str, image: Path, out: Path, width: int = 1100, height: int = 900) -> None:
    """Upload ``image`` on the page at ``url`` and save the page as ``out`` (PNG)."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                "--hide-scrollbars"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "model-details").is_displayed())
        driver.find_element(By.ID, "file-input").send_keys(str(image.resolve()))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "result").is_displayed())
        full = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(int(full) + 200, 2400))
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    _shrink(out)


def _shrink(path: Path, width: int = 820, colours: int = 128) -> None:
    """Scale the screenshot down and store it with a palette, to keep the committed PNG small."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service (default: start one on a fresh Lite0 model)")
    parser.add_argument("--image", type=Path, default=REPO / "sample_data" / "images" / "00cfd1c1.jpg")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve-page.png")
    args = parser.parse_args(argv)
    if args.url:
        shoot(args.url, args.image, args.out)
        return 0
    from benchmarks.serve_bench import _register_bench_model
    from tests.helpers.serve_stack import ServeProcess

    with tempfile.TemporaryDirectory(prefix="serve-shot-") as tmp:
        uri = _register_bench_model(Path(tmp), 224, "covid-xray-classifier")
        service = ServeProcess(Path(tmp), {"COVID_MLFLOW_TRACKING_URI": uri}).start()
        try:
            service.wait_alive()
            service.wait_for(lambda b: b["ready"], timeout=300, what="service ready")
            shoot(service.url, args.image, args.out)
        finally:
            service.stop()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
