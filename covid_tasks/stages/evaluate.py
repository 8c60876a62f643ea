"""Evaluate stage: calibrate and set the threshold on val; score, gate, compare and audit on test.

COVID is the positive class (index 1); the metrics and their intervals are
:mod:`covid_tasks.metrics`'s. Everything that learns sees only the validation split; the test
split is only scored.

* **Calibration** (``covid_tasks.calibration``): Platt scaling of the last layer's logit, fitted
  on val and folded into that layer, so the saved ``model.keras`` outputs the calibrated P(covid).
* **Threshold** (``covid_tasks.operating_point``): the bootstrap mean, over patient resamples of
  val, of the highest threshold reaching ``min_sensitivity + threshold_margin``; recorded and
  applied unchanged to test.
* **Uncertainty**: each proportion gets a 95% Wilson interval; ROC AUC and PR AUC get a 95%
  stratified percentile bootstrap interval.
* **Gate** (``covid_tasks.promotion``): test sensitivity and specificity (``gate_on=point``) or
  their Wilson lower bounds (``lower_bound``) against ``min_sensitivity`` / ``min_specificity``,
  and, when ``min_roc_auc`` > 0, the lower bound of test ROC AUC against it.
* **Champion/challenger**: when ``<model_name>@champion`` exists it is scored on the same test
  images (resized to its own input size) at *its own* recorded threshold, as it runs in
  production. The challenger is promoted when it passes the gate and a paired patient bootstrap
  shows it non-inferior (lower 95% bound of each difference >= ``-promotion_margin``).
  An unreachable registry fails the stage instead of promoting blindly.
* **Sources and subgroups** (``covid_tasks.subgroups``): test figures per image source, the ROC
  AUC within each source holding both classes (and their image-weighted mean), and by finding
  family and view, each flagged ``too_small`` when too few images to read.
* **Shortcut audit** (``covid_tasks.shortcut_audit``): test ROC AUC with the lungs hidden and with
  everything else hidden; a warning at ``shortcut_auc_limit``, blocking when
  ``shortcut_blocks_promotion`` is on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, POSITIVE_INDEX, Config, redact_uri
from covid_tasks.layout import OPERATING_POINT, DataRoot, RunDir, load_splits
from covid_tasks.metrics import BOOTSTRAP_RESAMPLES, binary_metrics, classification_report
from covid_tasks.operating_point import THRESHOLD_RULE
from covid_tasks.promotion import gate
from covid_tasks.stats import fmt
from covid_tasks.storage import (
    file_sha256,
    jsonable,
    read_json,
    require_file,
    write_bytes_atomic,
    write_csv,
    write_json,
)

logger = logging.getLogger(__name__)


@dataclass
class _Fitted:
    """What was fitted on the validation split: the calibration and the threshold."""

    calibration: dict[str, Any]
    threshold: float  # on the calibrated P(covid)
    threshold_uncalibrated: float
    threshold_method: dict[str, Any]
    kernel: Any  # the output layer's weights before calibration (features -> logit)
    bias: Any
    val_frame: Any  # val_predictions.csv
    z_val: Any  # uncalibrated logits on val
    y_val: Any
    val: dict[str, float]  # val_sensitivity, val_specificity at the threshold


@dataclass
class _Scored:
    """The calibrated model on the test split, in the shortcut audit's three views."""

    prob: Any  # P(covid), full image
    views: dict[str, Any]  # view -> P(covid)
    examples: dict[int, list[Any]]  # example images per class, for the audit's figure
    z: Any  # uncalibrated logits
    predicted: Any  # class index at the threshold


def evaluate(cfg: Config, run_key: str) -> dict[str, Any]:
    """Calibrate ``finetune.keras`` on val, score it (and the champion) on test, gate, compare and audit.

    Writes to ``<data_root>/runs/<run_key>/``: ``model.keras`` (the calibrated model, the one
    ``register`` registers; rewritten only when its content changes), ``operating_point.json``,
    ``metrics.json``, ``predictions.csv`` (``filename, patientid, label, prob_covid, predicted,
    logit_uncalibrated, prob_covid_lungs_hidden, prob_covid_outside_hidden``),
    ``val_predictions.csv``, ``classification_report.txt``, ``confusion_matrix.png``,
    ``roc_curve.png``, ``reliability.png``, ``shortcut_audit.png`` and, with a champion,
    ``champion_predictions.csv``.

    Args:
        cfg: configuration (``data_root``, ``min_sensitivity``, ``min_specificity``, ``gate_on``,
            ``promotion_margin``, ``calibration``, ``shortcut_auc_limit``,
            ``shortcut_blocks_promotion``, ``img_size``, ``model_name``, ``tracking_uri``).
        run_key: this run's key.

    Returns:
        ``metrics.json``'s content plus ``metrics_path`` and ``predictions_path``. ``passed`` is
        the gate, ``reasons`` its failed checks; ``promote`` is the final decision,
        ``promotion_reasons`` why not; ``decision`` is ``promote``, ``challenger`` (passed but not
        promoted) or ``reject``; ``champion`` holds the champion's test metrics and version
        (``None`` without a champion); ``promotion``, ``calibration`` and ``shortcut_audit``
        explain the three decisions. ``sources``, ``within_source`` and ``subgroups`` hold the
        figures by source, within sources and by finding family and view.

    Raises:
        FileNotFoundError: the fine-tuned model or ``splits.csv`` is missing.
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read (the stage
            fails rather than promote without comparing).
        ValueError: the validation split has no covid image (or lacks a class for calibration),
            the model's output is not a final ``Dense(1, sigmoid)``, or a setting is invalid.
    """
    import keras

    from covid_tasks.dataset import label_index
    from covid_tasks.registry import bound_mlflow_http

    root = DataRoot.of(cfg)
    run_dir = root.run(run_key)
    source_path = require_file(run_dir.finetune_model, "finetune")
    logger.info("evaluate: %s min_sensitivity=%.3f min_specificity=%.3f gate_on=%s min_roc_auc=%.3f "
                "threshold_margin=%.3f promotion_margin=%.3f calibration=%s registry=%s", source_path,
                cfg.min_sensitivity, cfg.min_specificity, cfg.gate_on, cfg.min_roc_auc, cfg.threshold_margin,
                cfg.promotion_margin, cfg.calibration, redact_uri(cfg.tracking_uri))
    bound_mlflow_http()
    champion_entry = _champion_entry(cfg)  # before the slow part: an unreachable registry fails fast
    splits = load_splits(root)
    images = root.images
    val, test = splits["val"], splits["test"]
    y_val = label_index(val["label"]).astype(int)
    y_test = label_index(test["label"]).astype(int)

    model = keras.saving.load_model(source_path, compile=False)
    fitted = _fit_on_val(model, val, y_val, images, cfg)
    model_sha = _save_evaluated_model(model, run_dir.model)  # calibration now folded in
    scored = _score_test(model, test, images, cfg, fitted)
    m = binary_metrics(y_test, scored.prob, fitted.threshold, seed=cfg.seed)
    groups = _groups(root, test, y_test, scored.prob, fitted.threshold, cfg.seed)

    champion, champion_prob = None, None
    if champion_entry is not None:
        champion, champion_prob = _score_champion(champion_entry, cfg, test, images, y_test)
    decision = _decide(cfg, m, test, y_test, scored, champion, champion_prob, _data_check(run_dir))
    metrics = {
        **m,
        "n_test": m["n"],
        "n_val": int(len(y_val)),
        **fitted.val,
        "threshold_rule": THRESHOLD_RULE,
        "threshold_method": fitted.threshold_method,
        "threshold_uncalibrated": fitted.threshold_uncalibrated,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "min_sensitivity": cfg.min_sensitivity,
        "min_specificity": cfg.min_specificity,
        "gate_on": cfg.gate_on,
        "min_roc_auc": cfg.min_roc_auc,
        "threshold_margin": cfg.threshold_margin,
        **decision,
        **groups,
        "calibration": {**fitted.calibration, **_calibration_scores(y_test, scored, fitted)},
        "classification_report": classification_report(y_test, scored.predicted)[1],
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[POSITIVE_INDEX],
        "model_path": str(run_dir.model),
        "model_sha256": model_sha,
        "source_model_path": str(source_path),
        "operating_point_path": str(run_dir.operating_point),
        "img_size": cfg.img_size,
        "probe": read_json(run_dir.probe) if run_dir.probe.is_file() else None,  # train's probe head
    }
    metrics["plots"] = _write_outputs(run_dir, metrics, fitted, scored, test, y_test, champion_prob)
    write_json(run_dir.metrics, metrics)
    result = jsonable({**metrics, "metrics_path": str(run_dir.metrics),
                       "predictions_path": str(run_dir.predictions)})
    _log_decisions(metrics)
    logger.info("evaluate: done %s", json.dumps({k: v for k, v in result.items()
                                                  if k != "classification_report"}, default=str))
    return result


def _fit_on_val(model: Any, val: Any, y_val: Any, images: Path, cfg: Config) -> _Fitted:
    """Fit the calibration and choose the threshold on val; fold the calibration into ``model``."""
    import numpy as np
    import pandas as pd

    from covid_tasks import calibration
    from covid_tasks.dataset import make_dataset
    from covid_tasks.operating_point import choose_threshold
    from covid_tasks.stats import sigmoid

    kernel, bias = calibration.head_weights(model)  # fails early on a model without the contract
    feats, _ = calibration.features_and_output(model).predict(
        make_dataset(val, images, cfg, training=False), verbose=0)
    z_val = np.asarray(feats, dtype=float) @ kernel + bias
    cal = calibration.fit(y_val, z_val, cfg.calibration)
    target = min(1.0, cfg.min_sensitivity + cfg.threshold_margin)
    chosen = choose_threshold(y_val, z_val, val["patientid"], target, seed=cfg.seed)
    params = cal["params"]
    threshold = float(sigmoid(calibration.apply(chosen["logit"], params)))
    calibration.fold_into_model(model, params)
    val_prob = sigmoid(calibration.apply(z_val, params))
    val_m = binary_metrics(y_val, val_prob, threshold, resamples=0)
    method = {**chosen, "target": target, "rule": THRESHOLD_RULE,
              "ci95": [float(sigmoid(calibration.apply(v, params))) for v in chosen["ci95_logit"]],
              "plain_rule_threshold": float(sigmoid(calibration.apply(chosen["plain_rule_logit"], params)))}
    frame = pd.DataFrame({"filename": val["filename"], "patientid": val["patientid"], "label": val["label"],
                          "logit_uncalibrated": z_val, "prob_covid": val_prob,
                          "predicted": np.where(val_prob >= threshold, CLASS_NAMES[1], CLASS_NAMES[0])})
    logger.info("evaluate: calibration %s a=%.4f b=%.4f on %d val images; threshold %.4f (uncalibrated "
                "%.4f, plain rule %.4f), val sensitivity %.3f", cal["method"], params["a"], params["b"],
                len(z_val), threshold, float(sigmoid(chosen["logit"])), method["plain_rule_threshold"],
                val_m["sensitivity"])
    return _Fitted(calibration=cal, threshold=threshold,
                   threshold_uncalibrated=float(sigmoid(chosen["logit"])), threshold_method=method,
                   kernel=kernel, bias=bias, val_frame=frame, z_val=z_val, y_val=y_val,
                   val={"val_sensitivity": val_m["sensitivity"], "val_specificity": val_m["specificity"]})


def _score_test(model: Any, test: Any, images: Path, cfg: Config, fitted: _Fitted) -> _Scored:
    """The calibrated model's P(covid) on test in the three audit views, its decisions, and raw logits."""
    from covid_tasks import calibration, shortcut_audit

    views = shortcut_audit.score_views(calibration.features_and_output(model), test, images, cfg)
    prob = views["prob"]["full"]
    return _Scored(prob=prob, views=views["prob"], examples=views["examples"],
                   z=views["features"] @ fitted.kernel + fitted.bias,
                   predicted=(prob >= fitted.threshold).astype(int))


def _groups(root: DataRoot, test: Any, y_test: Any, prob: Any, threshold: float, seed: int) -> dict[str, Any]:
    """``sources``, ``within_source`` and ``subgroups`` of the test split (:mod:`covid_tasks.subgroups`)."""
    from covid_tasks.data_statistics import read_metadata
    from covid_tasks.subgroups import split_groups

    metadata = read_metadata(root.metadata) if root.metadata.is_file() else None
    groups = split_groups(test, y_test, prob, threshold, metadata, seed=seed)
    within = groups["within_source"]
    logger.info("evaluate: test ROC AUC within sources %s (image-weighted over %d source(s) holding both "
                "classes, %d images); %d source(s) in the test split", fmt(within["roc_auc"]),
                within["n_sources"], within["n"], len(groups["sources"]))
    return groups


def _calibration_scores(y_test: Any, scored: _Scored, fitted: _Fitted) -> dict[str, Any]:
    """ECE and Brier score before and after calibration, on test (held out) and on val (fitted on)."""
    from covid_tasks.stats import ECE_BINS, brier_score, expected_calibration_error, sigmoid

    val_before = sigmoid(fitted.z_val)
    val_after = fitted.val_frame["prob_covid"].to_numpy()
    before = sigmoid(scored.z)
    return {
        "scored_on": "test", "ece_bins": ECE_BINS,
        "ece_before": expected_calibration_error(y_test, before),
        "ece_after": expected_calibration_error(y_test, scored.prob),
        "brier_before": brier_score(y_test, before),
        "brier_after": brier_score(y_test, scored.prob),
        "val_ece_before": expected_calibration_error(fitted.y_val, val_before),
        "val_ece_after": expected_calibration_error(fitted.y_val, val_after),
        "threshold_uncalibrated": fitted.threshold_uncalibrated,
        "threshold": fitted.threshold,
    }


def _decide(cfg: Config, m: dict[str, Any], test: Any, y_test: Any, scored: _Scored,
            champion: dict[str, Any] | None, champion_prob: Any, data_check: dict[str, Any]
            ) -> dict[str, Any]:
    """Gate, shortcut audit, data checks and promotion, as ``metrics.json`` keys."""
    from covid_tasks import promotion, shortcut_audit

    reasons = gate(m, cfg.min_sensitivity, cfg.min_specificity, cfg.gate_on, cfg.min_roc_auc)
    audit = shortcut_audit.summarize(y_test, scored.views, cfg.shortcut_auc_limit, cfg.seed)
    deltas = None
    if champion is not None:
        deltas = promotion.paired_deltas(y_test, test["patientid"], (scored.prob, m["threshold"]),
                                         (champion_prob, champion["threshold"]), seed=cfg.seed)
    warned = data_check["summary"] if data_check["verdict"] == "warn" else None
    decided = promotion.decide(reasons, deltas, champion["version"] if champion else None,
                               cfg.promotion_margin, audit, cfg.shortcut_blocks_promotion, warned)
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
        "data_check": data_check,
    }


def _data_check(run_dir: RunDir) -> dict[str, Any]:
    """This run's data-check verdict and summary (``unchecked`` when check_data did not run)."""
    if not run_dir.data_checks.is_file():
        return {"verdict": "unchecked", "summary": "no data_checks.json in the run folder"}
    report = read_json(run_dir.data_checks)
    return {"verdict": report["verdict"], "summary": report["summary"],
            "anomalies": [a["code"] for a in report.get("anomalies", [])]}


def _write_outputs(run_dir: RunDir, metrics: dict[str, Any], fitted: _Fitted, scored: _Scored, test: Any,
                   y_test: Any, champion_prob: Any) -> list[str]:
    """Predictions, the operating point, the report and every plot; returns the plot paths."""
    import numpy as np
    import pandas as pd

    from covid_tasks import calibration, shortcut_audit
    from covid_tasks.operating_point import record
    from covid_tasks.plots import confusion_figure, roc_figure
    from covid_tasks.stats import sigmoid

    threshold = metrics["threshold"]
    names = np.array(CLASS_NAMES)
    preds = pd.DataFrame({
        "filename": test["filename"], "patientid": test["patientid"], "label": test["label"],
        "prob_covid": scored.prob.astype(float), "predicted": names[scored.predicted],
        "logit_uncalibrated": scored.z.astype(float),
        "prob_covid_lungs_hidden": scored.views["lungs_hidden"].astype(float),
        "prob_covid_outside_hidden": scored.views["outside_hidden"].astype(float),
    })
    write_csv(run_dir.predictions, preds)
    write_csv(run_dir.val_predictions, fitted.val_frame)
    champion = metrics["champion"]
    if champion_prob is not None:
        write_csv(run_dir.champion_predictions, preds[["filename", "patientid", "label"]].assign(
            prob_covid=champion_prob.astype(float),
            predicted=names[(champion_prob >= champion["threshold"]).astype(int)]))
    write_json(run_dir.operating_point, record(metrics, run_dir.key))
    report_text = classification_report(y_test, scored.predicted)[0]
    header = (f"Test split, n={metrics['n']}, positive class '{CLASS_NAMES[POSITIVE_INDEX]}', "
              f"threshold {threshold:.6f} on the calibrated P(covid) ({THRESHOLD_RULE})\n\n")
    write_bytes_atomic(run_dir.classification_report, (header + report_text).encode())
    cal = metrics["calibration"]
    curves = [("challenger", scored.prob, metrics)]
    if champion is not None:
        curves.append((f"champion v{champion['version']}", champion_prob, champion))
    plots = [confusion_figure(run_dir.figure("confusion_matrix"), metrics),
             roc_figure(run_dir.figure("roc_curve"), y_test, curves)]
    plots.append(calibration.reliability_plot(run_dir.figure("reliability"), y_test, sigmoid(scored.z),
                                              scored.prob, (cal["ece_before"], cal["ece_after"])))
    plots.append(shortcut_audit.plot(run_dir.figure("shortcut_audit"), scored.examples,
                                     metrics["shortcut_audit"]))
    return plots


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
                    fmt(audit["roc_auc_full"]), fmt(audit["roc_auc_lungs_hidden"]),
                    fmt(audit["roc_auc_outside_hidden"]))
    logger.info("evaluate: calibration %s: test ECE %s -> %s, Brier %s -> %s", cal["method"],
                fmt(cal["ece_before"]), fmt(cal["ece_after"]), fmt(cal["brier_before"]),
                fmt(cal["brier_after"]))


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
    from covid_tasks.dataset import predict_split

    prob = predict_split(loaded.model, test, images, cfg.replace(img_size=loaded.img_size))
    m = binary_metrics(y_test, prob, loaded.threshold, seed=cfg.seed)
    champion = {"version": str(entry.version), "run_key": (entry.tags or {}).get("run_key"),
                "img_size": loaded.img_size, "threshold_source": OPERATING_POINT, **m}
    logger.info("evaluate: champion v%s on the same %d test images: sensitivity %s specificity %s "
                "at its threshold %.4f", entry.version, m["n"], fmt(m["sensitivity"]),
                fmt(m["specificity"]), loaded.threshold)
    return champion, prob
