"""Statistics shared by evaluate's decisions: intervals, weighted (bootstrap) metrics, calibration errors.

Bootstrap resamples are represented as count matrices: row ``b`` holds how many times each image
is drawn in resample ``b``. A metric computed with those counts as sample weights equals the
metric on the resampled images, so one vectorised call scores every resample.

Resampling is by **patient**: a patient's images are drawn together, as images of one patient are
not independent. Patients are stratified by class (a patient with any covid image counts as
covid), so every resample keeps both classes and the split's prevalence.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from covid_tasks.config import POSITIVE_INDEX

#: Bins of the expected calibration error (equal width over [0, 1], as in Guo et al. 2017).
ECE_BINS = 10


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def weighted_auc(y_true: Any, prob: Any, weights: Any) -> Any:
    """ROC AUC for each row of ``weights`` (B x N sample weights): P(score_pos > score_neg), ties 1/2."""
    import numpy as np

    y, p, w = np.asarray(y_true), np.asarray(prob, dtype=float), np.atleast_2d(weights)
    pos, neg = y == POSITIVE_INDEX, y != POSITIVE_INDEX
    wins = (p[pos][:, None] > p[neg][None, :]) + 0.5 * (p[pos][:, None] == p[neg][None, :])
    wp, wn = w[:, pos], w[:, neg]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((wp @ wins) * wn).sum(axis=1) / (wp.sum(axis=1) * wn.sum(axis=1))


def weighted_average_precision(y_true: Any, prob: Any, weights: Any) -> Any:
    """Average precision for each row of ``weights``: sum over thresholds of (R_k - R_k-1) * P_k."""
    import numpy as np

    order = np.argsort(-np.asarray(prob, dtype=float), kind="mergesort")
    ys = (np.asarray(y_true)[order] == POSITIVE_INDEX).astype(float)
    ps = np.asarray(prob, dtype=float)[order]
    w = np.atleast_2d(weights)[:, order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last image of each distinct score
    tps = np.cumsum(w * ys, axis=1)[:, last]
    fps = np.cumsum(w * (1 - ys), axis=1)[:, last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
    recall = tps / tps[:, -1:]
    return (np.diff(recall, axis=1, prepend=0.0) * precision).sum(axis=1)


def weighted_rates(y_true: Any, predicted: Any, weights: Any) -> tuple[Any, Any]:
    """Sensitivity and specificity for each row of ``weights``; NaN where a class has no weight."""
    import numpy as np

    y = np.asarray(y_true) == POSITIVE_INDEX
    hit = np.asarray(predicted).astype(bool)
    w = np.atleast_2d(weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w[:, y] * hit[y]).sum(axis=1) / w[:, y].sum(axis=1)
        spec = (w[:, ~y] * ~hit[~y]).sum(axis=1) / w[:, ~y].sum(axis=1)
    return sens, spec


def patient_bootstrap(patients: Sequence[Any], y_true: Sequence[int], resamples: int, seed: int) -> Any:
    """Image weights of ``resamples`` patient-level bootstrap resamples, stratified by patient class.

    Args:
        patients: the patient id of each image.
        y_true: the class index of each image.
        resamples: number of resamples (rows).
        seed: random seed.

    Returns:
        A ``(resamples, n_images)`` float array: how often each image's patient was drawn.
    """
    import numpy as np

    ids, inverse = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    patient_class = np.zeros(len(ids), dtype=int)
    np.maximum.at(patient_class, inverse, (np.asarray(y_true) == POSITIVE_INDEX).astype(int))
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, len(ids)))
    for cls in (0, 1):
        idx = np.flatnonzero(patient_class == cls)
        if len(idx):
            counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=resamples)
    return counts[:, inverse]


def interval(values: Any, level: float = 0.95) -> list[float]:
    """Percentile interval of the finite ``values`` (``[nan, nan]`` when there are none)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return [math.nan, math.nan]
    tail = (1 - level) / 2 * 100
    return [float(x) for x in np.percentile(v, [tail, 100 - tail])]


def expected_calibration_error(y_true: Any, prob: Any, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean |mean P(covid) - covid fraction| over equal-width probability bins."""
    import numpy as np

    y = (np.asarray(y_true) == POSITIVE_INDEX).astype(float)
    p = np.asarray(prob, dtype=float)
    if not len(p):
        return math.nan
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = idx == b
        if in_bin.any():
            total += in_bin.sum() / len(p) * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


def brier_score(y_true: Any, prob: Any) -> float:
    """Mean squared difference between P(covid) and the 0/1 covid label."""
    import numpy as np

    y = (np.asarray(y_true) == POSITIVE_INDEX).astype(float)
    p = np.asarray(prob, dtype=float)
    return float(np.mean((p - y) ** 2)) if len(p) else math.nan


def sigmoid(z: Any) -> Any:
    """The logistic function, overflow-safe, in float64."""
    import numpy as np

    z = np.asarray(z, dtype=float)
    return np.exp(-np.logaddexp(0.0, -z))


def logit(p: float) -> float:
    """The inverse of :func:`sigmoid` for one probability strictly between 0 and 1."""
    return math.log(p / (1 - p))


def fmt(value: Any) -> str:
    """A figure for a log line: ``0.123``, or ``nan`` for a missing or NaN value."""
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
