"""Figures by image source and by subgroup: what a pooled test AUC hides.

On this data set sources and labels are confounded (sirm.org holds 35 COVID-19 images and 1
other, eurorad.org 27 and 31), so part of every pooled ROC AUC is telling sources apart. Three
views take that part out or show where a model fails:

* **by source**: every source's images (``covid_tasks.provenance``: the metadata's ``source``
  column, else its ``url`` host) with sensitivity and specificity at the operating threshold,
  and ROC AUC where the source holds both classes;
* **within source**: the ROC AUC inside each source that holds both classes, and their mean
  weighted by the images each such source holds (:func:`within_source`). Comparing two images
  of one source cannot reward a model for recognising the source;
* **subgroups**: by finding family (COVID-19 against ``No Finding``; COVID-19 against every
  other finding, i.e. pneumonias of other causes, SARS and ARDS) and by view (PA, AP,
  AP Supine), each with counts and 95% intervals (Wilson for the rates, stratified bootstrap for
  the AUC, :func:`covid_tasks.metrics.binary_metrics`).

**Too small to read.** A group is flagged ``too_small: true`` when it holds fewer than
:data:`MIN_PER_CLASS` images of either class: its AUC rests on fewer than 10 x 10 pairs, one
image moves a rate by 0.1 or more, and the 95% interval of a rate is at least about 0.4 wide. A
group of one class is always too small (its AUC and one of its rates are undefined). The figures
are kept; the flag says not to read them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from covid_tasks.config import POSITIVE_INDEX
from covid_tasks.findings import normalise_finding
from covid_tasks.metrics import BOOTSTRAP_RESAMPLES, binary_metrics

if TYPE_CHECKING:
    import pandas as pd

#: A group with fewer images than this of either class is flagged ``too_small``.
MIN_PER_CLASS = 10
#: The views reported, as relabel spells them.
VIEWS = ("PA", "AP", "AP Supine")
#: Finding families: the covid images against one kind of non-COVID image.
FAMILIES = ("covid_vs_no_finding", "covid_vs_other_pneumonia")
TOO_SMALL_RULE = (f"too_small when a group holds fewer than {MIN_PER_CLASS} images of either class "
                  "(one class only: always too small)")
_FIGURES = ("roc_auc", "roc_auc_ci95", "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95")


def finding_family(finding: str, label: str) -> str:
    """``covid``, ``no_finding`` or ``other_pneumonia`` for an image's finding and label.

    Args:
        finding: the metadata's ``finding`` (``COVID-19``, ``No Finding``, ``Pneumonia/Bacterial``...).
        label: the image's class (``covid`` or ``non_covid``), which decides covid.

    Returns:
        ``covid`` for a covid image; ``no_finding`` for a non-COVID image whose finding is
        ``No Finding``; ``other_pneumonia`` for every other non-COVID finding.
    """
    if label == "covid":
        return "covid"
    return "no_finding" if normalise_finding(finding) == "no finding" else "other_pneumonia"


def group_figures(y: Sequence[int], prob: Sequence[float], threshold: float,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Counts, ROC AUC and the rates at ``threshold`` of one group, with intervals and the flag.

    Args:
        y: class indices (1 covid).
        prob: P(covid) per image.
        threshold: the operating threshold (covid when ``prob >= threshold``).
        resamples: bootstrap resamples for the AUC interval.
        seed: bootstrap seed.

    Returns:
        ``n``, ``n_covid``, ``n_non_covid``, ``roc_auc`` and ``roc_auc_ci95`` (NaN unless both
        classes are present), ``sensitivity`` / ``specificity`` with Wilson ``_ci95``, and
        ``too_small``.
    """
    y = [int(v) for v in y]
    n_covid = sum(1 for v in y if v == POSITIVE_INDEX)
    out: dict[str, Any] = {"n": len(y), "n_covid": n_covid, "n_non_covid": len(y) - n_covid}
    if y:
        m = binary_metrics(y, prob, threshold, resamples=resamples, seed=seed)
        out.update({k: m[k] for k in _FIGURES})
    else:
        out.update({k: ([math.nan, math.nan] if k.endswith("_ci95") else math.nan) for k in _FIGURES})
    out["too_small"] = min(out["n_covid"], out["n_non_covid"]) < MIN_PER_CLASS
    return out


def by_group(y: Sequence[int], prob: Sequence[float], groups: Sequence[str], threshold: float,
             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`group_figures` for every value of ``groups``, the largest group first.

    Args:
        y: class indices.
        prob: P(covid) per image.
        groups: the group of each image (e.g. its source).
        threshold: the operating threshold.
        resamples: bootstrap resamples per group.
        seed: bootstrap seed.

    Returns:
        ``{group: figures}``.
    """
    import numpy as np

    y_arr, p_arr, g_arr = np.asarray(y, dtype=int), np.asarray(prob, dtype=float), np.asarray(groups, str)
    names = sorted(set(g_arr.tolist()), key=lambda g: (-int((g_arr == g).sum()), g))
    return {g: group_figures(y_arr[g_arr == g], p_arr[g_arr == g], threshold, resamples, seed)
            for g in names}


def within_source(y: Sequence[int], prob: Sequence[float], sources: Sequence[str],
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """ROC AUC inside each source holding both classes, and their image-weighted mean.

    Args:
        y: class indices.
        prob: P(covid) per image.
        sources: the source of each image.
        resamples: bootstrap resamples for each source's AUC interval.
        seed: bootstrap seed.

    Returns:
        ``{"roc_auc": weighted mean (NaN when no source holds both classes), "n": images in those
        sources, "n_sources", "sources": {source: {"n", "n_covid", "n_non_covid", "roc_auc",
        "roc_auc_ci95", "too_small"}}, "weighting": "images"}``.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from covid_tasks.metrics import bootstrap_auc_intervals

    y_arr, p_arr, s_arr = np.asarray(y, dtype=int), np.asarray(prob, dtype=float), np.asarray(sources, str)
    per: dict[str, dict[str, Any]] = {}
    for source in sorted(set(s_arr.tolist())):
        mask = s_arr == source
        ys, ps = y_arr[mask], p_arr[mask]
        n_covid = int((ys == POSITIVE_INDEX).sum())
        if n_covid == 0 or n_covid == len(ys):
            continue
        per[source] = {"n": int(mask.sum()), "n_covid": n_covid, "n_non_covid": int(len(ys) - n_covid),
                       "roc_auc": float(roc_auc_score(ys, ps)),
                       "roc_auc_ci95": bootstrap_auc_intervals(ys, ps, resamples, seed)["roc_auc_ci95"],
                       "too_small": min(n_covid, len(ys) - n_covid) < MIN_PER_CLASS}
    per = dict(sorted(per.items(), key=lambda kv: (-kv[1]["n"], kv[0])))
    total = sum(v["n"] for v in per.values())
    mean = sum(v["n"] * v["roc_auc"] for v in per.values()) / total if total else math.nan
    return {"roc_auc": mean, "n": total, "n_sources": len(per), "weighting": "images", "sources": per}


def within_source_auc(y: Any, prob: Any, sources: Any, weights: Any) -> Any:
    """The image-weighted within-source ROC AUC for each row of bootstrap ``weights`` (B x N).

    In each row a source counts with its resampled images, and only when the row holds both of
    its classes; a row with no such source gives NaN. An all-ones row gives
    :func:`within_source`'s ``roc_auc``.

    Args:
        y: class indices.
        prob: P(covid) per image.
        sources: the source of each image.
        weights: B x N image weights (how often each image is drawn).

    Returns:
        A length-B float array.
    """
    import numpy as np

    from covid_tasks.stats import weighted_auc

    y_arr, p_arr, s_arr = np.asarray(y, dtype=int), np.asarray(prob, dtype=float), np.asarray(sources, str)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    total, mass = np.zeros(len(w)), np.zeros(len(w))
    for source in set(s_arr.tolist()):
        mask = s_arr == source
        if len(set(y_arr[mask].tolist())) < 2:
            continue
        ws = w[:, mask]
        auc = weighted_auc(y_arr[mask], p_arr[mask], ws)
        n = ws.sum(axis=1)
        ok = np.isfinite(auc)
        total[ok] += n[ok] * auc[ok]
        mass[ok] += n[ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, total / mass, np.nan)


def subgroups(frame: "pd.DataFrame", y: Sequence[int], prob: Sequence[float], threshold: float,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Figures by finding family and by view.

    Args:
        frame: the scored images (``label``, and ``finding`` / ``view`` where known), aligned with ``y``.
        y: class indices.
        prob: P(covid) per image.
        threshold: the operating threshold.
        resamples: bootstrap resamples per group.
        seed: bootstrap seed.

    Returns:
        ``{"finding_family": {family: figures}, "view": {view: figures}, "min_per_class",
        "too_small_rule"}``; a family is empty (``n`` 0) without a ``finding`` column, a view
        without images has ``n`` 0.
    """
    import numpy as np

    y_arr, p_arr = np.asarray(y, dtype=int), np.asarray(prob, dtype=float)
    n = len(y_arr)
    labels = frame["label"].astype(str).to_numpy() if "label" in frame else np.where(y_arr == 1, "covid", "")
    findings = frame["finding"].astype(str).to_numpy() if "finding" in frame else None
    family = (np.array([finding_family(f, lab) for f, lab in zip(findings, labels, strict=True)])
              if findings is not None else np.full(n, "unknown"))
    families = {}
    for name, other in zip(FAMILIES, ("no_finding", "other_pneumonia"), strict=True):
        mask = (family == "covid") | (family == other)
        families[name] = group_figures(y_arr[mask], p_arr[mask], threshold, resamples, seed)
    views = frame["view"].astype(str).str.strip().to_numpy() if "view" in frame else np.full(n, "")
    by_view = {v: group_figures(y_arr[views == v], p_arr[views == v], threshold, resamples, seed)
               for v in VIEWS}
    return {"finding_family": families, "view": by_view, "min_per_class": MIN_PER_CLASS,
            "too_small_rule": TOO_SMALL_RULE}


def split_groups(test: "pd.DataFrame", y: Sequence[int], prob: Sequence[float], threshold: float,
                      metadata: "pd.DataFrame | None", resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                      ) -> dict[str, Any]:
    """What ``evaluate`` records beside the pooled metrics: ``sources``, ``within_source``, ``subgroups``.

    Args:
        test: the scored split's rows (``filename``, ``label``, ``finding``, ``view``).
        y: class indices.
        prob: P(covid) per image.
        threshold: the operating threshold.
        metadata: the upstream ``metadata.csv`` table (sources from its ``source`` / ``url``),
            or ``None`` (every source is then ``unknown``).
        resamples: bootstrap resamples per group.
        seed: bootstrap seed.

    Returns:
        ``{"sources": {source: figures}, "within_source": ..., "subgroups": ...}``.
    """
    from covid_tasks.provenance import labeled_sources

    source = labeled_sources(test, metadata).to_numpy()
    return {"sources": by_group(y, prob, source, threshold, resamples, seed),
            "within_source": within_source(y, prob, source, resamples, seed),
            "subgroups": subgroups(test, y, prob, threshold, resamples, seed)}


def metric_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The within-source and subgroup figures of ``metrics.json`` as flat MLflow metric names.

    ``within_source_roc_auc``, ``within_source_n``, ``within_source_<source>_roc_auc``;
    ``subgroup_<family or view>_<figure>`` (``_ci95`` as ``_ci95_low`` / ``_high``) and ``_n``.
    NaN figures are left out.
    """
    import re

    def key(text: str) -> str:
        return re.sub(r"[^0-9A-Za-z_.-]+", "_", text.strip()).strip("_").lower()

    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[name] = float(value)

    within = metrics.get("within_source") or {}
    put("within_source_roc_auc", within.get("roc_auc"))
    put("within_source_n", within.get("n"))
    for source, fig in (within.get("sources") or {}).items():
        put(f"within_source_{key(source)}_roc_auc", fig.get("roc_auc"))
    groups = metrics.get("subgroups") or {}
    for kind in ("finding_family", "view"):
        for name, fig in (groups.get(kind) or {}).items():
            base = f"subgroup_{key(name)}"
            put(f"{base}_n", fig.get("n"))
            for figure in _FIGURES:
                value = fig.get(figure)
                if figure.endswith("_ci95") and isinstance(value, list) and len(value) == 2:
                    put(f"{base}_{figure}_low", value[0])
                    put(f"{base}_{figure}_high", value[1])
                else:
                    put(f"{base}_{figure}", value)
    return out
