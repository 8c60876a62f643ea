"""The operating threshold: chosen on the validation split so that it survives resampling of its patients.

The plain rule, "the highest threshold whose validation sensitivity reaches the target", sits on
one covid image's score. On a small validation split that score jumps when the target moves by
a hair, or when one patient changes: lowering the target from 0.75 to 0.5 on the sample data once
moved it from 0.87 to 0.9999.

Here each threshold is placed **midway** between a score and the next lower one (any threshold
in that gap gives the same validation result; the midpoint is furthest from both), and is
**interpolated** between the achievable sensitivities: with ``P`` covid images only ``k / P`` can
be reached exactly; the midpoint rule gives ``h_k``, the highest threshold reaching ``k / P``,
and a target between ``k / P`` and ``(k + 1) / P`` gets the linear interpolation of ``h_k`` and
``h_(k+1)`` (a target of 0 gets the top score). That rule is applied to ``THRESHOLD_RESAMPLES``
patient-level bootstrap resamples of the validation split, and the operating threshold is the
**mean of those thresholds on the logit scale**. It therefore moves continuously with the target,
averages out single patients, and never leaves the range of the validation scores. Working on
logits makes the choice independent of the sigmoid's saturation, and the choice commutes with
the affine calibration ``a * z + b`` (``a > 0``): choosing on raw or on calibrated logits gives
the same decisions.

:func:`record` is ``operating_point.json``, shipped with every registered version: the threshold
and how to read the model's output.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX

THRESHOLD_RESAMPLES = 1000
THRESHOLD_RULE = (f"mean on the logit scale, over {THRESHOLD_RESAMPLES} patient-level bootstrap resamples "
                  "of the validation split, of the threshold reaching min_sensitivity + threshold_margin "
                  "(midway between scores, interpolated between achievable sensitivities)")


def highest_threshold_reaching(y_true: Sequence[int], prob: Sequence[float], min_sensitivity: float) -> float:
    """The plain rule: the highest score whose validation sensitivity still reaches ``min_sensitivity``.

    It is one of the covid images' scores, so ``prob >= threshold`` keeps at least
    ``ceil(min_sensitivity * n_covid)`` covid images positive. Kept for comparison (metrics.json's
    ``threshold_plain_rule`` and the threshold-stability benchmark).

    Raises:
        ValueError: the validation split has no covid image.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=int)
    pos = np.sort(np.asarray(prob, dtype=float)[y == POSITIVE_INDEX])[::-1]
    if len(pos) == 0:
        raise ValueError("the validation split has no covid image: cannot choose a threshold")
    k = max(1, math.ceil(min_sensitivity * len(pos) - 1e-9))
    return float(pos[k - 1])


def rule_thresholds(y_true: Any, score: Any, weights: Any, target: float) -> Any:
    """The interpolated midpoint rule's threshold for each row of bootstrap ``weights`` (B x N counts).

    Args:
        y_true: class indices.
        score: scores (logits), higher meaning covid.
        weights: how often each image is drawn, one row per resample.
        target: the sensitivity target.

    Returns:
        One threshold per row (see the module docstring).
    """
    import numpy as np

    score = np.asarray(score, dtype=float)
    distinct, group = np.unique(-score, return_inverse=True)  # groups of equal scores, highest first
    heights = -distinct
    pos = (np.asarray(y_true) == POSITIVE_INDEX).astype(float)
    w = np.atleast_2d(weights)
    n_groups = len(heights)
    out = np.empty(len(w))
    for b, row in enumerate(w):
        total = np.bincount(group, weights=row, minlength=n_groups)
        found = np.bincount(group, weights=row * pos, minlength=n_groups)
        present = total > 0
        out[b] = _interpolate(heights[present], found[present], target)
    return out


def _interpolate(heights: Any, found: Any, target: float) -> float:
    """One resample: ``heights`` descending, ``found`` the covid weight at each height."""
    import numpy as np

    lower = np.append(heights[1:], heights[-1])
    mid = (heights + lower) / 2  # midway to the next lower score; the lowest score keeps itself
    cum = np.cumsum(found)
    if cum[-1] <= 0:
        return float(heights[-1])
    reach = found > 0
    levels = np.concatenate([[0.0], cum[reach] / cum[-1]])
    thresholds = np.concatenate([[heights[0]], mid[reach]])
    return float(np.interp(target, levels, thresholds))


def choose_threshold(y_true: Sequence[int], logits: Sequence[float], patients: Sequence[Any],
                     target: float, resamples: int = THRESHOLD_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Choose the operating threshold on validation logits (see the module docstring).

    Args:
        y_true: validation class indices.
        logits: the model's validation logits (any increasing affine map of them gives the
            same decisions).
        patients: validation patient ids (the bootstrap's unit).
        target: the sensitivity target (``min_sensitivity``).
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"logit", "plain_rule_logit", "midpoint_logit", "ci95_logit", "resamples", "seed",
        "unit"}``: the chosen logit threshold, the plain rule's and the single midpoint rule's on
        the whole split, and the 95% percentile range of the resampled thresholds.

    Raises:
        ValueError: the validation split has no covid image.
    """
    import numpy as np

    from covid_tasks.stats import interval, patient_bootstrap

    y = np.asarray(y_true, dtype=int)
    z = np.asarray(logits, dtype=float)
    plain = highest_threshold_reaching(y, z, target)  # raises without covid images
    weights = patient_bootstrap(patients, y, resamples, seed)
    sampled = rule_thresholds(y, z, weights, target)
    return {
        "logit": float(sampled.mean()),
        "plain_rule_logit": plain,
        "midpoint_logit": float(rule_thresholds(y, z, np.ones((1, len(y))), target)[0]),
        "ci95_logit": interval(sampled),
        "resamples": int(resamples),
        "seed": int(seed),
        "unit": "patient",
    }


def record(metrics: dict[str, Any], run_key: str) -> dict[str, Any]:
    """``operating_point.json``: how to read the evaluated model's output (shipped with every version)."""
    cal = metrics["calibration"]
    return {
        "threshold": metrics["threshold"],
        "positive_class": CLASS_NAMES[POSITIVE_INDEX],
        "rule": metrics["threshold_rule"],
        "img_size": metrics["img_size"],
        "run_key": run_key,
        "input": "float32 RGB 0..255, shape (N, img_size, img_size, 3)",
        "output": (f"calibrated P(covid): {cal['method']} scaling fitted on the validation split"
                   if cal["method"] != "none" else "P(covid), not calibrated"),
        "calibration": ({k: cal[k] for k in ("method", "params", "fitted_on", "ece_before", "ece_after")}
                        if cal["method"] != "none" else None),
        "threshold_uncalibrated": metrics["threshold_uncalibrated"],
        "model_sha256": metrics["model_sha256"],
        "test_sensitivity": metrics["sensitivity"],
        "test_specificity": metrics["specificity"],
    }
