"""split: patient-disjoint, stratified, stable across runs, links not copies, clear failures."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.stages.relabel import relabel
from covid_tasks.stages.split import split

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
SPLITS = ("train", "val", "test")
LABELED = ["filename", "patientid", "group_id", "finding", "view", "modality", "label"]


def write_labeled(root: Path, images: list[tuple[str, str, str]],
                  group_of: dict[str, str] | None = None) -> Path:
    """Write ``labeled.csv`` rows ``(filename, patientid, label)`` and an image file for each."""
    (root / "raw" / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "labeled.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELED)
        for name, pid, label in images:
            group = (group_of or {}).get(pid, pid)
            finding = "COVID-19" if label == "covid" else "No Finding"
            writer.writerow([name, pid, group, finding, "PA", "X-ray", label])
            (root / "raw" / "images" / name).write_bytes(name.encode())
    return root


def cohort(n_covid: int, n_non: int, prefix: str = "p", per_patient: int = 2) -> list[tuple[str, str, str]]:
    """``per_patient`` images (1 for every third patient) for each of n patients per class."""
    out = []
    for label, n in (("covid", n_covid), ("non_covid", n_non)):
        for i in range(n):
            pid = f"{prefix}{label[0]}{i}"
            out += [(f"{pid}-{k}.png", pid, label) for k in range(1 if i % 3 == 0 else per_patient)]
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def patient_splits(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in read_rows(root / "splits.csv"):
        out[r["patientid"]].add(r["split"])
    return out


def assert_patient_disjoint(root: Path) -> None:
    rows = read_rows(root / "splits.csv")
    assert {s for r in rows for s in [r["split"]]} <= set(SPLITS)
    assert all(len(s) == 1 for s in patient_splits(root).values())
    assert len({r["filename"] for r in rows}) == len(rows)


def class_share(result: dict, s: str, c: str) -> float:
    return result["counts"][s][c]["images"] / sum(result["counts"][x][c]["images"] for x in SPLITS)


def test_sample_data_split(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE / "images", tmp_path / "raw" / "images")
    shutil.copy(SAMPLE / "metadata.csv", tmp_path / "raw" / "metadata.csv")
    cfg = Config(data_root=str(tmp_path))
    relabel(cfg, "run")
    result = split(cfg, "run")

    assert_patient_disjoint(tmp_path)
    rows = read_rows(tmp_path / "splits.csv")
    assert len(rows) == result["n_images"] == 101
    assert result["n_positive"] == 90
    for s in SPLITS:
        part = read_rows(Path(result[f"{s}_csv"]))
        assert part and {r["split"] for r in part} == {s}
        for c in CLASS_NAMES:
            assert result["counts"][s][c]["patients"] >= 1
            assert result["counts"][s][c]["images"] == sum(1 for r in part if r["label"] == c)
            linked = sorted(p.name for p in (tmp_path / "split" / s / c).iterdir())
            assert linked == sorted(r["filename"] for r in part if r["label"] == c)
    report = json.loads(Path(result["report"]).read_text())
    assert report["counts"] == result["counts"]
    assert report["links"] == {"hard": 101, "symbolic": 0}
    assert sum(report["totals"][s]["patients"] for s in SPLITS) == result["n_patients"]
    json.dumps(result)


def test_links_are_hard_links_not_copies(tmp_path: Path) -> None:
    root = write_labeled(tmp_path, cohort(12, 6))
    split(Config(data_root=str(root)), "run")
    for r in read_rows(root / "splits.csv"):
        linked = root / "split" / r["split"] / r["label"] / r["filename"]
        assert os.path.samefile(linked, root / "raw" / "images" / r["filename"])
        assert not linked.is_symlink()


def test_symlinks_where_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_labeled(tmp_path, cohort(12, 6))

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    result = split(Config(data_root=str(root)), "run")
    report = json.loads(Path(result["report"]).read_text())
    assert report["links"] == {"hard": 0, "symbolic": result["n_images"]}
    for r in read_rows(root / "splits.csv"):
        linked = root / "split" / r["split"] / r["label"] / r["filename"]
        assert linked.is_symlink() and not Path(os.readlink(linked)).is_absolute()
        assert linked.read_bytes() == r["filename"].encode()


def test_linked_and_mixed_class_patients_stay_together(tmp_path: Path) -> None:
    images = cohort(20, 10)
    # patients pc1 and pn1 share a group (one image filed under both); pc2 has both classes
    images += [("mixed-nf.png", "pc2", "non_covid")]
    root = write_labeled(tmp_path, images, group_of={"pc1": "pc1", "pn1": "pc1"})
    result = split(Config(data_root=str(root)), "run")
    assert_patient_disjoint(root)
    where = {p: s.pop() for p, s in patient_splits(root).items()}
    assert where["pc1"] == where["pn1"]
    report = json.loads(Path(result["report"]).read_text())
    assert report["mixed_class_groups"] == ["pc1", "pc2"]
    assert report["n_groups"] == 29


def test_same_bytes_link_groups_even_without_group_id(tmp_path: Path) -> None:
    root = write_labeled(tmp_path, cohort(20, 10))
    rows = read_rows(root / "labeled.csv")
    for r in rows:  # two patients of one class share an image hash, three others another
        shared = {"pc4": "h1", "pc5": "h1", "pn4": "h2", "pn5": "h2", "pn7": "h2"}
        r["sha256"] = shared.get(r["patientid"], r["filename"])
    with open(root / "labeled.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    split(Config(data_root=str(root)), "run")
    where = {p: s.pop() for p, s in patient_splits(root).items()}
    assert where["pc4"] == where["pc5"]
    assert where["pn4"] == where["pn5"] == where["pn7"]


def test_stable_when_a_batch_is_appended(tmp_path: Path) -> None:
    first = cohort(60, 24, prefix="w1")
    root = write_labeled(tmp_path, first)
    cfg = Config(data_root=str(root))
    before = split(cfg, "run")
    week1 = json.loads((root / "split_assignments.json").read_text())["patients"]
    assert before["new_patients"] == len(week1) == 84

    # week 2: new images of known patients, and a batch of new patients of both classes
    more_images = [(f"{pid}-new.png", pid, label) for _, pid, label in first[::5]]
    second = first + more_images + cohort(40, 16, prefix="w2")
    write_labeled(root, second)
    after = split(cfg, "run")
    week2 = json.loads((root / "split_assignments.json").read_text())["patients"]
    assert {p: week2[p] for p in week1} == week1
    assert after["moved_patients"] == 0 and after["new_patients"] == 56
    assert_patient_disjoint(root)
    for s, target in zip(SPLITS, cfg.split_fractions, strict=True):
        for c in CLASS_NAMES:
            assert abs(class_share(after, s, c) - target) <= 0.03, (s, c, after["counts"])


def test_patient_keeps_split_after_leaving_and_returning(tmp_path: Path) -> None:
    images = cohort(20, 10)
    root = write_labeled(tmp_path, images)
    cfg = Config(data_root=str(root))
    split(cfg, "run")
    where = {p: s.pop() for p, s in patient_splits(root).items()}
    gone = "pc7"
    write_labeled(root, [i for i in images if i[1] != gone])
    split(cfg, "run")
    assert json.loads((root / "split_assignments.json").read_text())["patients"][gone] == where[gone]
    write_labeled(root, images + cohort(9, 3, prefix="new"))
    split(cfg, "run")
    assert {p: s.pop() for p, s in patient_splits(root).items() if p in where} == where


def test_new_link_between_splits_moves_the_group_to_test(tmp_path: Path) -> None:
    images = cohort(20, 10)
    root = write_labeled(tmp_path, images)
    cfg = Config(data_root=str(root))
    split(cfg, "run")
    where = {p: s.pop() for p, s in patient_splits(root).items()}
    in_test = next(p for p, s in sorted(where.items()) if s == "test" and p.startswith("pc"))
    in_train = next(p for p, s in sorted(where.items()) if s == "train" and p.startswith("pc"))
    write_labeled(root, images, group_of={in_test: in_train})  # relabel found a shared file
    result = split(cfg, "run")
    after = {p: s.pop() for p, s in patient_splits(root).items()}
    assert after[in_test] == after[in_train] == "test"
    assert {p: s for p, s in after.items() if p != in_train} == \
        {p: s for p, s in where.items() if p != in_train}
    report = json.loads(Path(result["report"]).read_text())
    assert report["moved_patients"] == [{"patientid": in_train, "from": "train", "to": "test"}]
    assert result["moved_patients"] == 1


def test_rerun_is_identical_and_seeded(tmp_path: Path) -> None:
    images = cohort(30, 12)
    a = write_labeled(tmp_path / "a", images)
    split(Config(data_root=str(a), seed=1), "run")
    first = {n: (a / n).read_bytes() for n in ("splits.csv", "train.csv", "val.csv", "test.csv",
                                                "split_assignments.json")}
    counts = json.loads((a / "split_report.json").read_text())["counts"]
    again = split(Config(data_root=str(a), seed=1), "run")
    assert {n: (a / n).read_bytes() for n in first} == first
    assert again["counts"] == counts and again["new_patients"] == 0

    b = write_labeled(tmp_path / "b", images)
    split(Config(data_root=str(b), seed=1), "run")
    assert (b / "splits.csv").read_bytes() == first["splits.csv"]
    c = write_labeled(tmp_path / "c", images)
    split(Config(data_root=str(c), seed=2), "run")
    assert patient_splits(c) != patient_splits(a)


@pytest.mark.parametrize(("n_covid", "n_non", "message"), [
    (10, 2, "split 'train' has no patient of class 'non_covid'"),
    (1, 10, "split 'train' has no patient of class 'covid'; split 'val' has no patient of class 'covid'"),
])
def test_too_few_patients_fail_with_a_clear_message(tmp_path: Path, n_covid: int, n_non: int,
                                                    message: str) -> None:
    root = write_labeled(tmp_path, cohort(n_covid, n_non))
    with pytest.raises(ValueError, match="patients per split and class") as info:
        split(Config(data_root=str(root)), "run")
    assert message in str(info.value)
    assert not (root / "splits.csv").exists() and not (root / "split_assignments.json").exists()


def test_bad_inputs_fail_early(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="labeled.csv"):
        split(Config(data_root=str(tmp_path)), "run")
    root = write_labeled(tmp_path, cohort(6, 6) + [("pc1-0.png", "pn1", "non_covid")])
    with pytest.raises(ValueError, match="more than once"):
        split(Config(data_root=str(root)), "run")
    root = write_labeled(tmp_path, cohort(6, 6))
    (root / "raw" / "images" / "pc1-0.png").unlink()
    with pytest.raises(FileNotFoundError, match="pc1-0.png"):
        split(Config(data_root=str(root)), "run")
    root = write_labeled(tmp_path, cohort(6, 6))
    (root / "split_assignments.json").write_text("{not json")
    with pytest.raises(ValueError, match="split_assignments.json is unreadable"):
        split(Config(data_root=str(root)), "run")
