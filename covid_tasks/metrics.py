"""Binary classification metrics with COVID as the positive class, and their uncertainty.

The confusion matrix is always built with explicit labels ``[0, 1]`` so its cells cannot be
swapped by the data's class order: rows are the true class, columns the predicted class,
``[[tn, fp], [fn, tp]]``. Sensitivity is COVID recall, specificity is non-COVID recall. Each
proportion gets a 95% Wilson interval; ROC AUC and PR AUC get a 95% stratified percentile
bootstrap interval (``BOOTSTRAP_RESAMPLES`` resamples, seeded).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX
from covid_tasks.stats import weighted_auc, weighted_average_precision, wilson_interval

BOOTSTRAP_RESAMPLES = 1000


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, int]:
    """Counts ``tp, fn, tn, fp`` with covid (1) as the positive class.

    Args:
        y_true: true class indices (0 non_covid, 1 covid).
        y_pred: predicted class indices.

    Returns:
        ``{"tp", "fn", "tn", "fp"}`` as ints.
    """
    from sklearn.metrics import confusion_matrix

    (tn, fp), (fn, tp) = confusion_matrix(list(y_true), list(y_pred), labels=[0, POSITIVE_INDEX]).tolist()
    return {"tp": int(tp), "fn": int(fn), "tn": int(tn), "fp": int(fp)}


def bootstrap_auc_intervals(y_true: Sequence[int], prob: Sequence[float],
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile bootstrap intervals for ROC AUC and PR AUC (average precision).

    The bootstrap is stratified: each resample draws the covid and the non_covid images with
    replacement separately, so every resample keeps both classes and the test prevalence. A
    resample is a vector of per-image counts; ROC AUC and average precision are computed with
    those counts as sample weights, which equals scikit-learn's ``roc_auc_score`` and
    ``average_precision_score`` on the resampled images.

    Args:
        y_true: true class indices.
        prob: P(covid) per image.
        resamples: number of bootstrap resamples; 0 gives NaN intervals.
        seed: random seed.

    Returns:
        ``{"roc_auc_ci95": [lo, hi], "pr_auc_ci95": [lo, hi]}``; NaN when a class is absent.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    pos_idx, neg_idx = np.flatnonzero(y == POSITIVE_INDEX), np.flatnonzero(y != POSITIVE_INDEX)
    nan = [math.nan, math.nan]
    if resamples <= 0 or len(pos_idx) == 0 or len(neg_idx) == 0:
        return {"roc_auc_ci95": nan, "pr_auc_ci95": nan}
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(y)))
    for idx in (pos_idx, neg_idx):
        weights[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=resamples)
    roc, pr = weighted_auc(y, p, weights), weighted_average_precision(y, p, weights)
    return {"roc_auc_ci95": np.percentile(roc, [2.5, 97.5]).tolist(),
            "pr_auc_ci95": np.percentile(pr, [2.5, 97.5]).tolist()}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Every test metric at ``threshold`` (predict covid when ``prob >= threshold``), covid positive.

    Args:
        y_true: true class indices (0 non_covid, 1 covid).
        prob: P(covid) per image.
        threshold: the operating threshold.
        resamples: bootstrap resamples for the AUC intervals.
        seed: bootstrap seed.

    Returns:
        Counts (``tp, fn, tn, fp, n``), ``sensitivity``, ``specificity``, ``ppv``, ``npv``,
        ``accuracy`` (each with a ``<name>_ci95`` Wilson interval), ``balanced_accuracy``,
        ``f1_covid``, ``f1_non_covid``, ``roc_auc`` and ``pr_auc`` (with bootstrap
        ``_ci95``), and ``threshold``. Undefined values (a zero denominator, one class only)
        are NaN.
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    pred = (p >= threshold).astype(int)
    c = confusion(y, pred)
    tp, fn, tn, fp = c["tp"], c["fn"], c["tn"], c["fp"]
    both = len(set(y.tolist())) == 2
    out: dict[str, Any] = {
        **c,
        "n": int(len(y)),
        "threshold": float(threshold),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, len(y)),
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
    }
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    out["f1_covid"] = _ratio(2 * tp, 2 * tp + fp + fn)
    out["f1_non_covid"] = _ratio(2 * tn, 2 * tn + fn + fp)
    for name, (k, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                         "ppv": (tp, tp + fp), "npv": (tn, tn + fn), "accuracy": (tp + tn, len(y))}.items():
        out[f"{name}_ci95"] = list(wilson_interval(k, n))
    out.update(bootstrap_auc_intervals(y, p, resamples, seed))
    return out


def classification_report(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """scikit-learn's report with explicit labels ``[0, 1]`` and names ``non_covid``, ``covid``.

    Returns:
        The text report and the same as a dict (``{"covid": {"recall": ..., "support": ...}}``).
    """
    from sklearn.metrics import classification_report as report

    kwargs = {"labels": list(range(len(CLASS_NAMES))), "target_names": list(CLASS_NAMES),
              "zero_division": 0}
    return (report(list(y_true), list(y_pred), digits=3, **kwargs),
            report(list(y_true), list(y_pred), output_dict=True, **kwargs))


