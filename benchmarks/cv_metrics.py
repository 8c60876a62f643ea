"""Figures of a cross-validated configuration, computed only from its saved out-of-fold predictions.

Input: ``predictions.csv`` with one row per image and repeat: ``filename, patientid, label, fold,
repeat, prob_covid`` (the fold model's P(covid) on the held-out image), ``threshold`` (the
operating threshold the fold chose on its own training part) and, where measured,
``prob_covid_lungs_hidden`` / ``prob_covid_outside_hidden`` (the same model on the occluded
image, see ``covid_tasks.occlusion``) and, for probes, ``prob_covid_lungs_hidden_retrained`` (a probe
trained *and* scored with the lungs hidden: what there is to learn outside the lungs).

* **Pooled AUC**: each repeat's out-of-fold predictions pooled into one ROC AUC; the figure is the
  mean over repeats. Its 95% interval resamples *patients* (all their images move together; the
  same resample for every repeat) and takes the 2.5/97.5 percentiles of the repeat-mean AUC.
* **Fold AUC**: mean and standard deviation of the per-fold AUCs over all folds of all repeats.
* **Specificity at sensitivity s**: on each repeat's pooled ROC, the best specificity among
  thresholds reaching sensitivity s; mean over repeats.
* **At the chosen threshold**: sensitivity and specificity of the pooled confusion matrix, each
  image classified at its own fold's threshold; mean over repeats. ``gate`` is whether both clear
  the default gate (0.80 / 0.70).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from covid_tasks.stats import weighted_auc

BOOTSTRAP = 2000
GATE = (0.80, 0.70)
VIEW_COLUMNS = {"lungs_hidden": "prob_covid_lungs_hidden", "outside_hidden": "prob_covid_outside_hidden",
                "lungs_hidden_retrained": "prob_covid_lungs_hidden_retrained"}


def auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC (ties 1/2) for each row of weights ``w`` (B x N; one unweighted row by default)."""
    return weighted_auc(np.asarray(y, int), p, np.ones((1, len(y))) if w is None else w)


def spec_at_sens(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The best specificity among thresholds whose sensitivity reaches ``target``."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    pos = np.sort(p[y == 1])[::-1]
    k = max(1, int(np.ceil(target * len(pos) - 1e-9)))
    threshold = pos[k - 1]
    return float((p[y == 0] < threshold).mean())


def _patient_weights(patients: pd.Series, rounds: int, seed: int) -> np.ndarray:
    """B x N image weights from resampling patients with replacement."""
    codes, uniques = pd.factorize(patients)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), size=rounds)
    return counts[:, codes].astype(float)


def summarise(preds: pd.DataFrame, rounds: int = BOOTSTRAP, seed: int = 1234) -> dict[str, Any]:
    """Every figure of one configuration from its out-of-fold predictions.

    Args:
        preds: the configuration's ``predictions.csv``.
        rounds: patient bootstrap resamples for the interval.
        seed: bootstrap seed.

    Returns:
        ``roc_auc``, ``roc_auc_ci95``, ``fold_auc_mean``, ``fold_auc_std``, ``spec_at_sens80``,
        ``spec_at_sens90``, ``sensitivity``, ``specificity``, ``gate``, and per occluded view
        ``roc_auc_<view>`` (with ``_ci95``) and ``auc_drop_<view>``; ``n_images``, ``n_patients``,
        ``n_folds``, ``n_repeats``.
    """
    preds = preds.copy()
    preds["y"] = (preds["label"] == "covid").astype(int)
    repeats = sorted(preds["repeat"].unique())
    first = preds[preds["repeat"] == repeats[0]].sort_values("filename")
    weights = _patient_weights(first["patientid"], rounds, seed)
    out: dict[str, Any] = {"n_images": int(len(first)), "n_patients": int(first["patientid"].nunique()),
                           "n_folds": int(preds["fold"].nunique()), "n_repeats": len(repeats)}
    views = {"full": "prob_covid", **{v: c for v, c in VIEW_COLUMNS.items() if c in preds}}
    for view, column in views.items():
        point, boot = [], []
        for r in repeats:
            part = preds[preds["repeat"] == r].sort_values("filename")
            point.append(float(auc(part["y"], part[column])[0]))
            boot.append(auc(part["y"], part[column], weights))
        key = "roc_auc" if view == "full" else f"roc_auc_{view}"
        out[key] = float(np.mean(point))
        out[f"{key}_ci95"] = np.nanpercentile(np.mean(boot, axis=0), [2.5, 97.5]).tolist()
    for view in VIEW_COLUMNS:
        if f"roc_auc_{view}" in out:
            out[f"auc_drop_{view}"] = out["roc_auc"] - out[f"roc_auc_{view}"]
    fold_aucs = [float(auc(g["y"], g["prob_covid"])[0]) for _, g in preds.groupby(["repeat", "fold"])]
    out["fold_auc_mean"], out["fold_auc_std"] = float(np.mean(fold_aucs)), float(np.std(fold_aucs, ddof=1))
    for target in (0.80, 0.90):
        out[f"spec_at_sens{int(target * 100)}"] = float(np.mean(
            [spec_at_sens(g["y"], g["prob_covid"], target) for _, g in preds.groupby("repeat")]))
    if "threshold" in preds:
        sens, spec = [], []
        for _, g in preds.groupby("repeat"):
            pred = g["prob_covid"] >= g["threshold"]
            sens.append(float(pred[g["y"] == 1].mean()))
            spec.append(float((~pred[g["y"] == 0]).mean()))
        out["sensitivity"], out["specificity"] = float(np.mean(sens)), float(np.mean(spec))
        out["gate"] = bool(out["sensitivity"] >= GATE[0] and out["specificity"] >= GATE[1])
    return out


def fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} ({ci[0]:.2f}–{ci[1]:.2f})"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the README, one row per configuration."""
    head = ("| configuration | pooled AUC (95% CI) | fold AUC mean ± sd | spec @ sens 0.80 "
            "| spec @ sens 0.90 | sens / spec at fold threshold | AUC lungs hidden (drop) "
            "| AUC outside hidden | AUC lungs hidden, retrained | wall | img/s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        s = r["summary"]

        def col(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]:.3f}" if key in s else "–"

        hidden = (f"{s['roc_auc_lungs_hidden']:.3f} ({-s['auc_drop_lungs_hidden']:+.3f})"
                  if "roc_auc_lungs_hidden" in s else "–")
        at = (f"{s['sensitivity']:.2f} / {s['specificity']:.2f}{' ✓' if s.get('gate') else ''}"
              if "sensitivity" in s else "–")
        lines.append(
            f"| {r['name']} | {fmt_ci(s['roc_auc'], s['roc_auc_ci95'])} "
            f"| {s['fold_auc_mean']:.3f} ± {s['fold_auc_std']:.3f} | {s['spec_at_sens80']:.2f} "
            f"| {s['spec_at_sens90']:.2f} | {at} | {hidden} | {col('roc_auc_outside_hidden')} "
            f"| {col('roc_auc_lungs_hidden_retrained')} "
            f"| {r.get('wall_s', float('nan')) / 60:.1f} min | {r.get('images_per_s', float('nan')):.1f} |")
    return "\n".join(lines)
