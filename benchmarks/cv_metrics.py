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
* **Within source** (with ``results/images.csv``: each image's source, finding and view): the
  pooled ROC AUC inside each source holding both classes and their image-weighted mean
  (``covid_tasks.subgroups.within_source_auc``), mean over repeats, with the same patient bootstrap;
  and the pooled AUC by finding family (COVID-19 against ``No Finding``, against other pneumonia)
  and by view (PA, AP).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from covid_tasks.stats import weighted_auc
from covid_tasks.subgroups import finding_family, within_source_auc

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


def summarise(preds: pd.DataFrame, rounds: int = BOOTSTRAP, seed: int = 1234,
              images: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every figure of one configuration from its out-of-fold predictions.

    Args:
        preds: the configuration's ``predictions.csv``.
        rounds: patient bootstrap resamples for the interval.
        seed: bootstrap seed.
        images: ``filename, source, finding, view`` per image (``results/images.csv``); adds the
            within-source and subgroup figures (:func:`by_source_and_subgroup`).

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
    if images is not None:
        out.update(by_source_and_subgroup(preds, images, weights))
    return out


#: Subgroups of the second table: name -> which images (by finding family or view) it keeps.
SUBGROUPS = {"covid_vs_no_finding": ("family", ("covid", "no_finding")),
             "covid_vs_other_pneumonia": ("family", ("covid", "other_pneumonia")),
             "view_pa": ("view", ("PA",)), "view_ap": ("view", ("AP",))}
#: A source gets its own column in the second table when it holds this many images of each class.
SOURCE_COLUMN_MIN = 5


def by_source_and_subgroup(preds: pd.DataFrame, images: pd.DataFrame, weights: np.ndarray) -> dict[str, Any]:
    """Within-source and subgroup ROC AUCs of pooled out-of-fold predictions, mean over repeats.

    Args:
        preds: ``predictions.csv`` with its ``y`` column.
        images: ``filename, source, finding, view`` per image.
        weights: the patient bootstrap's B x N image weights (images sorted by file name).

    Returns:
        ``within_source_auc`` (with ``_ci95``), ``within_source_n`` / ``_sources``, ``source_auc``
        (per source holding both classes: ``auc``, ``n_covid``, ``n_non_covid``) and
        ``subgroup_auc`` (per :data:`SUBGROUPS` entry: ``auc``, ``ci95``, ``n_covid``, ``n_non_covid``).
    """
    facts = images.set_index("filename")
    points: dict[str, list[float]] = {}
    boots: dict[str, list[np.ndarray]] = {}
    source_points: dict[str, list[float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for r in sorted(preds["repeat"].unique()):
        part = preds[preds["repeat"] == r].sort_values("filename")
        y, p = part["y"].to_numpy(), part["prob_covid"].to_numpy(dtype=float)
        rows = facts.loc[part["filename"]]
        source = rows["source"].to_numpy(str)
        ones = np.ones((1, len(y)))
        points.setdefault("within", []).append(float(within_source_auc(y, p, source, ones)[0]))
        boots.setdefault("within", []).append(within_source_auc(y, p, source, weights))
        for name in sorted(set(source)):
            mask = source == name
            if 0 < y[mask].sum() < mask.sum():
                source_points.setdefault(name, []).append(float(auc(y[mask], p[mask])[0]))
                counts[f"source:{name}"] = (int(y[mask].sum()), int((y[mask] == 0).sum()))
        family = np.array([finding_family(f, lab) for f, lab in zip(rows["finding"], part["label"],
                                                                     strict=True)])
        view = rows["view"].to_numpy(str)
        for name, (kind, keep) in SUBGROUPS.items():
            mask = np.isin(family if kind == "family" else view, keep)
            points.setdefault(name, []).append(float(auc(y[mask], p[mask])[0]))
            boots.setdefault(name, []).append(auc(y[mask], p[mask], weights[:, mask]))
            counts[name] = (int(y[mask].sum()), int((y[mask] == 0).sum()))
    two_class = [n for n in source_points]
    first = preds[preds["repeat"] == preds["repeat"].min()]
    in_two_class = facts.loc[first["filename"], "source"].isin(two_class)

    def ci(name: str) -> list[float]:
        return np.nanpercentile(np.mean(boots[name], axis=0), [2.5, 97.5]).tolist()

    return {
        "within_source_auc": float(np.mean(points["within"])), "within_source_auc_ci95": ci("within"),
        "within_source_n": int(in_two_class.sum()), "within_source_sources": len(two_class),
        "source_auc": {n: {"auc": float(np.mean(v)), "n_covid": counts[f"source:{n}"][0],
                           "n_non_covid": counts[f"source:{n}"][1]} for n, v in source_points.items()},
        "subgroup_auc": {n: {"auc": float(np.mean(points[n])), "ci95": ci(n), "n_covid": counts[n][0],
                             "n_non_covid": counts[n][1]} for n in SUBGROUPS},
    }


def fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} ({ci[0]:.2f}–{ci[1]:.2f})"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the README, one row per configuration."""
    head = ("| configuration | pooled AUC (95% CI) | within-source AUC (95% CI) | fold AUC mean ± sd "
            "| spec @ sens 0.80 | spec @ sens 0.90 | sens / spec at fold threshold | AUC lungs hidden (drop) "
            "| AUC outside hidden | AUC lungs hidden, retrained | wall | img/s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        s = r["summary"]

        def col(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]:.3f}" if key in s else "–"

        hidden = (f"{s['roc_auc_lungs_hidden']:.3f} ({-s['auc_drop_lungs_hidden']:+.3f})"
                  if "roc_auc_lungs_hidden" in s else "–")
        at = (f"{s['sensitivity']:.2f} / {s['specificity']:.2f}{' ✓' if s.get('gate') else ''}"
              if "sensitivity" in s else "–")
        within = (fmt_ci(s["within_source_auc"], s["within_source_auc_ci95"]) if "within_source_auc" in s
                  else "–")
        lines.append(
            f"| {r['name']} | {fmt_ci(s['roc_auc'], s['roc_auc_ci95'])} | {within} "
            f"| {s['fold_auc_mean']:.3f} ± {s['fold_auc_std']:.3f} | {s['spec_at_sens80']:.2f} "
            f"| {s['spec_at_sens90']:.2f} | {at} | {hidden} | {col('roc_auc_outside_hidden')} "
            f"| {col('roc_auc_lungs_hidden_retrained')} "
            f"| {r.get('wall_s', float('nan')) / 60:.1f} min | {r.get('images_per_s', float('nan')):.1f} |")
    return "\n".join(lines)


def subgroup_table(rows: list[dict[str, Any]]) -> str:
    """The second table: within-source AUC, its largest sources, and AUC by finding family and view."""
    done = [r for r in rows if "within_source_auc" in r["summary"]]
    if not done:
        return ""
    first = done[0]["summary"]
    by_size = sorted(first["source_auc"].items(), key=lambda kv: -kv[1]["n_covid"] - kv[1]["n_non_covid"])
    sources = [n for n, v in by_size if min(v["n_covid"], v["n_non_covid"]) >= SOURCE_COLUMN_MIN]
    groups = first["subgroup_auc"]
    names = {"covid_vs_no_finding": "COVID vs No Finding", "view_pa": "PA", "view_ap": "AP",
             "covid_vs_other_pneumonia": "COVID vs other pneumonia"}

    def counts(entry: dict[str, Any]) -> str:
        return f"({entry['n_covid']}/{entry['n_non_covid']})"

    head = (f"| configuration | within-source AUC ({first['within_source_sources']} sources, "
            f"{first['within_source_n']} images) | "
            + " | ".join(f"{s} {counts(first['source_auc'][s])}" for s in sources) + " | "
            + " | ".join(f"{names[g]} {counts(groups[g])}" for g in groups) + " |")
    lines = [head, "|" + "---|" * (2 + len(sources) + len(groups))]
    for r in done:
        s = r["summary"]
        cells = [fmt_ci(s["within_source_auc"], s["within_source_auc_ci95"])]
        cells += [f"{s['source_auc'][n]['auc']:.3f}" for n in sources]
        cells += [fmt_ci(s["subgroup_auc"][g]["auc"], s["subgroup_auc"][g]["ci95"]) for g in groups]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
