"""Cross-validation folds: patient-grouped, label-stratified, repeated."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from covid_tasks.folds import assign_folds

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid-chestxray"


def _labeled(n_patients: int = 40) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        label = "non_covid" if p % 4 == 0 else "covid"
        for i in range(1 + p % 3):
            rows.append({"filename": f"p{p}_{i}.jpg", "patientid": f"p{p}", "group_id": f"p{p}",
                         "label": label, "sha256": f"h{p}_{i}"})
    # p1 and p2 share identical image bytes; p3 and p5 share a group_id (one image under two ids).
    rows.append({"filename": "dup_of_p1.jpg", "patientid": "p2", "group_id": "p2", "label": "covid",
                 "sha256": "h1_0"})
    rows.append({"filename": "shared.jpg", "patientid": "p5", "group_id": "p3", "label": "covid",
                 "sha256": "hs"})
    return pd.DataFrame(rows)


def _assert_disjoint(folds: pd.DataFrame) -> None:
    for _, part in folds.groupby("repeat"):
        assert part["filename"].is_unique  # each image in exactly one fold of a repeat
        assert (part.groupby("patientid")["fold"].nunique() == 1).all()
        assert (part.groupby("split_group")["fold"].nunique() == 1).all()


def test_no_patient_or_image_in_two_folds_of_a_repeat():
    labeled = _labeled()
    folds = assign_folds(labeled, n_folds=5, n_repeats=2, seed=7)
    assert len(folds) == 2 * len(labeled)
    _assert_disjoint(folds)
    per_repeat = folds.groupby("repeat")
    for _, part in per_repeat:
        assert set(part["fold"]) == set(range(5))
        assert (part.groupby("fold")["label"].nunique() == 2).all()  # both classes in every fold
    # linked patients travel together
    r0 = folds[folds["repeat"] == 0].set_index("patientid")["fold"].groupby(level=0).first()
    assert r0["p1"] == r0["p2"] and r0["p3"] == r0["p5"]
    # repeats reshuffle, and the assignment is reproducible
    a, b = (folds[folds["repeat"] == r].set_index("filename")["fold"] for r in (0, 1))
    assert (a != b.loc[a.index]).any()
    pd.testing.assert_frame_equal(folds, assign_folds(labeled, n_folds=5, n_repeats=2, seed=7))


def test_too_many_folds_for_the_minority_class_is_refused():
    labeled = _labeled(8)  # two non_covid patients
    with pytest.raises(ValueError, match="has no non_covid image"):
        assign_folds(labeled, n_folds=5, n_repeats=1)
    with pytest.raises(ValueError, match="n_folds >= 2"):
        assign_folds(labeled, n_folds=1)


@pytest.mark.skipif(not (SHARED / "metadata.csv").is_file(), reason="full data set not present")
def test_real_data_folds_are_disjoint(tmp_path: Path) -> None:
    from covid_tasks.config import Config
    from covid_tasks.stages.pull import pull
    from covid_tasks.stages.relabel import relabel

    cfg = Config(data_root=str(tmp_path), source_uri=str(SHARED))
    pull(cfg, "run")
    relabel(cfg, "run")
    labeled = pd.read_csv(tmp_path / "labeled.csv", dtype=str, keep_default_na=False)
    folds = assign_folds(labeled)
    _assert_disjoint(folds)
    counts = folds[folds["repeat"] == 0].groupby("fold")["label"].value_counts().unstack()
    assert counts["non_covid"].min() >= 10  # stratified: about 88 / 5 per fold
