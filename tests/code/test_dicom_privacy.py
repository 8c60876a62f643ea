"""No patient data leaves a DICOM header: pull -> relabel -> split, predict and the service's decoding.

Every film of the sample, written as DICOM, carries a distinctive patient name, ID, birth date and
accession number (tests/helpers/dicom_data.py). The stages run on them with every logger at DEBUG
(pydicom's own debug output switched on, which logs each element it reads), then every file
written under the data root, except the pulled films themselves (``raw/images``, ``quarantine``
and their hard links in ``split/``),
every log record, everything written to stdout and stderr, every warning, the predictions and the
service's refusals are searched for those strings. tests/dags/test_dag_dicom.py searches the
MLflow store and the Airflow logs of a whole DAG run the same way.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest

from covid_tasks.config import Config
from tests.helpers import tiny_run
from tests.helpers.dicom_data import (
    SAMPLE,
    dicom_source,
    grey_of,
    phi_for,
    phi_hits,
    phi_in_text,
    read_rows,
    write_rows,
)
from tests.helpers.dicom_files import film_dicom

SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage: no image


def _source(tmp_path: Path) -> Path:
    """The sample as DICOM, with empty view/modality; every 4th row's patientid left to the header."""
    src = dicom_source(tmp_path / "src")
    header, rows = read_rows(src / "metadata.csv")
    pid = header.index("patientid")
    for i, row in enumerate(rows):
        if i % 4 == 0:
            row[pid] = ""
    grey = grey_of(next((SAMPLE / "images").glob("*.jpg")))
    good = film_dicom(grey, patient=phi_for("bad"), bits_stored=16)
    (src / "images" / "cut.dcm").write_bytes(good[:-5000])  # quarantined by pull, reason truncated
    rows.append(["999", *[""] * (len(header) - 1)])
    rows[-1][header.index("finding")], rows[-1][header.index("filename")] = "COVID-19", "cut.dcm"
    write_rows(src / "metadata.csv", header, rows)
    return src


def test_no_patient_data_in_any_output(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    import pydicom

    from covid_tasks.predict import predict
    from covid_tasks.serve.inputs import BadInputError, Upload, check_request, decode_uploads
    from covid_tasks.stages.pull import pull
    from covid_tasks.stages.relabel import relabel
    from covid_tasks.stages.split import split
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model

    src = _source(tmp_path)
    assert phi_hits([src / "images"]), "the films must carry the patient data this test looks for"
    root = tmp_path / "data"
    cfg = Config(data_root=str(root), source_uri=str(src))
    model = tmp_path / "model" / "model.keras"
    model.parent.mkdir()
    save_model(tiny_run.channel_model(tiny_run.GOOD, img_size=32), model)
    write_json(model.parent / "operating_point.json", {"threshold": 0.5})
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True)  # pydicom then logs every element it reads, patient name included
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [pull(cfg, "run"), relabel(cfg, "run"), split(cfg, "run")]
            films = sorted((root / "raw" / "images").glob("*.dcm"))[:3]
            results.append(predict([str(p) for p in films], str(model)))
            uploads = [Upload(p.name, p.read_bytes(), "application/dicom") for p in films]
            check_request(uploads, 2**24, 50_000_000, 10**9)
            assert decode_uploads(uploads, 32, 50_000_000).shape == (3, 32, 32, 3)
            sr = film_dicom(grey_of(next((SAMPLE / "images").glob("*.jpg"))), patient=phi_for("sr"),
                            extra={"SOPClassUID": SR_SOP})
            refusals = []
            for name, data in (("cut.dcm", (src / "images" / "cut.dcm").read_bytes()), ("sr.dcm", sr)):
                with pytest.raises(BadInputError) as info:
                    upload = Upload(name, data, "application/dicom")
                    check_request([upload], 2**24, 50_000_000, 10**9)
                    decode_uploads([upload], 32, 50_000_000)
                refusals.append(f"{info.value.status} {info.value.message}")
    finally:
        pydicom.config.debug(False)
    out, err = capfd.readouterr()
    assert results[0]["quarantined"] == 1 and results[1]["from_header"]["view"] > 0
    assert "truncated" in refusals[0] and "not_image" in refusals[1], refusals
    report = json.loads((root / "relabel_report.json").read_text())
    assert report["from_header"]["filled"]["patientid"] > 0  # hashed IDs stand in for empty cells
    texts = {"logs": caplog.text, "stdout": out, "stderr": err, "results": json.dumps(results),
             "refusals": "\n".join(refusals), "warnings": "\n".join(str(w.message) for w in caught)}
    leaks = {k: phi_in_text(v) for k, v in texts.items() if phi_in_text(v)}
    leaks |= {"files": phi_hits([root], inputs=[root / "raw" / "images", root / "quarantine"])}
    assert leaks == {"files": []}, leaks
    assert caplog.text and (root / "labeled.csv").is_file() and (root / "splits.csv").is_file()
    shutil.rmtree(src)

