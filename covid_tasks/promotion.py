"""The gate and the champion/challenger decision, both read with their uncertainty.

* **Gate** (``gate_on``): ``point`` compares test sensitivity and specificity themselves with
  ``min_sensitivity`` / ``min_specificity``; ``lower_bound`` compares the lower end of their 95%
  Wilson intervals, so a model passes only when the test split shows it clears the floors. With
  ``min_roc_auc`` above 0, the lower end of test ROC AUC's 95% bootstrap interval must reach it
  too (0.5: the test split shows the model ranks better than chance).
* **Promotion**: the challenger and the champion are scored on the same test images. Patients are
  resampled ``PROMOTION_RESAMPLES`` times (seeded, stratified by class) and, in each resample,
  the challenger-minus-champion difference of ROC AUC, and of sensitivity and specificity each at
  the model's own threshold, is computed. The challenger is promoted when it passes the gate and
  the lower end of the 95% percentile interval of every difference is at least
  ``-promotion_margin`` (non-inferiority). With no champion, the gate alone decides.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from covid_tasks.config import GATE_ON
from covid_tasks.stats import fmt

PROMOTION_RESAMPLES = 2000
#: Differences compared between challenger and champion.
DELTA_METRICS = ("roc_auc", "sensitivity", "specificity")
RULE_GATE = "gate"
RULE_FIRST = "gate_only_no_champion"
RULE_PAIRED = "paired_patient_bootstrap_noninferiority"
RULE_AUDIT = "shortcut_audit"
RULE_DATA = "data_check_warning"


def gate(metrics: dict[str, Any], min_sensitivity: float, min_specificity: float,
         gate_on: str = "point", min_roc_auc: float = 0.0) -> list[str]:
    """The gate's failed checks on test metrics (empty when it passes); NaN fails.

    Args:
        metrics: test metrics with ``sensitivity``, ``specificity``, ``roc_auc`` and their ``_ci95``.
        min_sensitivity: floor for sensitivity.
        min_specificity: floor for specificity.
        gate_on: ``point`` (the estimates) or ``lower_bound`` (the Wilson lower bounds).
        min_roc_auc: floor for the lower end of ROC AUC's 95% interval (0: not checked).

    Raises:
        ValueError: an unknown ``gate_on``.
    """
    if gate_on not in GATE_ON:
        raise ValueError(f"gate_on must be one of {GATE_ON}, got {gate_on!r}")
    reasons = []
    for name, bound in (("sensitivity", min_sensitivity), ("specificity", min_specificity)):
        value = metrics[name] if gate_on == "point" else (metrics.get(f"{name}_ci95") or [None])[0]
        label = name if gate_on == "point" else f"{name} 95% lower bound"
        if not (value is not None and not _nan(value) and value >= bound):
            reasons.append(f"{label} {fmt(value)} < min_{name} {bound:.3f}")
    if min_roc_auc > 0:
        ci = metrics.get("roc_auc_ci95")
        low = ci[0] if isinstance(ci, (list, tuple)) and ci else None  # NaN: a class is missing
        if not (low is not None and not _nan(low) and low >= min_roc_auc):
            reasons.append(f"ROC AUC 95% lower bound {fmt(low)} < min_roc_auc {min_roc_auc:.3f}")
    return reasons


def paired_deltas(y_true: Sequence[int], patients: Sequence[Any], challenger: tuple[Any, float],
                  champion: tuple[Any, float], resamples: int = PROMOTION_RESAMPLES,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Challenger minus champion on the same images, with patient-bootstrap 95% intervals.

    Args:
        y_true: test class indices.
        patients: test patient ids.
        challenger: ``(P(covid) per image, threshold)``.
        champion: the same for the champion (its own output and threshold).
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{metric: {"point", "ci95": [lo, hi]}}`` for ``roc_auc``, ``sensitivity``,
        ``specificity``; NaN where the metric is undefined (a class absent).
    """
    import numpy as np

    from covid_tasks.stats import interval, patient_bootstrap, weighted_auc, weighted_rates

    y = np.asarray(y_true, dtype=int)
    weights = np.vstack([np.ones((1, len(y))), patient_bootstrap(patients, y, resamples, seed)])
    values = {}
    for side, (prob, threshold) in (("challenger", challenger), ("champion", champion)):
        p = np.asarray(prob, dtype=float)
        sens, spec = weighted_rates(y, p >= threshold, weights)
        values[side] = {"roc_auc": weighted_auc(y, p, weights), "sensitivity": sens, "specificity": spec}
    out = {}
    for name in DELTA_METRICS:
        diff = values["challenger"][name] - values["champion"][name]
        out[name] = {"point": float(diff[0]), "ci95": interval(diff[1:])}
    return out


def decide(gate_reasons: list[str], deltas: dict[str, dict[str, Any]] | None, champion_version: str | None,
           margin: float, audit: dict[str, Any], audit_blocks: bool,
           data_warning: str | None = None) -> dict[str, Any]:
    """The promotion decision and the rule that made it.

    Args:
        gate_reasons: the gate's failed checks.
        deltas: :func:`paired_deltas`' result, ``None`` without a champion.
        champion_version: the champion compared against, ``None`` without one.
        margin: the non-inferiority margin (``promotion_margin``).
        audit: the shortcut audit's result (its ``warning``).
        audit_blocks: whether an audit warning blocks promotion.
        data_warning: the data checks' summary when their verdict was ``warn``: the model may
            become challenger, never champion, until a person promotes it.

    Returns:
        ``{"rule", "metric_deltas", "margin", "promoted", "reason", "reasons", "champion_version"}``;
        ``reasons`` lists every failed condition, ``reason`` is one sentence.
    """
    out: dict[str, Any] = {"metric_deltas": deltas, "margin": margin, "champion_version": champion_version,
                           "resamples": PROMOTION_RESAMPLES if deltas is not None else 0, "unit": "patient"}
    if gate_reasons:
        return {**out, "rule": RULE_GATE, "promoted": False, "reasons": list(gate_reasons),
                "reason": "gate failed: " + "; ".join(gate_reasons)}
    if data_warning:
        return {**out, "rule": RULE_DATA, "promoted": False, "reasons": [data_warning],
                "reason": "the data checks warned, so a person must promote this model: " + data_warning}
    if audit.get("warning") and audit_blocks:
        return {**out, "rule": RULE_AUDIT, "promoted": False, "reasons": [audit["warning"]],
                "reason": "shortcut audit blocks promotion: " + audit["warning"]}
    if deltas is None:
        return {**out, "rule": RULE_FIRST, "promoted": True, "reasons": [],
                "reason": "no champion yet: the gate alone decides, and it passed"}
    reasons = []
    for name in DELTA_METRICS:
        low = deltas[name]["ci95"][0]
        if _nan(low):
            continue  # undefined on this test split: cannot block
        if low < -margin - 1e-12:
            reasons.append(f"{name}: lower 95% bound of challenger - champion v{champion_version} is "
                           f"{low:+.3f} < -margin {-margin:+.3f}")
    if reasons:
        return {**out, "rule": RULE_PAIRED, "promoted": False, "reasons": reasons,
                "reason": "not shown non-inferior to the champion: " + "; ".join(reasons)}
    summary = ", ".join(f"{n} {d['point']:+.3f} [{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]"
                        for n, d in ((n, deltas[n]) for n in DELTA_METRICS))
    return {**out, "rule": RULE_PAIRED, "promoted": True, "reasons": [],
            "reason": f"non-inferior to champion v{champion_version} within margin {margin:.3f}: {summary}"}


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
