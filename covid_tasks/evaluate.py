"""Evaluate stage: pick the operating threshold on val, measure the test split, apply the gate.

COVID is the positive class (index 1). The confusion matrix is always built with explicit
labels ``[0, 1]`` so its cells cannot be swapped by the data's class order: rows are the true
class, columns the predicted class, ``[[tn, fp], [fn, tp]]``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX, Config
from covid_tasks.storage import require_file, write_csv, write_json

logger = logging.getLogger(__name__)


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, int]:
    """Counts ``tp, fn, tn, fp`` with covid (1) as the positive class."""
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


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity and friends at ``threshold`` (predict covid when prob >= threshold)."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
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
    return out


def choose_threshold(y_true: Sequence[int], prob: Sequence[float], min_sensitivity: float) -> float:
    """The highest threshold whose validation sensitivity still reaches ``min_sensitivity``.

    Among thresholds meeting the sensitivity target, the highest one gives the best
    specificity. Raises ``ValueError`` when the validation split has no covid image.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=int)
    pos = np.sort(np.asarray(prob, dtype=float)[y == POSITIVE_INDEX])[::-1]
    if len(pos) == 0:
        raise ValueError("the validation split has no covid image: cannot choose a threshold")
    k = max(1, math.ceil(min_sensitivity * len(pos) - 1e-9))
    return float(pos[k - 1])


def predict_split(model: Any, frame: Any, images_dir: Path, cfg: Config) -> Any:
    """P(covid) for every row of ``frame``, in row order."""
    from covid_tasks.data import make_dataset

    ds = make_dataset(frame, images_dir, cfg, training=False)
    return model.predict(ds, verbose=0).reshape(-1)


def evaluate(data_root: str | Path, cfg: Config, run_key: str) -> dict[str, Any]:
    """Evaluate ``finetune.keras``: threshold on val, metrics on test, gate on the test metrics.

    Args:
        data_root: the data root holding ``splits.csv`` and ``raw/images``.
        cfg: configuration (``min_sensitivity``, ``min_specificity``, ``img_size``).
        run_key: this run's key; reads the model and writes ``metrics.json`` and
            ``predictions.csv`` under ``<data_root>/runs/<run_key>/``.

    Returns:
        ``metrics.json``'s content plus ``metrics_path`` and ``predictions_path``; ``passed``
        is the gate decision and ``reasons`` names each failed check.

    Raises:
        FileNotFoundError: the fine-tuned model or ``splits.csv`` is missing.
    """
    import keras
    import numpy as np
    import pandas as pd

    from covid_tasks.data import label_index
    from covid_tasks.training import load_splits

    run_dir = cfg.run_dir(run_key)
    model_path = require_file(run_dir / "finetune.keras", "finetune")
    logger.info("evaluate: %s min_sensitivity=%.3f min_specificity=%.3f", model_path,
                cfg.min_sensitivity, cfg.min_specificity)
    model = keras.saving.load_model(model_path)
    splits = load_splits(data_root)
    images = Path(data_root) / "raw" / "images"

    y_val = label_index(splits["val"]["label"]).astype(int)
    threshold = choose_threshold(y_val, predict_split(model, splits["val"], images, cfg), cfg.min_sensitivity)
    test = splits["test"]
    y_test = label_index(test["label"]).astype(int)
    prob = predict_split(model, test, images, cfg)
    m = binary_metrics(y_test, prob, threshold)

    reasons = []
    if not m["sensitivity"] >= cfg.min_sensitivity:
        reasons.append(f"sensitivity {m['sensitivity']:.3f} < min_sensitivity {cfg.min_sensitivity:.3f}")
    if not m["specificity"] >= cfg.min_specificity:
        reasons.append(f"specificity {m['specificity']:.3f} < min_specificity {cfg.min_specificity:.3f}")
    metrics = {
        **m,
        "n_test": m["n"],
        "threshold_rule": "highest threshold reaching min_sensitivity on the val split",
        "min_sensitivity": cfg.min_sensitivity,
        "min_specificity": cfg.min_specificity,
        "passed": not reasons,
        "reasons": reasons,
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[POSITIVE_INDEX],
        "model_path": str(model_path),
    }
    preds = pd.DataFrame({
        "filename": test["filename"],
        "patientid": test["patientid"],
        "label": test["label"],
        "prob_covid": prob.astype(float),
        "predicted": np.where(prob >= threshold, CLASS_NAMES[1], CLASS_NAMES[0]),
    })
    write_csv(run_dir / "predictions.csv", preds)
    write_json(run_dir / "metrics.json", metrics)
    result = {**metrics, "metrics_path": str(run_dir / "metrics.json"),
              "predictions_path": str(run_dir / "predictions.csv")}
    if reasons:
        logger.warning("evaluate: gate FAILED: %s", "; ".join(reasons))
    logger.info("evaluate: done %s", json.dumps(result, default=str))
    return result
