"""DICOM films through the one decoder and the data stages: images, tf.data, pull and relabel.

Films are written from the sample JPEGs (tests/helpers/dicom_files.py) so that their standard
display gives back the JPEG's grey levels: decoded, a film must equal the PNG of the same grey
levels, whatever its photometric interpretation, bit depth, transfer syntax or display rule.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from covid_tasks import images
from covid_tasks.config import Config
from tests.helpers.dicom_data import ROTATION, SAMPLE, grey_of, phi_for
from tests.helpers.dicom_files import WRITABLE, bomb_dicom, film_dicom

SIZE = 64
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage: no image


@pytest.fixture(scope="module")
def films() -> list[np.ndarray]:
    """Grey levels of three sample films (one of them stored as colour upstream)."""
    paths = sorted((SAMPLE / "images").glob("*.jpg"))
    return [grey_of(p) for p in paths[:3]]


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def _style_id(style: dict[str, Any]) -> str:
    ts = next(k for k, v in WRITABLE.items() if v == style["transfer_syntax"])
    return f"{style['photometric']}-{style['bits_stored']}bit-{ts}-{style['voi']}"


# --------------------------------------------------------------------------------- the decoder
@pytest.mark.parametrize("style", ROTATION, ids=[_style_id(s) for s in ROTATION])
def test_a_dicom_film_decodes_like_the_png_of_the_same_film(style: dict[str, Any], films: list[np.ndarray],
                                                            tmp_path: Path) -> None:
    for i, grey in enumerate(films[:2]):
        png = tmp_path / f"film{i}.png"
        Image.fromarray(grey).save(png)
        dcm = _write(tmp_path, f"film{i}.bin", film_dicom(grey, **style))  # no .dcm: known by its content
        want = images.load_image(png, SIZE)
        for got in (images.load_image(dcm, SIZE), images.load_image_bytes(dcm.read_bytes(), SIZE)):
            assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.float32
            assert np.abs(got - want).max() <= 1.0 and np.abs(got - want).mean() < 0.01
        assert images.image_size(dcm) == images.image_size(dcm.read_bytes()) == (grey.shape[1], grey.shape[0])
        assert images.validate_image(dcm, 64, 50_000_000) is None


def test_tf_data_decodes_dicom_as_load_image_does_and_keeps_row_order(films: list[np.ndarray],
                                                                      tmp_path: Path) -> None:
    import pandas as pd

    from covid_tasks.dataset import make_dataset

    names = []
    for i, grey in enumerate(films):
        Image.fromarray(grey).save(tmp_path / f"f{i}.png")
        _write(tmp_path, f"f{i}.dcm", film_dicom(grey, **ROTATION[i % len(ROTATION)]))
        names += [f"f{i}.dcm", f"f{i}.png"]
    frame = pd.DataFrame({"filename": names, "label": ["covid", "non_covid"] * len(films)})
    batches = list(make_dataset(frame, tmp_path, Config(img_size=SIZE, batch_size=4), training=False))
    got = np.concatenate([np.asarray(b[0]) for b in batches])
    want = np.stack([images.load_image(tmp_path / n, SIZE) for n in names])
    assert got.shape == want.shape and np.abs(got - want).max() <= 1.0
    np.testing.assert_array_equal(got[0::2], want[0::2])  # the DICOM rows: the very same decoder
    assert np.abs(got[0::2] - got[1::2]).max() <= 1.0  # each film as DICOM and as PNG


def _bad_films(grey: np.ndarray) -> dict[str, bytes]:
    good = film_dicom(grey, bits_stored=16)
    return {
        "truncated": good[: len(good) - 4000],  # cut inside the pixel data: the header reads fine
        "not_image": film_dicom(grey, extra={"SOPClassUID": SR_SOP}),
        "unsupported": film_dicom(grey, extra={"NumberOfFrames": "2"}),
        "pixel_limit": bomb_dicom(),
    }


def test_dicom_refusals_are_value_errors_with_their_reasons(films: list[np.ndarray], tmp_path: Path) -> None:
    for reason, data in _bad_films(films[0]).items():
        path = _write(tmp_path, f"{reason}.dcm", data)
        error = images.ImageTooLargeError if reason == "pixel_limit" else images.UnusableImageError
        with pytest.raises(error) as info:
            images.load_image(path, SIZE)
        assert str(path) in str(info.value)
        with pytest.raises(error):
            images.load_image_bytes(data, SIZE, name="upload.dcm")
        if reason == "pixel_limit":
            assert (info.value.width, info.value.height) == (65000, 65000)
        else:
            assert info.value.reason == reason and f"not a decodable image: {reason}: " in str(info.value)
        assert images.validate_image(path, 64, 50_000_000).startswith(f"{reason}: ")
        if reason != "truncated":  # refused on the header alone, before any pixel is read
            with pytest.raises(error):
                images.image_size(path)
    small = _write(tmp_path, "small.dcm", film_dicom(films[0][:40, :50]))
    assert images.validate_image(small, 64, 50_000_000) == "too_small: 50x40, smaller side under 64 px"


def test_a_bad_dicom_is_named_and_skipped_in_training_and_refused_in_evaluation(
        films: list[np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import pandas as pd

    from covid_tasks.dataset import make_dataset

    for i, grey in enumerate(films[:2]):
        _write(tmp_path, f"ok{i}.dcm", film_dicom(grey))
    _write(tmp_path, "cut.dcm", _bad_films(films[0])["truncated"])
    frame = pd.DataFrame({"filename": ["ok0.dcm", "cut.dcm", "ok1.dcm"],
                          "label": ["covid", "non_covid", "covid"]})
    cfg = Config(img_size=32, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="covid_tasks.dataset"):
        kept = list(make_dataset(frame, tmp_path, cfg, training=False, skip_unusable=True))
    assert sum(len(b[1]) for b in kept) == 2
    assert f"{tmp_path / 'cut.dcm'}: truncated: " in caplog.text
    with pytest.raises(Exception, match=r"cut\.dcm: truncated: "):
        list(make_dataset(frame, tmp_path, cfg, training=False))


def test_near_duplicate_hash_of_a_dicom_film_is_the_png_s(films: list[np.ndarray], tmp_path: Path) -> None:
    from covid_tasks.near_duplicates import dhash_file

    Image.fromarray(films[1]).save(tmp_path / "f.png")
    _write(tmp_path, "f.dcm", film_dicom(films[1], photometric="MONOCHROME1", bits_stored=12))
    assert dhash_file(tmp_path / "f.dcm") == dhash_file(tmp_path / "f.png")


# ------------------------------------------------------------------------------------ stages
def _metadata(path: Path, rows: list[dict[str, str]]) -> None:
    columns = ["patientid", "finding", "view", "modality", "folder", "filename"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns + [""], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "folder": "images"} for r in rows)


def test_pull_takes_dcm_files_and_quarantines_bad_ones_with_their_reasons(films: list[np.ndarray],
                                                                          tmp_path: Path) -> None:
    from covid_tasks.stages.pull import pull

    src = tmp_path / "src"
    _write(src / "images", "good.dcm", film_dicom(films[0], photometric="MONOCHROME1", bits_stored=16))
    bad = _bad_films(films[1])
    for reason, data in bad.items():
        _write(src / "images", f"{reason}.dcm", data)
    _metadata(src / "metadata.csv", [{"patientid": "1", "finding": "COVID-19", "filename": f}
                                     for f in ["good.dcm", *(f"{r}.dcm" for r in bad)]])
    root = tmp_path / "data"
    result = pull(Config(data_root=str(root), source_uri=str(src)), "run")
    assert result["quarantined"] == len(bad)
    assert (root / "raw" / "images" / "good.dcm").is_file()
    report = json.loads((root / "pull_report.json").read_text())
    reasons = {q["key"]: q["reason"] for q in report["quarantined_files"]}
    assert {k: v.split(":")[0] for k, v in reasons.items()} == {f"images/{r}.dcm": r for r in bad}


def _relabel_root(tmp_path: Path, films: list[np.ndarray]) -> Path:
    """raw/ with DICOM films whose CSV rows leave view, modality or patientid to the header."""
    root = tmp_path / "data"
    raw = root / "raw" / "images"
    paths = sorted((SAMPLE / "images").glob("*.jpg"))
    grey = [grey_of(p) for p in paths[3:10]]  # different films: no near-duplicate links

    def dcm(name: str, g: np.ndarray, key: str, view: str = "PA", modality: str = "DX", **extra: Any) -> None:
        _write(raw, name, film_dicom(g, view_position=view, modality=modality, patient=phi_for(key),
                                     extra=extra or None))

    dcm("a.dcm", grey[0], "K1")
    dcm("b.dcm", grey[1], "K2", modality="CR")
    dcm("c.dcm", grey[2], "K3", view="PA")
    dcm("d.dcm", grey[3], "K4", modality="CT")
    dcm("e.dcm", grey[4], "K1", view="AP", PatientPosition="HFS")  # the same header patient as a.dcm
    dcm("g.dcm", grey[5], "K7", view="LL")
    Image.fromarray(grey[6]).save(raw / "f.png")
    _metadata(root / "raw" / "metadata.csv", [
        {"patientid": "p1", "finding": "COVID-19", "view": "", "modality": "", "filename": "a.dcm"},
        {"patientid": "", "finding": "No Finding", "view": "", "modality": "", "filename": "b.dcm"},
        {"patientid": "p3", "finding": "COVID-19", "view": "AP", "modality": "X-ray", "filename": "c.dcm"},
        {"patientid": "p4", "finding": "COVID-19", "view": "", "modality": "", "filename": "d.dcm"},
        {"patientid": "p5", "finding": "No Finding", "view": "", "modality": "", "filename": "e.dcm"},
        {"patientid": "p6", "finding": "COVID-19", "view": "", "modality": "", "filename": "f.png"},
        {"patientid": "p7", "finding": "COVID-19", "view": "", "modality": "", "filename": "g.dcm"},
    ])
    return root


def test_relabel_fills_empty_cells_from_dicom_headers_and_links_their_patients(
        films: list[np.ndarray], tmp_path: Path) -> None:
    import pandas as pd

    from covid_tasks.dicom import patient_hash
    from covid_tasks.stages.relabel import relabel

    root = _relabel_root(tmp_path, films)
    result = relabel(Config(data_root=str(root), near_duplicate_distance=-1), "run")
    labeled = pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False).set_index("filename")
    assert sorted(labeled.index) == ["a.dcm", "b.dcm", "c.dcm", "e.dcm"]
    # the header fills empty cells only: c.dcm's CSV says AP (its header PA) and AP stays
    assert labeled["view"].to_dict() == {"a.dcm": "PA", "b.dcm": "PA", "c.dcm": "AP", "e.dcm": "AP Supine"}
    assert set(labeled["modality"]) == {"X-ray"}
    # the label comes from the CSV's finding; an empty patientid becomes the header's hash
    assert labeled["label"].to_dict() == {"a.dcm": "covid", "b.dcm": "non_covid", "c.dcm": "covid",
                                          "e.dcm": "non_covid"}
    assert labeled.loc["b.dcm", "patientid"] == patient_hash(phi_for("K2")["PatientID"])
    assert labeled.loc["a.dcm", "group_id"] == labeled.loc["e.dcm", "group_id"] == "p1"  # one header patient
    assert labeled.loc["c.dcm", "group_id"] == "p3"
    assert result["dropped"]["modality"] == 2 and result["dropped"]["view"] == 1  # d: CT, f: PNG; g: L
    report = json.loads((root / "relabel_report.json").read_text())
    filled = {"view": 5, "modality": 5, "patientid": 1}
    assert report["from_header"]["filled"] == result["from_header"] == filled
    assert report["from_header"]["dicom_images"] == 6 and report["from_header"]["linked_by_patient_hash"] == 1
    assert ["p1", "p5"] in report["linked_patients"]


def test_relabel_hashes_dicom_films_for_near_duplicates(films: list[np.ndarray], tmp_path: Path) -> None:
    from covid_tasks.stages.relabel import relabel

    root = _relabel_root(tmp_path, films)
    relabel(Config(data_root=str(root)), "run")
    near = json.loads((root / "relabel_report.json").read_text())["near_duplicates"]
    assert near["unhashed"] == []


def test_a_site_key_file_keys_the_patient_hash_and_bad_key_files_fail(
        films: list[np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import pandas as pd

    from covid_tasks.dicom import PATIENT_HASH_KEY, patient_hash
    from covid_tasks.stages.relabel import relabel

    root = _relabel_root(tmp_path, films)
    with caplog.at_level(logging.WARNING, logger="covid_tasks"):
        relabel(Config(data_root=str(root), near_duplicate_distance=-1), "run")
    assert "public default key" in caplog.text
    assert json.loads((root / "relabel_report.json").read_text())["from_header"]["patient_hash_key"] == (
        "public default")

    secret = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    key_file = tmp_path / "patient_hash.key"
    key_file.write_text(secret + "\n")  # as `openssl rand -hex 16 > file` writes it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="covid_tasks"):
        relabel(Config(data_root=str(root), near_duplicate_distance=-1, patient_hash_key_file=str(key_file)),
                "run")
    labeled = pd.read_csv(root / "labeled.csv", dtype=str, keep_default_na=False).set_index("filename")
    clear_id = phi_for("K2")["PatientID"]
    assert labeled.loc["b.dcm", "patientid"] == patient_hash(clear_id, secret.encode())
    assert labeled.loc["b.dcm", "patientid"] != patient_hash(clear_id)
    report_text = (root / "relabel_report.json").read_text()
    assert json.loads(report_text)["from_header"]["patient_hash_key"] == "site secret"
    assert "public default key" not in caplog.text
    assert secret not in report_text and secret not in caplog.text and str(key_file) not in report_text

    short = tmp_path / "short.key"
    short.write_text("letmein\n")
    public = tmp_path / "public.key"
    public.write_bytes(PATIENT_HASH_KEY)
    for bad, error, match in ((short, ValueError, "has 7 bytes"), (public, ValueError, "public default"),
                              (tmp_path / "absent.key", FileNotFoundError, "absent.key")):
        with pytest.raises(error, match=match) as caught:
            relabel(Config(data_root=str(root), patient_hash_key_file=str(bad)), "run")
        assert "letmein" not in str(caught.value)
