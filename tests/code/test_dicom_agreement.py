"""``python -m covid_tasks predict FILM.dcm`` scores a DICOM film as it scores the PNG of the same film.

The model is a real EfficientNet-Lite0 (bundled ImageNet weights, lung gate, 64 px) with a fixed
random head, saved as a ``.keras`` file with its operating point beside it. Three sample films are
written as PNG and as DICOM in every style of :data:`tests.helpers.dicom_data.ROTATION`
(MONOCHROME1 and MONOCHROME2; 8, 12 and 16 bits, signed too; window, VOI LUT, rescale or none;
uncompressed, RLE, JPEG-LS, JPEG 2000). P(covid) must agree within 0.01; and the model must tell
a film from its inverse (a decoder that forgot MONOCHROME1 would fail), or the test proves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.dicom_data import ROTATION, SAMPLE, grey_of
from tests.helpers.dicom_files import film_dicom

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)
TOLERANCE = 0.01
#: P(covid) of a film and of its inverse must differ by this much somewhere (the test's power).
INVERSION_SEEN = 0.1


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model
    from tests.helpers.serve_stack import make_models

    folder = tmp_path_factory.mktemp("lite0")
    path = folder / "model.keras"
    save_model(make_models()["1"], path)
    write_json(folder / "operating_point.json", {"threshold": 0.5})
    return path


def test_predict_cli_agrees_on_dicom_and_png_of_the_same_film(model_file: Path, tmp_path: Path) -> None:
    films = {p.stem: grey_of(p) for p in sorted((SAMPLE / "images").glob("*.jpg"))[:3]}
    files: dict[str, tuple[str, str]] = {}  # DICOM or inverse file -> (film, what)
    for stem, grey in films.items():
        Image.fromarray(grey).save(tmp_path / f"{stem}.png")
        Image.fromarray(255 - grey).save(tmp_path / f"{stem}-inverse.png")
        files[f"{stem}-inverse.png"] = (stem, "inverse")
        for i, style in enumerate(ROTATION):
            (tmp_path / f"{stem}-{i}.dcm").write_bytes(film_dicom(grey, **style))
            files[f"{stem}-{i}.dcm"] = (stem, f"{style['photometric']} {style['bits_stored']} bit")
    names = [f"{stem}.png" for stem in films] + list(files)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-m", "covid_tasks", "predict", *names, "--model", str(model_file),
                          "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    prob = {Path(p["image"]).name: p["prob_covid"] for p in json.loads(out.stdout)["predictions"]}
    png = {stem: prob[f"{stem}.png"] for stem in films}
    gaps = {name: abs(prob[name] - png[stem]) for name, (stem, what) in files.items() if what != "inverse"}
    inversion = max(abs(prob[f"{stem}-inverse.png"] - png[stem]) for stem in films)
    assert inversion > INVERSION_SEEN, f"the model barely sees an inversion ({inversion:.3f}): no power"
    assert max(gaps.values()) <= TOLERANCE, {k: round(v, 4) for k, v in gaps.items() if v > TOLERANCE}
    logger.info("max |dP| DICOM vs PNG %.5f over %d films; film vs inverse up to %.3f; PNGs' P(covid) %s",
                max(gaps.values()), len(gaps), inversion, np.round(list(png.values()), 3))
