"""Evaluate stage: threshold on val, metrics on test, the gate, and the champion/challenger decision.

COVID is the positive class (index 1). The confusion matrix is always built with explicit
labels ``[0, 1]`` so its cells cannot be swapped by the data's class order: rows are the true
class, columns the predicted class, ``[[tn, fp], [fn, tp]]``. Sensitivity is COVID recall,
specificity is non-COVID recall.

* **Threshold**: the highest threshold whose *validation* sensitivity reaches
  ``min_sensitivity`` (of all thresholds meeting the target, the one with the best validation
  specificity). It is recorded and applied unchanged to the test split.
* **Uncertainty**: each proportion gets a 95% Wilson interval; ROC AUC and PR AUC get a 95%
  stratified percentile bootstrap interval (``BOOTSTRAP_RESAMPLES`` resamples, seeded).
* **Gate**: test ``sensitivity >= min_sensitivity`` and ``specificity >= min_specificity``.
* **Champion/challenger**: when ``<model_name>@champion`` exists it is scored on the same test
  images (resized to its own input size) at *its own* recorded threshold, i.e. as it runs in
  production. The challenger is promoted only if it passes the gate and neither its test
  sensitivity nor its specificity is more than ``promotion_margin`` below the champion's.
  An unreachable registry fails the stage instead of promoting blindly.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, POSITIVE_INDEX, Config
from covid_tasks.storage import atomic_path, jsonable, require_file, write_bytes_atomic, write_csv, write_json

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
THRESHOLD_RULE = "highest threshold whose val sensitivity reaches min_sensitivity"
#: Metrics compared between challenger and champion (the gate's metrics).
GATE_METRICS = ("sensitivity", "specificity")


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


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


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


def weighted_auc(y_true: Any, prob: Any, weights: Any) -> Any:
    """ROC AUC for each row of ``weights`` (B x N sample weights): P(score_pos > score_neg), ties 1/2."""
    import numpy as np

    y, p, w = np.asarray(y_true), np.asarray(prob, dtype=float), np.atleast_2d(weights)
    pos, neg = y == POSITIVE_INDEX, y != POSITIVE_INDEX
    wins = (p[pos][:, None] > p[neg][None, :]) + 0.5 * (p[pos][:, None] == p[neg][None, :])
    wp, wn = w[:, pos], w[:, neg]
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


def choose_threshold(y_true: Sequence[int], prob: Sequence[float], min_sensitivity: float) -> float:
    """The highest threshold whose validation sensitivity still reaches ``min_sensitivity``.

    Among thresholds meeting the sensitivity target, the highest one gives the best
    specificity. It is one of the covid images' probabilities, so ``prob >= threshold``
    keeps at least ``ceil(min_sensitivity * n_covid)`` covid images positive.

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


def gate(metrics: dict[str, Any], min_sensitivity: float, min_specificity: float) -> list[str]:
    """The gate's failed checks on test metrics (empty when it passes); NaN fails."""
    reasons = []
    for name, bound in (("sensitivity", min_sensitivity), ("specificity", min_specificity)):
        value = metrics[name]
        if not (value is not None and value >= bound):
            reasons.append(f"{name} {_fmt(value)} < min_{name} {bound:.3f}")
    return reasons


def compare_with_champion(challenger: dict[str, Any], champion: dict[str, Any] | None,
                          margin: float) -> list[str]:
    """Why the challenger may not replace the champion (empty when it may, or with no champion).

    The challenger is "not worse" when each gate metric is at least the champion's minus
    ``margin``, both measured on the same test split.
    """
    if champion is None:
        return []
    reasons = []
    for name in GATE_METRICS:
        ours, theirs = challenger[name], champion[name]
        if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
            continue  # an undefined champion figure cannot block
        if not (ours is not None and ours >= theirs - margin - 1e-12):
            reasons.append(f"{name} {_fmt(ours)} is more than {margin:.3f} below champion "
                           f"v{champion['version']}'s {_fmt(theirs)}")
    return reasons


def predict_split(model: Any, frame: Any, images_dir: Path, cfg: Config) -> Any:
    """P(covid) for every row of ``frame``, in row order, at ``cfg.img_size``."""
    from covid_tasks.data import make_dataset

    ds = make_dataset(frame, images_dir, cfg, training=False)
    return model.predict(ds, verbose=0).reshape(-1)


def evaluate(data_root: str | Path, cfg: Config, run_key: str) -> dict[str, Any]:
    """Evaluate ``finetune.keras`` and, when one exists, the registered champion on the same test split.

    Writes to ``<data_root>/runs/<run_key>/``: ``metrics.json``, ``predictions.csv``
    (``filename, patientid, label, prob_covid, predicted``), ``classification_report.txt``,
    ``confusion_matrix.png``, ``roc_curve.png`` and, with a champion,
    ``champion_predictions.csv``.

    Args:
        data_root: the data root holding ``splits.csv`` and ``raw/images``.
        cfg: configuration (``min_sensitivity``, ``min_specificity``, ``promotion_margin``,
            ``img_size``, ``model_name``, ``tracking_uri``).
        run_key: this run's key.

    Returns:
        ``metrics.json``'s content plus ``metrics_path`` and ``predictions_path``. ``passed`` is
        the gate, ``reasons`` its failed checks; ``promote`` is the final decision,
        ``promotion_reasons`` why not; ``decision`` is ``promote``, ``challenger`` (passed but
        worse than the champion) or ``reject``; ``champion`` holds the champion's test metrics
        and version (``None`` without a champion).

    Raises:
        FileNotFoundError: the fine-tuned model or ``splits.csv`` is missing.
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read (the stage
            fails rather than promote without comparing).
        ValueError: the validation split has no covid image, or ``promotion_margin`` is outside
            [0, 1].
    """
    import keras
    import numpy as np
    import pandas as pd

    from covid_tasks.data import label_index
    from covid_tasks.training import load_splits

    run_dir = cfg.run_dir(run_key)
    model_path = require_file(run_dir / "finetune.keras", "finetune")
    margin = cfg.promotion_margin
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"promotion_margin must be within [0, 1], got {margin}")
    logger.info("evaluate: %s min_sensitivity=%.3f min_specificity=%.3f promotion_margin=%.3f registry=%s",
                model_path, cfg.min_sensitivity, cfg.min_specificity, margin, cfg.tracking_uri)
    champion_entry = _champion_entry(cfg)  # before the slow part: an unreachable registry fails fast
    splits = load_splits(data_root)
    images = Path(data_root) / "raw" / "images"
    val, test = splits["val"], splits["test"]
    y_val = label_index(val["label"]).astype(int)
    y_test = label_index(test["label"]).astype(int)

    model = keras.saving.load_model(model_path)
    val_prob = predict_split(model, val, images, cfg)
    threshold = choose_threshold(y_val, val_prob, cfg.min_sensitivity)
    val_m = binary_metrics(y_val, val_prob, threshold, resamples=0)
    prob = predict_split(model, test, images, cfg)
    m = binary_metrics(y_test, prob, threshold, seed=cfg.seed)
    predicted = (prob >= threshold).astype(int)
    report_text, report = classification_report(y_test, predicted)

    champion, champion_prob = None, None
    if champion_entry is not None:
        champion, champion_prob = _score_champion(champion_entry, cfg, test, images, y_test)
    reasons = gate(m, cfg.min_sensitivity, cfg.min_specificity)
    promotion_reasons = reasons + compare_with_champion(m, champion, margin)
    promote = not promotion_reasons
    metrics = {
        **m,
        "n_test": m["n"],
        "n_val": int(len(y_val)),
        "val_sensitivity": val_m["sensitivity"],
        "val_specificity": val_m["specificity"],
        "threshold_rule": THRESHOLD_RULE,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "min_sensitivity": cfg.min_sensitivity,
        "min_specificity": cfg.min_specificity,
        "passed": not reasons,
        "reasons": reasons,
        "promotion_margin": margin,
        "champion": champion,
        "promote": promote,
        "promotion_reasons": promotion_reasons,
        "decision": "promote" if promote else ("challenger" if not reasons else "reject"),
        "classification_report": report,
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[POSITIVE_INDEX],
        "model_path": str(model_path),
        "img_size": cfg.img_size,
    }
    preds = pd.DataFrame({
        "filename": test["filename"],
        "patientid": test["patientid"],
        "label": test["label"],
        "prob_covid": prob.astype(float),
        "predicted": np.where(predicted == 1, CLASS_NAMES[1], CLASS_NAMES[0]),
    })
    write_csv(run_dir / "predictions.csv", preds)
    if champion_prob is not None:
        write_csv(run_dir / "champion_predictions.csv", preds.assign(
            prob_covid=champion_prob.astype(float),
            predicted=np.where(champion_prob >= champion["threshold"], CLASS_NAMES[1], CLASS_NAMES[0])))
    header = (f"Test split, n={m['n']}, positive class '{CLASS_NAMES[POSITIVE_INDEX]}', "
              f"threshold {threshold:.6f} ({THRESHOLD_RULE})\n\n")
    write_bytes_atomic(run_dir / "classification_report.txt", (header + report_text).encode())
    metrics["plots"] = _plots(run_dir, y_test, prob, m, champion, champion_prob)
    write_json(run_dir / "metrics.json", metrics)
    result = jsonable({**metrics, "metrics_path": str(run_dir / "metrics.json"),
                       "predictions_path": str(run_dir / "predictions.csv")})
    if reasons:
        logger.warning("evaluate: gate FAILED: %s", "; ".join(reasons))
    elif not promote:
        logger.warning("evaluate: gate passed but not promoted: %s", "; ".join(promotion_reasons))
    logger.info("evaluate: done %s", json.dumps({k: v for k, v in result.items()
                                                  if k != "classification_report"}, default=str))
    return result


def _champion_entry(cfg: Config) -> Any | None:
    """The registry's current champion ``ModelVersion`` or ``None``; fails if unreachable."""
    from covid_tasks.registry import alias_version

    entry = alias_version(cfg.model_name, CHAMPION_ALIAS, cfg.tracking_uri)
    if entry is None:
        logger.info("evaluate: no %s@%s in %s; the gate alone decides", cfg.model_name, CHAMPION_ALIAS,
                    cfg.tracking_uri)
    return entry


def _score_champion(entry: Any, cfg: Config, test: Any, images: Path, y_test: Any
                    ) -> tuple[dict[str, Any], Any]:
    """Champion's test metrics at its own recorded threshold and input size, and its P(covid)."""
    from covid_tasks.registry import load_registered

    loaded = load_registered(f"models:/{cfg.model_name}/{entry.version}", cfg.tracking_uri)
    prob = predict_split(loaded.model, test, images, cfg.replace(img_size=loaded.img_size))
    m = binary_metrics(y_test, prob, loaded.threshold, seed=cfg.seed)
    champion = {"version": str(entry.version), "run_key": (entry.tags or {}).get("run_key"),
                "img_size": loaded.img_size, "threshold_source": "operating_point.json", **m}
    logger.info("evaluate: champion v%s on the same %d test images: sensitivity %s specificity %s "
                "at its threshold %.4f", entry.version, m["n"], _fmt(m["sensitivity"]),
                _fmt(m["specificity"]), loaded.threshold)
    return champion, prob


def _fmt(value: Any) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _plots(run_dir: Path, y: Any, prob: Any, m: dict[str, Any], champion: dict[str, Any] | None,
           champion_prob: Any) -> list[str]:
    """``confusion_matrix.png`` (counts and row %) and ``roc_curve.png`` (with operating points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    out = []
    cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cells, cmap="Blues")
    for i in range(2):
        for j in range(2):
            row = cells[i].sum()
            pct = f"\n{100 * cells[i, j] / row:.1f}%" if row else ""
            ax.text(j, i, f"{cells[i, j]}{pct}", ha="center", va="center",
                    color="white" if cells[i, j] > cells.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="predicted", ylabel="true",
           title=f"Test confusion matrix (threshold {m['threshold']:.3f})")
    fig.tight_layout()
    out.append(_save(fig, run_dir / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    curves = [("challenger", prob, m, "-")]
    if champion is not None:
        curves.append((f"champion v{champion['version']}", champion_prob, champion, "--"))
    for (label, p, mm, style), colour in zip(curves, ("C0", "C1"), strict=False):
        if len(set(np.asarray(y).tolist())) == 2:
            fpr, tpr, _ = roc_curve(y, p, pos_label=POSITIVE_INDEX)
            ax.plot(fpr, tpr, style, color=colour, label=f"{label} AUC {_fmt(mm['roc_auc'])} "
                    f"[{_fmt(mm['roc_auc_ci95'][0])}, {_fmt(mm['roc_auc_ci95'][1])}]")
        ax.plot(1 - mm["specificity"], mm["sensitivity"], "o", color=colour,
                label=f"{label} at threshold {mm['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (covid recall)", title="Test ROC", xlim=(0, 1),
           ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    out.append(_save(fig, run_dir / "roc_curve.png"))
    return out


def _save(fig: Any, target: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(target)
