"""Split stage: patient-grouped, label-stratified train/val/test split that is stable week to week.

Groups are patients, joined when they share an image file (see ``relabel._dedupe``), so no
patient and no image sits in two splits. Assignments persist in ``split_assignments.json``:
a group keeps the split it was first given, and only new groups are placed, each into the split
whose share of its class is furthest below target. The first groups of each class seed test,
val and train, so every split holds both classes whenever three groups of each exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.storage import read_json, require_file, write_csv, write_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ASSIGNMENTS = "split_assignments.json"


def split(data_root: str | Path, cfg: Config) -> dict[str, Any]:
    """Assign every group in ``labeled.csv`` to a split and write ``splits.csv`` and ``split/``.

    Args:
        data_root: the data root holding ``labeled.csv`` and ``raw/images/``.
        cfg: run configuration (``split_fractions``, ``seed``).

    Returns:
        ``{"splits_csv", "train_csv", "val_csv", "test_csv", "n_images", "n_patients",
        "n_positive", "counts", "new_groups", "report"}`` where ``counts[split][class]`` holds
        images and patients.

    Raises:
        FileNotFoundError: ``labeled.csv`` is missing.
        ValueError: some split lacks a patient of some class.
    """
    import pandas as pd

    root = Path(data_root)
    labeled = pd.read_csv(require_file(root / "labeled.csv", "relabel"), dtype=str, keep_default_na=False)
    logger.info("split: %d images, fractions=%s, seed=%d", len(labeled), cfg.split_fractions, cfg.seed)
    if "group_id" not in labeled.columns:
        labeled["group_id"] = labeled["patientid"]

    assign_path = root / ASSIGNMENTS
    previous: dict[str, str] = read_json(assign_path)["groups"] if assign_path.is_file() else {}
    assignments = _assign(labeled, previous, cfg)
    labeled["split"] = labeled["group_id"].map(assignments)

    counts = _counts(labeled)
    missing = [f"{s}/{c}" for s in SPLITS for c in CLASS_NAMES if counts[s][c]["patients"] == 0]
    if missing:
        raise ValueError(
            "split left no patient of a class in: " + ", ".join(missing)
            + f" (groups per class: {labeled.groupby('label')['group_id'].nunique().to_dict()});"
            " more patients are needed for a patient-disjoint split"
        )

    write_json(assign_path, {"seed": cfg.seed, "fractions": list(cfg.split_fractions),
                             "groups": dict(sorted(assignments.items()))})
    labeled = labeled.sort_values(["split", "label", "filename"]).reset_index(drop=True)
    write_csv(root / "splits.csv", labeled)
    paths = {}
    for s in SPLITS:
        paths[f"{s}_csv"] = str(root / f"{s}.csv")
        write_csv(paths[f"{s}_csv"], labeled[labeled["split"] == s])
    _materialise(root, labeled)

    report = {"counts": counts, "fractions": list(cfg.split_fractions), "seed": cfg.seed,
              "new_groups": len(set(assignments) - set(previous))}
    write_json(root / "split_report.json", report)
    result = {
        "splits_csv": str(root / "splits.csv"),
        **paths,
        "n_images": int(len(labeled)),
        "n_patients": int(labeled["patientid"].nunique()),
        "n_positive": int((labeled["label"] == CLASS_NAMES[1]).sum()),
        "counts": counts,
        "new_groups": report["new_groups"],
        "report": str(root / "split_report.json"),
    }
    logger.info("split: done %s", json.dumps(result))
    return result


def _assign(labeled: Any, previous: dict[str, str], cfg: Config) -> dict[str, str]:
    """Keep previous assignments; place new groups by class-wise deficit against the targets."""
    group_label = labeled.groupby("group_id")["label"].agg(lambda s: s.value_counts().idxmax())
    group_size = labeled.groupby("group_id").size()
    out = {g: previous[g] for g in group_label.index if g in previous and previous[g] in SPLITS}
    fractions = dict(zip(SPLITS, cfg.split_fractions))
    for cls in CLASS_NAMES:
        groups = [g for g in group_label.index if group_label[g] == cls]
        images = {s: 0 for s in SPLITS}
        n_groups = {s: 0 for s in SPLITS}
        for g in groups:
            if g in out:
                images[out[g]] += int(group_size[g])
                n_groups[out[g]] += 1
        new = sorted((g for g in groups if g not in out), key=lambda g: _stable_hash(cfg.seed, g))
        total = sum(int(group_size[g]) for g in groups)
        for g in new:
            empty = [s for s in ("test", "val", "train") if n_groups[s] == 0]
            if empty:
                target = empty[0]
            else:
                target = max(SPLITS, key=lambda s: fractions[s] * total - images[s])
            out[g] = target
            images[target] += int(group_size[g])
            n_groups[target] += 1
    return out


def _stable_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _counts(labeled: Any) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for s in SPLITS:
        part = labeled[labeled["split"] == s]
        counts[s] = {
            c: {"images": int((part["label"] == c).sum()),
                "patients": int(part.loc[part["label"] == c, "patientid"].nunique())}
            for c in CLASS_NAMES
        }
    return counts


def _materialise(root: Path, labeled: Any) -> None:
    """Build ``split/<split>/<class>/`` of hard links (symlinks where links fail), then swap it in."""
    images = root / "raw" / "images"
    staging = root / ".split.staging"
    shutil.rmtree(staging, ignore_errors=True)
    for s in SPLITS:
        for c in CLASS_NAMES:
            (staging / s / c).mkdir(parents=True)
    for row in labeled.itertuples(index=False):
        src = images / row.filename
        dst = staging / row.split / row.label / row.filename.replace("/", "__")
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)
    final = root / "split"
    old = root / ".split.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
