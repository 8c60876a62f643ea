"""Evaluate stage: calibrate and set the threshold on val; score, gate, compare and audit on test.

COVID is the positive class (index 1). The confusion matrix is always built with explicit
labels ``[0, 1]`` so its cells cannot be swapped by the data's class order: rows are the true
class, columns the predicted class, ``[[tn, fp], [fn, tp]]``. Sensitivity is COVID recall,
specificity is non-COVID recall.

Everything that learns sees only the validation split; the test split is only scored.

* **Calibration** (``covid_tasks.calibration``): Platt scaling of the last layer's logit, fitted
  on val and folded into that layer, so the saved ``model.keras`` outputs the calibrated P(covid).
* **Threshold** (``covid_tasks.operating_point``): the bootstrap mean, over patient resamples of
  val, of the highest threshold reaching ``min_sensitivity``; recorded and applied unchanged to test.
* **Uncertainty**: each proportion gets a 95% Wilson interval; ROC AUC and PR AUC get a 95%
  stratified percentile bootstrap interval (``BOOTSTRAP_RESAMPLES`` resamples, seeded).
* **Gate** (``covid_tasks.promotion``): test sensitivity and specificity (``gate_on=point``) or
  their Wilson lower bounds (``lower_bound``) against ``min_sensitivity`` / ``min_specificity``.
* **Champion/challenger**: when ``<model_name>@champion`` exists it is scored on the same test
  images (resized to its own input size) at *its own* recorded threshold, as it runs in
  production. The challenger is promoted when it passes the gate and a paired patient bootstrap
  shows it non-inferior (lower 95% bound of each difference >= ``-promotion_margin``).
  An unreachable registry fails the stage instead of promoting blindly.
* **Shortcut audit** (``covid_tasks.shortcut_audit``): test ROC AUC with the lungs hidden and with
  everything else hidden; a warning at ``shortcut_auc_limit``, blocking when
  ``shortcut_blocks_promotion`` is on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, POSITIVE_INDEX, Config, redact_uri
from covid_tasks.operating_point import THRESHOLD_RULE
from covid_tasks.promotion import gate
from covid_tasks.stats import weighted_auc, weighted_average_precision, wilson_interval
from covid_tasks.storage import (
    atomic_path,
    file_sha256,
    jsonable,
    require_file,
    write_bytes_atomic,
    write_csv,
    write_json,
)

logger = logging.getLogger(__name__)

__all__ = ["binary_metrics", "bootstrap_auc_intervals", "classification_report", "confusion", "evaluate",
           "gate", "predict_split", "save_figure", "weighted_auc", "weighted_average_precision",
           "wilson_interval", "THRESHOLD_RULE"]

BOOTSTRAP_RESAMPLES = 1000
#: The evaluated model: the fine-tuned model with the calibration folded into its last layer.
MODEL_FILE = "model.keras"


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


def predict_split(model: Any, frame: Any, images_dir: Path, cfg: Config) -> Any:
    """P(covid) for every row of ``frame``, in row order, at ``cfg.img_size``."""
    from covid_tasks.data import make_dataset

    ds = make_dataset(frame, images_dir, cfg, training=False)
    return model.predict(ds, verbose=0).reshape(-1)


def evaluate(data_root: str | Path, cfg: Config, run_key: str) -> dict[str, Any]:
    """Calibrate ``finetune.keras`` on val, score it (and the champion) on test, gate, compare and audit.

    Writes to ``<data_root>/runs/<run_key>/``: ``model.keras`` (the calibrated model, the one
    ``register`` registers; rewritten only when its content changes), ``operating_point.json``,
    ``metrics.json``, ``predictions.csv`` (``filename, patientid, label, prob_covid, predicted,
    logit_uncalibrated, prob_covid_lungs_hidden, prob_covid_outside_hidden``),
    ``val_predictions.csv``, ``classification_report.txt``, ``confusion_matrix.png``,
    ``roc_curve.png``, ``reliability.png``, ``shortcut_audit.png`` and, with a champion,
    ``champion_predictions.csv``.

    Args:
        data_root: the data root holding ``splits.csv`` and ``raw/images``.
        cfg: configuration (``min_sensitivity``, ``min_specificity``, ``gate_on``,
            ``promotion_margin``, ``calibration``, ``shortcut_auc_limit``,
            ``shortcut_blocks_promotion``, ``img_size``, ``model_name``, ``tracking_uri``).
        run_key: this run's key.

    Returns:
        ``metrics.json``'s content plus ``metrics_path`` and ``predictions_path``. ``passed`` is
        the gate, ``reasons`` its failed checks; ``promote`` is the final decision,
        ``promotion_reasons`` why not; ``decision`` is ``promote``, ``challenger`` (passed but not
        promoted) or ``reject``; ``champion`` holds the champion's test metrics and version
        (``None`` without a champion); ``promotion``, ``calibration`` and ``shortcut_audit``
        explain the three decisions.

    Raises:
        FileNotFoundError: the fine-tuned model or ``splits.csv`` is missing.
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read (the stage
            fails rather than promote without comparing).
        ValueError: the validation split has no covid image (or lacks a class for calibration),
            the model's output is not a final ``Dense(1, sigmoid)``, or a setting is invalid.
    """
    import keras

    from covid_tasks.data import label_index
    from covid_tasks.registry import bound_mlflow_http
    from covid_tasks.training import load_splits

    run_dir = cfg.run_dir(run_key)
    source_path = require_file(run_dir / "finetune.keras", "finetune")
    logger.info("evaluate: %s min_sensitivity=%.3f min_specificity=%.3f gate_on=%s promotion_margin=%.3f "
                "calibration=%s registry=%s", source_path, cfg.min_sensitivity, cfg.min_specificity,
                cfg.gate_on, cfg.promotion_margin, cfg.calibration, redact_uri(cfg.tracking_uri))
    bound_mlflow_http()
    champion_entry = _champion_entry(cfg)  # before the slow part: an unreachable registry fails fast
    splits = load_splits(data_root)
    images = Path(data_root) / "raw" / "images"
    val, test = splits["val"], splits["test"]
    y_val = label_index(val["label"]).astype(int)
    y_test = label_index(test["label"]).astype(int)

    model = keras.saving.load_model(source_path, compile=False)
    fitted = _fit_on_val(model, val, y_val, images, cfg)
    model_sha = _save_evaluated_model(model, run_dir / MODEL_FILE)  # calibration now folded in
    scored = _score_test(model, test, images, cfg, fitted)
    m = binary_metrics(y_test, scored["prob"], fitted["threshold"], seed=cfg.seed)

    champion, champion_prob = None, None
    if champion_entry is not None:
        champion, champion_prob = _score_champion(champion_entry, cfg, test, images, y_test)
    decision = _decide(cfg, m, test, y_test, scored, champion, champion_prob)
    metrics = {
        **m,
        "n_test": m["n"],
        "n_val": int(len(y_val)),
        **fitted["val"],
        "threshold_rule": THRESHOLD_RULE,
        "threshold_method": fitted["threshold_method"],
        "threshold_uncalibrated": fitted["threshold_uncalibrated"],
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "min_sensitivity": cfg.min_sensitivity,
        "min_specificity": cfg.min_specificity,
        "gate_on": cfg.gate_on,
        **decision,
        "calibration": {**fitted["calibration"], **_calibration_scores(y_test, scored, fitted)},
        "classification_report": classification_report(y_test, scored["predicted"])[1],
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[POSITIVE_INDEX],
        "model_path": str(run_dir / MODEL_FILE),
        "model_sha256": model_sha,
        "source_model_path": str(source_path),
        "operating_point_path": str(run_dir / "operating_point.json"),
        "img_size": cfg.img_size,
    }
    metrics["plots"] = _write_outputs(run_dir, run_key, cfg, metrics, fitted, scored, test, y_test,
                                      champion_prob)
    write_json(run_dir / "metrics.json", metrics)
    result = jsonable({**metrics, "metrics_path": str(run_dir / "metrics.json"),
                       "predictions_path": str(run_dir / "predictions.csv")})
    _log_decisions(metrics)
    logger.info("evaluate: done %s", json.dumps({k: v for k, v in result.items()
                                                  if k != "classification_report"}, default=str))
    return result


def _fit_on_val(model: Any, val: Any, y_val: Any, images: Path, cfg: Config) -> dict[str, Any]:
    """Fit the calibration and choose the threshold on val; fold the calibration into ``model``.

    Returns:
        ``{"calibration", "threshold" (calibrated P(covid)), "threshold_uncalibrated",
        "threshold_method", "val" (val_sensitivity/specificity at the threshold), "val_frame"}``.
    """
    import numpy as np
    import pandas as pd

    from covid_tasks import calibration
    from covid_tasks.data import make_dataset
    from covid_tasks.operating_point import choose_threshold
    from covid_tasks.stats import sigmoid

    kernel, bias = calibration.head_weights(model)  # fails early on a model without the contract
    feats, _ = calibration.features_and_output(model).predict(
        make_dataset(val, images, cfg, training=False), verbose=0)
    z_val = np.asarray(feats, dtype=float) @ kernel + bias
    cal = calibration.fit(y_val, z_val, cfg.calibration)
    chosen = choose_threshold(y_val, z_val, val["patientid"], cfg.min_sensitivity, seed=cfg.seed)
    params = cal["params"]
    threshold = float(sigmoid(calibration.apply(chosen["logit"], params)))
    calibration.fold_into_model(model, params)
    val_prob = sigmoid(calibration.apply(z_val, params))
    val_m = binary_metrics(y_val, val_prob, threshold, resamples=0)
    method = {**chosen, "target": cfg.min_sensitivity, "rule": THRESHOLD_RULE,
              "ci95": [float(sigmoid(calibration.apply(v, params))) for v in chosen["ci95_logit"]],
              "plain_rule_threshold": float(sigmoid(calibration.apply(chosen["plain_rule_logit"], params)))}
    frame = pd.DataFrame({"filename": val["filename"], "patientid": val["patientid"], "label": val["label"],
                          "logit_uncalibrated": z_val, "prob_covid": val_prob,
                          "predicted": np.where(val_prob >= threshold, CLASS_NAMES[1], CLASS_NAMES[0])})
    logger.info("evaluate: calibration %s a=%.4f b=%.4f on %d val images; threshold %.4f (uncalibrated "
                "%.4f, plain rule %.4f), val sensitivity %.3f", cal["method"], params["a"], params["b"],
                len(z_val), threshold, float(sigmoid(chosen["logit"])), method["plain_rule_threshold"],
                val_m["sensitivity"])
    return {"calibration": cal, "threshold": threshold, "kernel": kernel, "bias": bias,
            "threshold_uncalibrated": float(sigmoid(chosen["logit"])),
            "threshold_method": method, "val_frame": frame, "z_val": z_val, "y_val": y_val,
            "val": {"val_sensitivity": val_m["sensitivity"], "val_specificity": val_m["specificity"]}}


def _score_test(model: Any, test: Any, images: Path, cfg: Config, fitted: dict[str, Any]) -> dict[str, Any]:
    """The calibrated model's P(covid) on test in the three audit views, its decisions, and raw logits."""
    from covid_tasks import calibration, shortcut_audit

    views = shortcut_audit.score_views(calibration.features_and_output(model), test, images, cfg)
    prob = views["prob"]["full"]
    return {"prob": prob, "views": views["prob"], "examples": views["examples"],
            "z": views["features"] @ fitted["kernel"] + fitted["bias"],
            "predicted": (prob >= fitted["threshold"]).astype(int)}


def _calibration_scores(y_test: Any, scored: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any]:
    """ECE and Brier score before and after calibration, on test (held out) and on val (fitted on)."""
    from covid_tasks.stats import ECE_BINS, brier_score, expected_calibration_error, sigmoid

    val_before = sigmoid(fitted["z_val"])
    val_after = fitted["val_frame"]["prob_covid"].to_numpy()
    before = sigmoid(scored["z"])
    return {
        "scored_on": "test", "ece_bins": ECE_BINS,
        "ece_before": expected_calibration_error(y_test, before),
        "ece_after": expected_calibration_error(y_test, scored["prob"]),
        "brier_before": brier_score(y_test, before),
        "brier_after": brier_score(y_test, scored["prob"]),
        "val_ece_before": expected_calibration_error(fitted["y_val"], val_before),
        "val_ece_after": expected_calibration_error(fitted["y_val"], val_after),
        "threshold_uncalibrated": fitted["threshold_uncalibrated"],
        "threshold": fitted["threshold"],
    }


def _decide(cfg: Config, m: dict[str, Any], test: Any, y_test: Any, scored: dict[str, Any],
            champion: dict[str, Any] | None, champion_prob: Any) -> dict[str, Any]:
    """Gate, shortcut audit and promotion, as ``metrics.json`` keys."""
    from covid_tasks import promotion, shortcut_audit

    reasons = gate(m, cfg.min_sensitivity, cfg.min_specificity, cfg.gate_on)
    audit = shortcut_audit.summarize(y_test, scored["views"], cfg.shortcut_auc_limit, cfg.seed)
    deltas = None
    if champion is not None:
        deltas = promotion.paired_deltas(y_test, test["patientid"], (scored["prob"], m["threshold"]),
                                         (champion_prob, champion["threshold"]), seed=cfg.seed)
    decided = promotion.decide(reasons, deltas, champion["version"] if champion else None,
                               cfg.promotion_margin, audit, cfg.shortcut_blocks_promotion)
    promote = decided["promoted"]
    return {
        "passed": not reasons,
        "reasons": reasons,
        "promotion_margin": cfg.promotion_margin,
        "champion": champion,
        "promote": promote,
        "promotion_reasons": decided["reasons"],
        "promotion": decided,
        "decision": "promote" if promote else ("challenger" if not reasons else "reject"),
        "shortcut_audit": {**audit, "blocks_promotion": cfg.shortcut_blocks_promotion},
    }


def _write_outputs(run_dir: Path, run_key: str, cfg: Config, metrics: dict[str, Any], fitted: dict[str, Any],
                   scored: dict[str, Any], test: Any, y_test: Any, champion_prob: Any) -> list[str]:
    """Predictions, the operating point, the report and every plot; returns the plot paths."""
    import numpy as np
    import pandas as pd

    from covid_tasks import calibration, shortcut_audit
    from covid_tasks.stats import sigmoid

    threshold = metrics["threshold"]
    names = np.array(CLASS_NAMES)
    preds = pd.DataFrame({
        "filename": test["filename"], "patientid": test["patientid"], "label": test["label"],
        "prob_covid": scored["prob"].astype(float), "predicted": names[scored["predicted"]],
        "logit_uncalibrated": scored["z"].astype(float),
        "prob_covid_lungs_hidden": scored["views"]["lungs_hidden"].astype(float),
        "prob_covid_outside_hidden": scored["views"]["outside_hidden"].astype(float),
    })
    write_csv(run_dir / "predictions.csv", preds)
    write_csv(run_dir / "val_predictions.csv", fitted["val_frame"])
    champion = metrics["champion"]
    if champion_prob is not None:
        write_csv(run_dir / "champion_predictions.csv", preds[["filename", "patientid", "label"]].assign(
            prob_covid=champion_prob.astype(float),
            predicted=names[(champion_prob >= champion["threshold"]).astype(int)]))
    write_json(run_dir / "operating_point.json", operating_point(metrics, run_key))
    report_text = classification_report(y_test, scored["predicted"])[0]
    header = (f"Test split, n={metrics['n']}, positive class '{CLASS_NAMES[POSITIVE_INDEX]}', "
              f"threshold {threshold:.6f} on the calibrated P(covid) ({THRESHOLD_RULE})\n\n")
    write_bytes_atomic(run_dir / "classification_report.txt", (header + report_text).encode())
    cal = metrics["calibration"]
    plots = _plots(run_dir, y_test, scored["prob"], metrics, champion, champion_prob)
    plots.append(calibration.reliability_plot(run_dir / "reliability.png", y_test, sigmoid(scored["z"]),
                                              scored["prob"], (cal["ece_before"], cal["ece_after"])))
    plots.append(shortcut_audit.plot(run_dir / "shortcut_audit.png", scored["examples"],
                                     metrics["shortcut_audit"]))
    return plots


def operating_point(metrics: dict[str, Any], run_key: str) -> dict[str, Any]:
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


def _save_evaluated_model(model: Any, path: Path) -> str:
    """Save ``model`` to ``path`` unless the file there already holds the same content; return its SHA-256.

    A ``.keras`` file's ``metadata.json`` carries the save time, so two saves of one model differ
    in bytes; comparing the other members keeps re-runs byte-identical (and the registry's
    content hash stable).
    """
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".keras", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        model.save(tmp)
        if not (path.is_file() and _same_model_content(tmp, path)):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def _same_model_content(a: Path, b: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
            names = sorted(n for n in za.namelist() if n != "metadata.json")
            if names != sorted(n for n in zb.namelist() if n != "metadata.json"):
                return False
            return all(za.read(n) == zb.read(n) for n in names)
    except (OSError, zipfile.BadZipFile):
        return False


def _log_decisions(metrics: dict[str, Any]) -> None:
    """One line per decision: gate, promotion (with its rule), shortcut audit, calibration."""
    promo, audit, cal = metrics["promotion"], metrics["shortcut_audit"], metrics["calibration"]
    if metrics["reasons"]:
        logger.warning("evaluate: gate FAILED (gate_on=%s): %s", metrics["gate_on"],
                       "; ".join(metrics["reasons"]))
    else:
        logger.info("evaluate: gate passed (gate_on=%s)", metrics["gate_on"])
    (logger.info if promo["promoted"] else logger.warning)(
        "evaluate: promotion %s by rule %s: %s", "YES" if promo["promoted"] else "no", promo["rule"],
        promo["reason"])
    if audit["warning"]:
        logger.warning("evaluate: SHORTCUT AUDIT: %s%s", audit["warning"],
                       " (blocks promotion)" if audit["blocks_promotion"] else " (warning only)")
    else:
        logger.info("evaluate: shortcut audit: test ROC AUC full %s, lungs hidden %s, outside hidden %s",
                    _fmt(audit["roc_auc_full"]), _fmt(audit["roc_auc_lungs_hidden"]),
                    _fmt(audit["roc_auc_outside_hidden"]))
    logger.info("evaluate: calibration %s: test ECE %s -> %s, Brier %s -> %s", cal["method"],
                _fmt(cal["ece_before"]), _fmt(cal["ece_after"]), _fmt(cal["brier_before"]),
                _fmt(cal["brier_after"]))


def _champion_entry(cfg: Config) -> Any | None:
    """The registry's current champion ``ModelVersion`` or ``None``; fails if unreachable."""
    from covid_tasks.registry import alias_version

    entry = alias_version(cfg.model_name, CHAMPION_ALIAS, cfg.tracking_uri)
    if entry is None:
        logger.info("evaluate: no %s@%s in %s; the gate alone decides", cfg.model_name, CHAMPION_ALIAS,
                    redact_uri(cfg.tracking_uri))
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
    out.append(save_figure(fig, run_dir / "confusion_matrix.png"))

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
    out.append(save_figure(fig, run_dir / "roc_curve.png"))
    return out


def save_figure(fig: Any, target: Path) -> str:
    """Write a matplotlib figure as PNG atomically, close it, and return the path."""
    import matplotlib.pyplot as plt

    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(target)
