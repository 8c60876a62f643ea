"""Repeated, patient-grouped, label-stratified k-fold assignment for cross-validation.

Groups are exactly those of ``split``: patients linked by a shared ``group_id``, file name or
identical image bytes (:func:`covid_tasks.groups.patient_groups`) stay together, so within one
repeat no patient and no image is in two folds. Labels are stratified per image with
scikit-learn's ``StratifiedGroupKFold``; each repeat reshuffles with its own seed.
"""

from __future__ import annotations

import logging
from typing import Any

from covid_tasks.config import CLASS_NAMES

logger = logging.getLogger(__name__)

FOLD_COLUMNS = ("filename", "patientid", "split_group", "label", "repeat", "fold")


def assign_folds(labeled: Any, n_folds: int = 5, n_repeats: int = 2, seed: int = 1234) -> Any:
    """Assign every image of ``labeled`` to one fold per repeat.

    Args:
        labeled: ``labeled.csv`` rows (``filename``, ``patientid``, ``label``; ``group_id`` and
            ``sha256`` when present link patients as ``split`` does).
        n_folds: folds per repeat (at least 2).
        n_repeats: independent reshuffles (at least 1).
        seed: the first repeat's shuffling seed; repeat ``r`` uses ``seed + r``.

    Returns:
        A frame with ``FOLD_COLUMNS``, one row per image and repeat, sorted by repeat, fold and
        file name.

    Raises:
        ValueError: too few folds or repeats, a file listed twice, or a fold without an image
            of some class (more folds than the smaller class has patient groups).
    """
    import numpy as np
    import pandas as pd
    from sklearn.model_selection import StratifiedGroupKFold

    from covid_tasks.groups import patient_groups

    if n_folds < 2 or n_repeats < 1:
        raise ValueError(f"need n_folds >= 2 and n_repeats >= 1, got {n_folds} and {n_repeats}")
    if labeled["filename"].duplicated().any():
        raise ValueError("labeled rows list a file twice: "
                         f"{labeled.loc[labeled['filename'].duplicated(), 'filename'].tolist()[:3]}")
    frame = labeled.reset_index(drop=True).copy()
    frame["split_group"] = frame["patientid"].map(patient_groups(frame))
    y = frame["label"].map({name: i for i, name in enumerate(CLASS_NAMES)}).to_numpy()
    parts = []
    for repeat in range(n_repeats):
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + repeat)
        fold = np.full(len(frame), -1)
        for k, (_, test_idx) in enumerate(cv.split(np.zeros(len(frame)), y, frame["split_group"])):
            fold[test_idx] = k
        part = frame[["filename", "patientid", "split_group", "label"]].assign(repeat=repeat, fold=fold)
        _check(part, n_folds, repeat)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True).sort_values(["repeat", "fold", "filename"])
    return out.reset_index(drop=True)[list(FOLD_COLUMNS)]


def _check(part: Any, n_folds: int, repeat: int) -> None:
    """Every fold holds both classes; no group spans two folds."""
    spans = part.groupby("split_group")["fold"].nunique()
    if (spans > 1).any():  # pragma: no cover - StratifiedGroupKFold guarantees it
        raise AssertionError(f"repeat {repeat}: groups in two folds: {spans[spans > 1].index.tolist()[:3]}")
    for k in range(n_folds):
        labels = set(part.loc[part["fold"] == k, "label"])
        missing = [c for c in CLASS_NAMES if c not in labels]
        if missing:
            raise ValueError(f"repeat {repeat} fold {k} has no {missing[0]} image: too many folds for "
                             f"{(part['label'] == missing[0]).sum()} such images")
