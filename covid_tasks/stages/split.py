"""Split stage: patient-grouped, label-stratified train/val/test split that is stable week to week.

Method (defaults: ``cfg.split_fractions`` 70/15/15, ``cfg.seed`` 1234):

* **Groups.** A group is a set of patients linked by a shared image (``group_id`` from
  ``relabel``: a shared file name or identical bytes); links are re-derived here from
  ``group_id``, ``filename`` and ``sha256``. A group, with every image of every patient in it,
  lands in exactly one split, so no patient and no image is in two splits.
* **Stability.** ``split_assignments.json`` persists ``patientid -> split`` for every patient
  ever assigned (also ones that later leave the data). A group whose patients were assigned
  before keeps their split; only groups of new patients are placed. The one exception is a new
  link (a new row files one image under two patients that sat in different splits): the merged
  group goes to the most protected of their splits (test, then val, then train), so the test set
  never loses a patient, and the move is logged and listed in the report (``moved_patients``).
* **Placement of new groups.** First, each split that holds no patient of a class gets the
  smallest new group whose majority label is that class (test, then val, then train; ties by a
  seeded hash), so every split holds both classes. Then the remaining new groups, largest first
  (ties by the seeded hash), each go to the split where they most reduce the L1 distance between
  the images per split and class and the targets (``fraction * images of the class``). A group
  with images of both classes is stratified by its majority label (ties: ``covid``) when seeding,
  and its images count towards their own classes when balancing.
* **Failure.** When some split ends without a patient of some class, the task fails with a
  ``ValueError`` naming the split, the class and the counts; nothing is written.

``new_groups``, ``new_patients`` and ``moved_patients`` in the result and report count what this
call changed in ``split_assignments.json``; a re-run on the same data reports zero and writes
byte-identical split files.

Outputs: ``splits.csv`` (``labeled.csv`` plus ``split_group`` and ``split``), ``train.csv``, ``val.csv``,
``test.csv``, ``split_assignments.json``, ``split_report.json`` and ``split/<split>/<class>/``
of hard links to ``raw/images`` (relative symlinks where hard links fail), never copies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.groups import patient_groups
from covid_tasks.layout import SPLITS, DataRoot
from covid_tasks.storage import read_json, require_file, safe_relpath, write_csv, write_json

logger = logging.getLogger(__name__)

#: Which split a group keeps when a new link merges patients from different splits.
PRECEDENCE = ("test", "val", "train")
ASSIGNMENTS_VERSION = 2


def split(cfg: Config, run_key: str) -> dict[str, Any]:
    """Assign every patient group in ``labeled.csv`` to a split; write the split files and links.

    Args:
        cfg: run configuration (``data_root``, ``split_fractions``, ``seed``).
        run_key: this run's key (unused: the split is shared by every run).

    Returns:
        ``{"splits_csv", "train_csv", "val_csv", "test_csv", "n_images", "n_patients",
        "n_positive", "counts", "new_groups", "new_patients", "moved_patients", "report"}`` where
        ``counts[split][class]`` is ``{"images", "patients"}``.

    Raises:
        FileNotFoundError: ``labeled.csv`` or an image it names is missing.
        ValueError: ``labeled.csv`` is empty, lacks columns, has unknown labels or a file twice;
            ``split_assignments.json`` is unreadable; or some split lacks a patient of some class.
    """
    import pandas as pd

    root = DataRoot.of(cfg)
    labeled = pd.read_csv(require_file(root.labeled, "relabel"), dtype=str, keep_default_na=False)
    logger.info("split: %s, %d images, fractions=%s, seed=%d", root.root, len(labeled),
                list(cfg.split_fractions), cfg.seed)
    _validate(labeled, root)

    groups = patient_groups(labeled)
    labeled["split_group"] = labeled["patientid"].map(groups)
    assign_path = root.split_assignments
    previous = _load_assignments(assign_path, cfg)
    group_split, moved = _inherit(groups, previous)
    new_groups = sorted(set(groups.values()) - set(group_split))
    group_split.update(_place(labeled, group_split, new_groups, cfg))
    labeled["split"] = labeled["split_group"].map(group_split)

    counts = _counts(labeled)
    _require_both_classes(labeled, counts)

    patients = {p: group_split[g] for p, g in groups.items()}
    new_patients = sorted(set(patients) - set(previous))
    labeled = labeled.sort_values(["split", "label", "filename"]).reset_index(drop=True)
    paths = {"splits_csv": str(root.splits)}
    write_csv(paths["splits_csv"], labeled)
    for s in SPLITS:
        paths[f"{s}_csv"] = str(root.split_csv(s))
        write_csv(paths[f"{s}_csv"], labeled[labeled["split"] == s])
    links = _materialise(root, labeled)
    write_json(assign_path, {
        "version": ASSIGNMENTS_VERSION,
        "seed": cfg.seed,
        "fractions": list(cfg.split_fractions),
        "patients": dict(sorted({**previous, **patients}.items())),
    })

    report = {
        "counts": counts,
        "totals": {s: {"images": int((labeled["split"] == s).sum()),
                       "patients": int(labeled.loc[labeled["split"] == s, "patientid"].nunique()),
                       "groups": int(labeled.loc[labeled["split"] == s, "split_group"].nunique())}
                   for s in SPLITS},
        "image_fractions": _fractions(counts),
        "target_fractions": dict(zip(SPLITS, cfg.split_fractions, strict=True)),
        "seed": cfg.seed,
        "n_groups": len(set(groups.values())),
        "mixed_class_groups": sorted(g for g, n in labeled.groupby("split_group")["label"].nunique().items()
                                     if n > 1),
        "new_groups": len(new_groups),
        "new_patients": len(new_patients),
        "kept_patients": len(set(patients) & set(previous)),
        "moved_patients": moved,
        "links": links,
    }
    write_json(root.split_report, report)
    result = {
        **paths,
        "n_images": int(len(labeled)),
        "n_patients": int(labeled["patientid"].nunique()),
        "n_positive": int((labeled["label"] == CLASS_NAMES[1]).sum()),
        "counts": counts,
        "new_groups": len(new_groups),
        "new_patients": len(new_patients),
        "moved_patients": len(moved),
        "report": str(root.split_report),
    }
    logger.info("split: done %s", json.dumps(result))
    return result


# ------------------------------------------------------------------------------------- inputs
def _validate(labeled: Any, root: DataRoot) -> None:
    """Fail early on a ``labeled.csv`` the split cannot use safely."""
    missing = [c for c in ("filename", "patientid", "label") if c not in labeled.columns]
    if missing:
        raise ValueError(f"{root.labeled} lacks column(s) {missing}: run 'relabel' again")
    if labeled.empty:
        raise ValueError(f"{root.labeled} has no rows: nothing to split")
    bad = sorted(set(labeled["label"]) - set(CLASS_NAMES))
    if bad:
        raise ValueError(f"{root.labeled} has unknown label(s) {bad}; expected {CLASS_NAMES}")
    if (labeled["patientid"] == "").any():
        raise ValueError(f"{root.labeled} has rows without a patientid: run 'relabel' again")
    twice = labeled.loc[labeled["filename"].duplicated(), "filename"].tolist()
    if twice:
        raise ValueError(f"{root.labeled} lists file(s) {twice[:5]} more than once: "
                         "run 'relabel' again")
    images = root.images
    absent = [f for f in labeled["filename"] if not (images / safe_relpath(f)).is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) named in labeled.csv are not under {images}, "
                                f"e.g. {absent[:3]}: run 'relabel' again")


def _load_assignments(path: Path, cfg: Config) -> dict[str, str]:
    """The persisted ``patientid -> split`` map (empty on the first run)."""
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
        persisted = data.get("patients", data.get("groups", {}))  # "groups": the first layout
        if not isinstance(persisted, dict):
            raise TypeError("'patients' is not an object")
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); fix or delete it (deleting re-splits every "
                         "patient, so test metrics stop being comparable with earlier runs)") from exc
    if data.get("seed") != cfg.seed or list(data.get("fractions", [])) != list(cfg.split_fractions):
        logger.warning("split: %s was made with seed=%s fractions=%s; its assignments are kept and only "
                       "new patients follow seed=%d fractions=%s", path, data.get("seed"),
                       data.get("fractions"), cfg.seed, list(cfg.split_fractions))
    bad = sorted(p for p, s in persisted.items() if s not in SPLITS)
    if bad:
        raise ValueError(f"{path} assigns patient(s) {bad[:5]} to unknown splits; expected {SPLITS}")
    return {str(p): str(s) for p, s in persisted.items()}


# ---------------------------------------------------------------------------------- placement
def _inherit(groups: dict[str, str], previous: dict[str, str]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Give each group holding previously assigned patients their split.

    Returns the group -> split map for those groups, and the patients that must move because a
    new link merged patients from different splits (``{"patientid", "from", "to"}``).
    """
    members: dict[str, list[str]] = defaultdict(list)
    for pid, group in groups.items():
        members[group].append(pid)
    out: dict[str, str] = {}
    moved: list[dict[str, str]] = []
    for group, pids in sorted(members.items()):
        before = {previous[p] for p in pids if p in previous}
        if not before:
            continue
        target = next(s for s in PRECEDENCE if s in before)
        out[group] = target
        for pid in sorted(pids):
            if pid in previous and previous[pid] != target:
                moved.append({"patientid": pid, "from": previous[pid], "to": target})
    if moved:
        logger.warning("split: %d patient(s) moved because new rows link them to patients of another "
                       "split: %s", len(moved), moved[:10])
    return out, moved


def _place(labeled: Any, fixed: dict[str, str], new_groups: list[str], cfg: Config) -> dict[str, str]:
    """Place new groups: first fill splits lacking a class, then balance images per class."""
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CLASS_NAMES, 0))
    for g, c in zip(labeled["split_group"].tolist(), labeled["label"].tolist(), strict=True):
        sizes[g][c] += 1
    totals = {c: sum(sizes[g][c] for g in sizes) for c in CLASS_NAMES}
    fractions = dict(zip(SPLITS, cfg.split_fractions, strict=True))
    target = {s: {c: fractions[s] * totals[c] for c in CLASS_NAMES} for s in SPLITS}
    current = {s: {c: 0 for c in CLASS_NAMES} for s in SPLITS}
    has_class = {s: {c: False for c in CLASS_NAMES} for s in SPLITS}
    out: dict[str, str] = {}

    def count(group: str, s: str) -> None:
        for c in CLASS_NAMES:
            current[s][c] += sizes[group][c]
            has_class[s][c] = has_class[s][c] or sizes[group][c] > 0

    def put(group: str, s: str) -> None:
        out[group] = s
        count(group, s)

    for group, s in fixed.items():
        count(group, s)

    def rank(g: str) -> str:
        return hashlib.sha256(f"{cfg.seed}:{g}".encode()).hexdigest()

    def majority(g: str) -> str:
        # ties go to the later class in CLASS_NAMES, i.e. covid
        return max(reversed(CLASS_NAMES), key=lambda c: sizes[g][c])

    pending = set(new_groups)
    for c in CLASS_NAMES:
        for s in PRECEDENCE:
            if has_class[s][c]:
                continue
            choices = sorted((g for g in pending if majority(g) == c),
                             key=lambda g: (sum(sizes[g].values()), rank(g)))
            if choices:
                put(choices[0], s)
                pending.discard(choices[0])

    def cost(g: str, s: str) -> tuple[float, float, int]:
        delta = sum(abs(current[s][c] + sizes[g][c] - target[s][c]) - abs(current[s][c] - target[s][c])
                    for c in CLASS_NAMES)
        m = majority(g)
        relative_fill = current[s][m] / target[s][m] if target[s][m] else float("inf")
        return delta, relative_fill, SPLITS.index(s)

    for g in sorted(pending, key=lambda g: (-sum(sizes[g].values()), rank(g))):
        put(g, min(SPLITS, key=lambda s: cost(g, s)))
    return out


# ------------------------------------------------------------------------------------- checks
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


def _fractions(counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Share of each class's images that each split holds."""
    totals = {c: sum(counts[s][c]["images"] for s in SPLITS) for c in CLASS_NAMES}
    return {s: {c: round(counts[s][c]["images"] / totals[c], 4) if totals[c] else 0.0 for c in CLASS_NAMES}
            for s in SPLITS}


def _require_both_classes(labeled: Any, counts: dict[str, dict[str, dict[str, int]]]) -> None:
    """Raise when a split has no patient of a class, naming the split, the class and the counts."""
    empty = [(s, c) for s in SPLITS for c in CLASS_NAMES if counts[s][c]["patients"] == 0]
    if not empty:
        return
    groups = labeled.groupby("label")["split_group"].nunique().to_dict()
    patients = {s: {c: counts[s][c]["patients"] for c in CLASS_NAMES} for s in SPLITS}
    missing = "; ".join(f"split '{s}' has no patient of class '{c}'" for s, c in empty)
    raise ValueError(
        f"{missing} (patients per split and class: {patients}; patient groups per class: {groups}); "
        f"a patient-disjoint split needs at least {len(SPLITS)} patient groups of each class"
    )


# -------------------------------------------------------------------------------------- links
def _materialise(root: DataRoot, labeled: Any) -> dict[str, int]:
    """Build ``split/<split>/<class>/<filename>`` as hard links, then swap it in.

    Falls back to a relative symlink where a hard link is impossible (another file system, or a
    file system without hard links); never copies. Returns how many links of each kind it made.
    """
    images = root.images.resolve()
    staging = root.root.resolve() / ".split.staging"
    shutil.rmtree(staging, ignore_errors=True)
    for s in SPLITS:
        for c in CLASS_NAMES:
            (staging / s / c).mkdir(parents=True)
    made = {"hard": 0, "symbolic": 0}
    for name, s, c in zip(labeled["filename"].tolist(), labeled["split"].tolist(), labeled["label"].tolist(),
                          strict=True):
        rel = safe_relpath(name)
        src, dst = images / rel, staging / s / c / rel
        if "/" in rel:
            dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            made["hard"] += 1
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            os.symlink(os.path.relpath(src.resolve(), dst.parent), dst)
            made["symbolic"] += 1
    final = root.split_links
    old = root.root / ".split.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    if made["symbolic"]:
        logger.warning("split: %d image(s) linked symbolically (hard links impossible)", made["symbolic"])
    return made
