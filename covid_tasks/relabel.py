"""Relabel stage: turn upstream ``metadata.csv`` rows into a two-class table, ``labeled.csv``.

The rules are declarative (see ``RULES``) and every dropped row is counted by reason in
``relabel_report.json``. Labels follow torchxrayvision's COVID19_Dataset handling: findings are
split into tokens (old flat ``COVID-19, ARDS`` and new hierarchical ``Pneumonia/Viral/COVID-19``
both work), placeholder findings are dropped, and any COVID-19 token makes the row ``covid``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.storage import UnsafePathError, require_file, safe_relpath, write_csv, write_json

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
COVID_TOKENS = frozenset({"covid-19", "covid19", "sars-cov-2"})
PLACEHOLDER_FINDINGS = frozenset({"todo", "unknown", ""})
KEEP_MODALITY = "X-ray"

#: The rule table, in the order the rules apply; the README repeats it.
RULES: tuple[tuple[str, str], ...] = (
    ("missing_patientid", "drop rows with an empty patientid"),
    ("unsafe_filename", "drop rows whose filename is absolute, contains '..' or is empty"),
    ("modality", f"keep modality '{KEEP_MODALITY}' only (drops CT and anything else)"),
    ("placeholder_finding", "drop findings 'todo', 'Unknown' and empty"),
    ("view", "keep the configured views (default PA, AP); 'AP Supine' only as a per-class fallback"),
    ("missing_image", "drop rows whose image is not under raw/images"),
    ("duplicate_filename", "keep one row per image file; a file filed under two patients links them"),
    ("conflicting_label", "drop an image whose duplicate rows disagree on the class"),
)


def finding_tokens(finding: str) -> list[str]:
    """Split a finding into lower-case tokens on '/' and ','."""
    return [t.strip().lower() for t in re.split(r"[/,]", finding or "") if t.strip()]


def label_for(finding: str) -> str | None:
    """``covid`` when any token is COVID-19, ``None`` for placeholders, else ``non_covid``."""
    tokens = finding_tokens(finding)
    if not tokens or all(t in PLACEHOLDER_FINDINGS for t in tokens):
        return None
    return CLASS_NAMES[1] if any(t in COVID_TOKENS for t in tokens) else CLASS_NAMES[0]


def relabel(data_root: str | Path, cfg: Config) -> dict[str, Any]:
    """Apply the rule table to ``raw/metadata.csv`` and write ``labeled.csv``.

    Args:
        data_root: the data root holding ``raw/metadata.csv`` and ``raw/images/``.
        cfg: run configuration (``views``, ``fallback_views``, ``min_images_per_class``).

    Returns:
        ``{"labeled_csv", "n_images", "n_patients", "class_counts", "dropped", "fallback_used",
        "report"}``.

    Raises:
        FileNotFoundError: ``raw/metadata.csv`` is missing.
        ValueError: required columns are missing, or no image of some class is left.
    """
    import pandas as pd

    root = Path(data_root)
    meta_path = require_file(root / "raw" / "metadata.csv", "pull")
    logger.info("relabel: reading %s (views=%s, fallback=%s)", meta_path, cfg.views, cfg.fallback_views)
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False, on_bad_lines="warn")
    meta.columns = [str(c).strip() for c in meta.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"{meta_path} lacks required column(s): {', '.join(missing)}")
    frame = meta[list(REQUIRED_COLUMNS)].copy()
    for col in REQUIRED_COLUMNS:
        frame[col] = frame[col].astype(str).str.strip()
    dropped: dict[str, int] = {reason: 0 for reason, _ in RULES}

    def drop(mask: Any, reason: str) -> None:
        nonlocal frame
        dropped[reason] += int(mask.sum())
        frame = frame[~mask]

    drop(frame["patientid"] == "", "missing_patientid")
    drop(~frame["filename"].map(_is_safe), "unsafe_filename")
    drop(frame["modality"] != KEEP_MODALITY, "modality")
    frame["label"] = frame["finding"].map(label_for)
    drop(frame["label"].isna(), "placeholder_finding")

    allowed = set(cfg.views) | set(cfg.fallback_views)
    drop(~frame["view"].isin(allowed), "view")
    images = root / "raw" / "images"
    drop(~frame["filename"].map(lambda f: (images / f).is_file()), "missing_image")

    fallback_used: dict[str, bool] = {}
    primary = frame["view"].isin(set(cfg.views))
    keep = primary.copy()
    for cls in CLASS_NAMES:
        n_primary = int((primary & (frame["label"] == cls)).sum())
        use = n_primary < cfg.min_images_per_class and bool(cfg.fallback_views)
        fallback_used[cls] = use
        if use:
            keep |= (frame["label"] == cls) & frame["view"].isin(set(cfg.fallback_views))
    drop(~keep, "view")

    frame, n_dup, n_conflict, groups = _dedupe(frame)
    dropped["duplicate_filename"] += n_dup
    dropped["conflicting_label"] += n_conflict
    frame["group_id"] = frame["patientid"].map(groups)
    frame = frame.sort_values(["group_id", "patientid", "filename"]).reset_index(drop=True)

    class_counts = {cls: int((frame["label"] == cls).sum()) for cls in CLASS_NAMES}
    empty = [cls for cls, n in class_counts.items() if n == 0]
    if empty:
        raise ValueError(f"relabel left no image of class(es) {empty}; dropped by reason: {dropped}")

    out = root / "labeled.csv"
    write_csv(out, frame[["filename", "patientid", "group_id", "finding", "view", "modality", "label"]])
    report = {
        "source_rows": int(len(meta)),
        "kept": int(len(frame)),
        "dropped": dropped,
        "class_counts": class_counts,
        "view_counts": {str(k): int(v) for k, v in frame["view"].value_counts().sort_index().items()},
        "fallback_used": fallback_used,
        "min_images_per_class": cfg.min_images_per_class,
        "rules": [{"reason": r, "rule": t} for r, t in RULES],
    }
    write_json(root / "relabel_report.json", report)
    result = {
        "labeled_csv": str(out),
        "n_images": int(len(frame)),
        "n_patients": int(frame["patientid"].nunique()),
        "class_counts": class_counts,
        "dropped": dropped,
        "fallback_used": fallback_used,
        "report": str(root / "relabel_report.json"),
    }
    logger.info("relabel: done %s", json.dumps(result))
    return result


def _is_safe(name: str) -> bool:
    try:
        safe_relpath(name)
        return True
    except UnsafePathError:
        return False


def _dedupe(frame: Any) -> tuple[Any, int, int, dict[str, str]]:
    """Keep one row per file name; link patients that share a file into one split group.

    Returns the deduplicated frame, the number of duplicate rows dropped, the number of rows
    dropped for conflicting labels, and a patientid -> group id map (union-find over shared files).
    """
    parent: dict[str, str] = {p: p for p in frame["patientid"]}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for _, pids in frame.groupby("filename")["patientid"]:
        pids = list(pids)
        for other in pids[1:]:
            a, b = find(pids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups = {p: find(p) for p in parent}

    labels_per_file = frame.groupby("filename")["label"].nunique()
    conflicting = set(labels_per_file[labels_per_file > 1].index)
    n_conflict = int(frame["filename"].isin(conflicting).sum())
    frame = frame[~frame["filename"].isin(conflicting)]
    before = len(frame)
    frame = frame.drop_duplicates(subset="filename", keep="first")
    return frame.copy(), before - len(frame), n_conflict, groups
