"""Data tests on the shared upstream data sets (skipped when ``../shared/data`` is absent).

The expected relabel counts are computed here independently of ``covid_tasks.relabel``, with the
csv module and the rules written out plainly, and compared with its report; the absolute numbers
are pinned too, so a change in the rules or the data shows up as a failing test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import pytest

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.config import METADATA_COLUMNS as REQUIRED_COLUMNS
from covid_tasks.stages.relabel import relabel
from covid_tasks.stages.split import split

SPLITS = ("train", "val", "test")
TOLERANCE = 0.03  # each split's share of each class's images stays within 3 points of its target


def expected_relabel(metadata: Path, images: Path, min_images: int = 50) -> dict[str, Any]:
    """The rule table applied by hand: the drop count per reason and the class counts."""
    with open(metadata, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        table = [r for r in reader if any(c.strip() for c in r)]
    named = [i for i, h in enumerate(header) if h.strip()]
    col = {h.strip(): i for i, h in enumerate(header)}
    dropped: Counter[str] = Counter()
    candidates = []
    for n, r in enumerate(table):
        if any(c.strip() for i, c in enumerate(r) if i not in named) or len(r) <= named[-1]:
            dropped["malformed_row"] += 1
            continue
        pid, finding, view, modality, name = (r[col[c]].strip() for c in
                                              ("patientid", "finding", "view", "modality", "filename"))
        if pid == "":
            dropped["missing_patientid"] += 1
        elif name == "" or name.startswith("/") or ".." in name.split("/"):
            dropped["unsafe_filename"] += 1
        elif modality != "X-ray":
            dropped["modality"] += 1
        elif finding in ("todo", "Unknown", ""):
            dropped["placeholder_finding"] += 1
        elif view not in ("PA", "AP", "AP Supine"):
            dropped["view"] += 1
        elif not (images / name).is_file():
            dropped["missing_image"] += 1
        else:
            label = "covid" if "COVID-19" in finding else "non_covid"
            digest = hashlib.sha256((images / name).read_bytes()).hexdigest()
            candidates.append((view == "AP Supine", n, name, digest, label, view))
    labels = defaultdict(set)
    for *_, digest, label, _view in candidates:
        labels[digest].add(label)
    names, digests, unique = set(), set(), []
    for _supine, _n, name, digest, label, view in sorted(candidates):
        if len(labels[digest]) > 1:
            dropped["conflicting_label"] += 1
        elif name in names:
            dropped["duplicate_filename"] += 1
        elif digest in digests:
            dropped["duplicate_image"] += 1
        else:
            names.add(name)
            digests.add(digest)
            unique.append((label, view))
    primary = Counter(label for label, view in unique if view != "AP Supine")
    fallback = {c: primary[c] < min_images for c in CLASS_NAMES}
    kept = Counter()
    for label, view in unique:
        if view != "AP Supine" or fallback[label]:
            kept[label] += 1
        else:
            dropped["fallback_not_needed"] += 1
    return {"dropped": dict(dropped), "class_counts": {c: kept[c] for c in CLASS_NAMES},
            "fallback_used": fallback, "source_rows": len(table)}


def nonzero(dropped: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in dropped.items() if v}


def assert_sound_split(root: Path, result: dict[str, Any], cfg: Config) -> None:
    """No patient or image in two splits, both classes in each split, shares near the targets."""
    with open(root / "splits.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    where = defaultdict(set)
    for r in rows:
        where[r["patientid"]].add(r["split"])
        where["group:" + r["split_group"]].add(r["split"])
        where["sha:" + r["sha256"]].add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    assert len({r["filename"] for r in rows}) == len(rows) == result["n_images"]
    for s, target in zip(SPLITS, cfg.split_fractions, strict=True):
        for c in CLASS_NAMES:
            assert result["counts"][s][c]["patients"] >= 1
            share = result["counts"][s][c]["images"] / sum(result["counts"][x][c]["images"] for x in SPLITS)
            assert abs(share - target) <= TOLERANCE, (s, c, result["counts"])


# ------------------------------------------------------------------------------- the old data set
def test_schema_of_full_metadata(full_dir: Path) -> None:
    with open(full_dir / "metadata.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert set(REQUIRED_COLUMNS) <= set(header)
    assert header[-1] == ""  # upstream's trailing comma: an unnamed last column


def test_full_relabel_matches_the_rule_table(full_dir: Path, make_root: Callable[..., Path]) -> None:
    root = make_root((full_dir / "metadata.csv").read_text(encoding="utf-8"))
    result = relabel(Config(data_root=str(root)), "run")
    report = json.loads(Path(result["report"]).read_text())
    expected = expected_relabel(root / "raw" / "metadata.csv", root / "raw" / "images")

    assert nonzero(result["dropped"]) == expected["dropped"]
    assert result["class_counts"] == expected["class_counts"]
    assert result["fallback_used"] == expected["fallback_used"]
    assert report["source_rows"] == expected["source_rows"] == 751
    # pinned: the numbers docs/data.md's rule table quotes
    assert nonzero(result["dropped"]) == {"malformed_row": 5, "modality": 84, "placeholder_finding": 78,
                                          "view": 46, "missing_image": 11, "duplicate_filename": 4,
                                          "fallback_not_needed": 129}
    assert result["class_counts"] == {"non_covid": 88, "covid": 306}
    assert result["fallback_used"] == {"non_covid": False, "covid": False}
    assert (result["n_images"], result["n_patients"]) == (394, 252)
    assert report["dropped_examples"]["malformed_row"] == [617, 618, 620, 666, 667]
    assert len(report["shared_filenames"]) == 5
    assert report["images_without_row"] == 13


def test_full_ap_supine_fallback(full_dir: Path, make_root: Callable[..., Path]) -> None:
    root = make_root((full_dir / "metadata.csv").read_text(encoding="utf-8"))
    result = relabel(Config(data_root=str(root), min_images_per_class=100), "run")
    expected = expected_relabel(root / "raw" / "metadata.csv", root / "raw" / "images", min_images=100)
    assert result["fallback_used"] == expected["fallback_used"] == {"non_covid": True, "covid": False}
    assert result["class_counts"] == expected["class_counts"]
    assert nonzero(result["dropped"]) == expected["dropped"]
    assert result["class_counts"]["non_covid"] > 88  # the AP Supine images were added
    with open(root / "labeled.csv", newline="", encoding="utf-8") as fh:
        supine = Counter(r["label"] for r in csv.DictReader(fh) if r["view"] == "AP Supine")
    assert set(supine) == {"non_covid"} and supine["non_covid"] == result["class_counts"]["non_covid"] - 88


def test_full_split_is_patient_disjoint_and_stratified(full_dir: Path,
                                                       make_root: Callable[..., Path]) -> None:
    root = make_root((full_dir / "metadata.csv").read_text(encoding="utf-8"))
    cfg = Config(data_root=str(root))
    relabel(cfg, "run")
    result = split(cfg, "run")
    assert_sound_split(root, result, cfg)
    assert (result["n_images"], result["n_patients"], result["n_positive"]) == (394, 252, 306)
    report = json.loads(Path(result["report"]).read_text())
    assert len(report["mixed_class_groups"]) == 6  # 'No Finding' priors of COVID-19 patients
    assert report["links"]["hard"] + report["links"]["symbolic"] == 394


def _rows_cut(text: str, fraction: float) -> str:
    """The header and the first ``fraction`` of the records (multi-line records stay whole)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    ends = [reader.line_num for _ in reader]
    lines = io.StringIO(text, newline="").readlines()  # the physical lines the csv module counts
    return "".join(lines[: ends[int(len(ends) * fraction) - 1]])


@pytest.mark.parametrize("meta", ["full", "newest"])
def test_appending_a_batch_moves_no_patient(meta: str, full_dir: Path, newest_meta: Path,
                                            make_root: Callable[..., Path]) -> None:
    text = (full_dir / "metadata.csv" if meta == "full" else newest_meta).read_text(encoding="utf-8")
    root = make_root(_rows_cut(text, 0.7))
    cfg = Config(data_root=str(root))
    relabel(cfg, "run")
    split(cfg, "run")
    before = json.loads((root / "split_assignments.json").read_text())["patients"]

    (root / "raw" / "metadata.csv").write_text(text, encoding="utf-8", newline="")  # the new batch
    relabel(cfg, "run")
    result = split(cfg, "run")
    after = json.loads((root / "split_assignments.json").read_text())["patients"]
    assert {p: after[p] for p in before} == before
    assert result["moved_patients"] == 0 and result["new_patients"] > 20
    assert_sound_split(root, result, cfg)


# --------------------------------------------------------------------------- the newest metadata
def test_newest_metadata_vocabulary_and_malformed_rows(newest_meta: Path,
                                                       make_root: Callable[..., Path]) -> None:
    root = make_root(newest_meta.read_text(encoding="utf-8"))
    result = relabel(Config(data_root=str(root)), "run")
    report = json.loads(Path(result["report"]).read_text())
    expected = expected_relabel(root / "raw" / "metadata.csv", root / "raw" / "images")
    assert nonzero(result["dropped"]) == expected["dropped"]
    assert result["class_counts"] == expected["class_counts"]
    # pinned: 950 rows; its images are the 703 rows whose files the old data set holds
    assert report["source_rows"] == 950
    assert nonzero(result["dropped"]) == {"malformed_row": 5, "modality": 84, "placeholder_finding": 84,
                                          "view": 85, "missing_image": 110, "fallback_not_needed": 151}
    assert result["class_counts"] == {"non_covid": 114, "covid": 317}

    with open(newest_meta, newline="", encoding="utf-8") as fh:
        lines = fh.readlines()
    malformed = report["dropped_examples"]["malformed_row"]
    assert all("MERS-CoV" in lines[n - 1] for n in malformed)  # the five spilled MERS-CoV rows
    with open(root / "labeled.csv", newline="", encoding="utf-8") as fh:
        labeled = list(csv.DictReader(fh))
    assert {r["label"] for r in labeled if r["finding"] == "Pneumonia/Viral/COVID-19"} == {"covid"}
    assert all(r["label"] == "non_covid" for r in labeled if "COVID-19" not in r["finding"])
    assert any(not r["patientid"].isdigit() for r in labeled)  # ids such as '311a' survive
    assert "AP Erect" not in {r["view"] for r in labeled}
