"""check_data between weekly versions of the sample data: a quiet week, label noise that blocks,
the return to normal, a schema change refused by pull, and near-duplicates of held-out films."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from covid_tasks.config import Config
from covid_tasks.data_checks import SchemaChangeError
from covid_tasks.layout import DataRoot
from covid_tasks.stages.check_data import DataChecksBlocked, check_data, held_out_duplicates
from covid_tasks.stages.pull import pull
from covid_tasks.stages.relabel import relabel

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


def _source(path: Path, change=None, rename: dict[str, str] | None = None) -> Path:
    """A copy of the sample source; ``change(rows)`` edits its metadata rows, ``rename`` its header."""
    shutil.copytree(SAMPLE / "images", path / "images")
    with open(SAMPLE / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if change:
        change(header, body)
    header = [(rename or {}).get(h, h) for h in header]
    with open(path / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *body])
    return path


def _week(cfg: Config, source: Path, key: str) -> dict:
    pull(cfg.replace(source_uri=str(source)), key)
    relabel(cfg, key)
    return check_data(cfg, key)


def _flip_covid(share: float):
    def change(header: list[str], body: list[list[str]]) -> None:
        fi = header.index("finding")
        covid = [r for r in body if "COVID" in r[fi]]
        for r in covid[: int(len(covid) * share)]:
            r[fi] = "Pneumonia"
    return change


def test_label_noise_blocks_and_the_return_to_normal_is_quiet(tmp_path: Path) -> None:
    cfg = Config(data_root=str(tmp_path / "data"), min_images_per_class=0)
    root = DataRoot.of(cfg)
    normal = _source(tmp_path / "normal")
    first = _week(cfg, normal, "w1")
    assert first["verdict"] == "ok" and first["baseline_updated"] and first["baseline_images"] is None
    baseline = root.checks_baseline.read_bytes()
    noisy = _source(tmp_path / "noisy", _flip_covid(0.2))
    with pytest.raises(DataChecksBlocked, match="label_changes"):
        _week(cfg, noisy, "w2")
    report = json.loads(root.run("w2").data_checks.read_text())
    assert report["verdict"] == "block" and "label_changes" in [a["code"] for a in report["anomalies"]]
    assert root.checks_baseline.read_bytes() == baseline  # a blocked version never becomes the baseline
    from covid_tasks import history

    assert [(e["run_key"], e["decision"], e["data_check"]) for e in history.load(root)] == [
        ("w2", "blocked", "block")]
    again = _week(cfg, normal, "w3")
    assert again["verdict"] == "ok" and again["anomalies"] == []


def test_a_renamed_required_column_fails_pull_before_raw_changes(tmp_path: Path) -> None:
    cfg = Config(data_root=str(tmp_path / "data"), min_images_per_class=0)
    root = DataRoot.of(cfg)
    _week(cfg, _source(tmp_path / "normal"), "w1")
    before = root.metadata.read_bytes()
    with pytest.raises(SchemaChangeError, match="lacks required column.*finding.*findings.*renamed"):
        pull(cfg.replace(source_uri=str(_source(tmp_path / "renamed", rename={"finding": "findings"}))), "w2")
    assert root.metadata.read_bytes() == before
    report = json.loads(root.run("w2").data_checks.read_text())
    assert report["verdict"] == "block" and report["anomalies"][0]["code"] == "schema_change"
    assert isinstance(SchemaChangeError("x"), ValueError)  # fails the task at once, no retry


def test_new_films_that_copy_held_out_films_are_named(tmp_path: Path) -> None:
    cfg = Config(data_root=str(tmp_path))
    root = DataRoot.of(cfg)
    root.root.mkdir(parents=True, exist_ok=True)
    (root.relabel_report).write_text(json.dumps({"near_duplicates": {"pairs": [
        {"a": "t.jpg", "b": "copy.jpg", "distance": 2},      # test film copied under a new patient
        {"a": "tr.jpg", "b": "copy2.jpg", "distance": 3},    # train film copied: no held-out film
        {"a": "t.jpg", "b": "t2.jpg", "distance": 1}]}}))    # the same patient's two films
    root.split_assignments.write_text(json.dumps({"patients": {"p_test": "test", "p_train": "train"}}))
    import pandas as pd

    labeled = pd.DataFrame({"filename": ["t.jpg", "t2.jpg", "copy.jpg", "tr.jpg", "copy2.jpg"],
                            "patientid": ["p_test", "p_test", "p_new", "p_train", "p_new2"]})
    assert held_out_duplicates(root, labeled) == [("t.jpg", "copy.jpg", 2)]


def test_patient_ids_filled_from_dicom_headers_are_not_invalid_rows(tmp_path: Path) -> None:
    """A DICOM export whose metadata.csv leaves patientid (and view, modality) empty: the headers
    supply them in relabel, and the data checks do not count those rows as invalid."""
    from tests.helpers.dicom_data import dicom_source

    source = dicom_source(tmp_path / "dicom", blank=("view", "modality", "patientid"), limit=40)
    cfg = Config(data_root=str(tmp_path / "data"), min_images_per_class=0, source_uri=str(source))
    pull(cfg, "w1")
    relabel(cfg, "w1")
    result = check_data(cfg, "w1")
    report = json.loads(DataRoot.of(cfg).run("w1").data_checks.read_text())
    assert result["verdict"] == "ok", report["summary"]
    import pandas as pd

    from covid_tasks import data_checks

    raw = data_checks.read_metadata(DataRoot.of(cfg).metadata)
    assert (raw["patientid"] == "").all()  # the control: every row would fail the schema's check
    assert data_checks.schema_summary(raw)["invalid_rows"] == len(raw)
    labeled = pd.read_csv(DataRoot.of(cfg).labeled, dtype=str, keep_default_na=False)
    assert labeled["patientid"].str.startswith("dcm-").all()
