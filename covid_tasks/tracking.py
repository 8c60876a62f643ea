"""What a run records in MLflow: params, test metrics, run and version tags, the version's description.

Pure functions of ``metrics.json``, the config and the run's context; :mod:`covid_tasks.stages.register`
writes them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX, Config, redact_uri
from covid_tasks.layout import DataRoot
from covid_tasks.subgroups import metric_scalars as subgroup_scalars
from covid_tasks.training_data import training_data

#: metrics.json entries that are settings or counts, logged as params rather than test metrics.
SETTINGS = ("min_sensitivity", "min_specificity", "promotion_margin", "img_size", "bootstrap_resamples",
            "n", "n_test", "n_val", "gate_on", "threshold_rule")


def decision_tags(metrics: dict[str, Any], decision: str) -> dict[str, str]:
    """Run tags naming each decision and the rule that made it."""
    promotion = metrics.get("promotion") or {}
    audit = metrics.get("shortcut_audit") or {}
    return {"decision": decision, "gate_on": str(metrics.get("gate_on", "point")),
            "gate": "passed" if metrics["passed"] else "failed",
            "promotion_rule": str(promotion.get("rule", "")),
            "promotion_reason": str(promotion.get("reason", ""))[:5000],
            "shortcut_audit": "warning" if audit.get("warning") else "ok",
            "shortcut_audit_warning": str(audit.get("warning") or "none")[:5000],
            "data_check": str((metrics.get("data_check") or {}).get("verdict", "unchecked"))}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def split_counts(root: DataRoot) -> dict[str, int]:
    """Images, covid images and patients per split, from ``splits.csv`` (empty when absent)."""
    import pandas as pd

    path = root.splits
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = {}
    positive = CLASS_NAMES[POSITIVE_INDEX]
    for name, part in frame.groupby("split"):
        out[f"n_{name}"] = len(part)
        out[f"n_{name}_{positive}"] = int((part["label"] == positive).sum())
        if "patientid" in part:
            out[f"n_{name}_patients"] = int(part["patientid"].nunique())
    return out


def metric_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric results of ``metrics.json`` as MLflow metrics; intervals as ``_low``/``_high``.

    Settings and counts (``SETTINGS``) are params, not metrics. The calibration, the shortcut
    audit and the promotion's paired differences get the prefixes ``calibration_``,
    ``shortcut_`` and ``promotion_delta_``; the within-source and subgroup figures
    ``within_source_`` and ``subgroup_`` (:func:`covid_tasks.subgroups.metric_scalars`); the
    probe head's C, inner AUC and flags (``probe.json``) keep their ``probe_`` names.
    """
    out: dict[str, float] = {}

    def add(prefix: str, source: dict[str, Any]) -> None:
        for k, v in source.items():
            if isinstance(v, bool) or v is None or k in SETTINGS:
                continue
            if isinstance(v, (int, float)):
                out[f"{prefix}{k}"] = float(v)
            elif k.endswith("_ci95") and isinstance(v, list) and len(v) == 2 and None not in v:
                out[f"{prefix}{k}_low"], out[f"{prefix}{k}_high"] = float(v[0]), float(v[1])

    add("test_", {k: v for k, v in metrics.items() if not k.startswith("val_")})
    add("", {k: v for k, v in metrics.items() if k.startswith("val_")})
    if metrics.get("champion"):
        add("champion_test_", {k: v for k, v in metrics["champion"].items() if k != "version"})
    cal = metrics.get("calibration") or {}
    add("calibration_", {**{k: v for k, v in cal.items() if k.startswith(("ece_", "brier_", "val_"))},
                         **{f"param_{k}": v for k, v in (cal.get("params") or {}).items()}})
    audit = metrics.get("shortcut_audit") or {}
    add("shortcut_", {k: v for k, v in audit.items() if k.startswith("roc_auc")})
    for name, delta in ((metrics.get("promotion") or {}).get("metric_deltas") or {}).items():
        add("promotion_delta_", {name: delta.get("point"), f"{name}_ci95": delta.get("ci95")})
    out.update(subgroup_scalars(metrics))
    probe = metrics.get("probe") or {}
    add("", {k: v for k, v in probe.items() if k in ("probe_c", "probe_inner_auc", "probe_inner_auc_ci95")})
    if probe:
        out["probe_c_at_edge"] = float(bool(probe.get("probe_c_at_edge")))
        if probe.get("probe_signal") is not None:
            out["probe_signal"] = float(bool(probe["probe_signal"]))
    out["gate_passed"] = float(bool(metrics["passed"]))
    out["promote"] = float(bool(metrics.get("promote", False)))
    return {k: v for k, v in out.items() if v == v}  # MLflow stores NaN, but the UI cannot plot it


def run_params(root: DataRoot, cfg: Config, metrics: dict[str, Any], context: dict[str, Any],
            content: dict[str, str]) -> dict[str, str]:
    """Settings, data facts and provenance, as MLflow params (strings of at most 500 characters)."""
    from covid_tasks.operating_point import THRESHOLD_RESAMPLES
    from covid_tasks.promotion import PROMOTION_RESAMPLES

    params: dict[str, Any] = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                              for k, v in cfg.to_dict().items() if k not in ("mlflow_tracking_uri",)}
    params.update({k: v for k, v in context.items() if v is not None})
    params.update(split_counts(root))
    params.update({k: metrics[k] for k in SETTINGS if k in metrics and k not in ("n",)})
    params.update(git_commit=git_commit(), threshold_resamples=THRESHOLD_RESAMPLES,
                  promotion_resamples=PROMOTION_RESAMPLES, content_id=content["content_id"],
                  model_sha256=content["model_sha256"],
                  calibration_method=(metrics.get("calibration") or {}).get("method", "none"),
                  champion_version_compared=(metrics.get("champion") or {}).get("version", "none"))
    trained_on = training_data(root, cfg.source_uri, context.get("dataset_version"))
    params.update(demo=str(trained_on["demo"]).lower(), training_images=trained_on["images"])
    return {k: str(v)[:500] for k, v in params.items()}


def version_tags(cfg: Config, metrics: dict[str, Any], run_key: str, context: dict[str, Any],
                  content: dict[str, str], model_id: str) -> dict[str, str]:
    champion = metrics.get("champion") or {}
    cal = metrics.get("calibration") or {}
    audit = metrics.get("shortcut_audit") or {}
    # What the model was trained on, and whether it is a demo (the inference service shows both).
    trained_on = training_data(DataRoot.of(cfg), cfg.source_uri, context.get("dataset_version"))
    tags = {
        "run_key": run_key,
        "content_id": content["content_id"],
        "model_sha256": content["model_sha256"],
        "operating_point_sha256": content["operating_point_sha256"],
        "model_id": model_id,
        "source_uri": redact_uri(cfg.source_uri),
        "dataset_version": str(context.get("dataset_version", "unknown")),
        "logical_date": str(context.get("logical_date") or ""),
        "data_check": str((metrics.get("data_check") or {}).get("verdict", "unchecked")),
        "airflow_run_id": str(context.get("airflow_run_id", "unknown")),
        "gate": "passed",
        "gate_on": str(metrics.get("gate_on", "point")),
        "decision": "pending",
        "promotion_rule": str((metrics.get("promotion") or {}).get("rule", "")),
        "threshold": f"{metrics['threshold']:.6f}",
        "threshold_rule": metrics.get("threshold_rule", ""),
        "output": output_note(cal),
        "calibration": str(cal.get("method", "none")),
        "min_sensitivity": str(metrics["min_sensitivity"]),
        "min_specificity": str(metrics["min_specificity"]),
        "promotion_margin": str(metrics.get("promotion_margin", "")),
        "champion_compared": str(champion.get("version", "none")),
        "shortcut_audit": "warning" if audit.get("warning") else "ok",
        "n_test": str(metrics.get("n_test", "")),
        "backbone": cfg.backbone,
        "img_size": str(metrics.get("img_size", cfg.img_size)),
        "git_commit": git_commit(),
        "training_data": json.dumps(trained_on, separators=(",", ":")),
        "demo": str(trained_on["demo"]).lower(),
    }
    for name in ("sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc"):
        value = metrics.get(name)
        tags[name] = "nan" if value is None else f"{value:.4f}"
        ci = metrics.get(f"{name}_ci95")
        if ci and None not in ci:
            tags[f"{name}_ci95"] = f"[{ci[0]:.4f}, {ci[1]:.4f}]"
    for key in ("ece_after", "brier_after"):
        if cal.get(key) is not None:
            tags[key] = f"{cal[key]:.4f}"
    if audit.get("roc_auc_lungs_hidden") is not None:
        tags["roc_auc_lungs_hidden"] = f"{audit['roc_auc_lungs_hidden']:.4f}"
    return tags


def output_note(cal: dict[str, Any]) -> str:
    method = cal.get("method", "none")
    return f"calibrated P(covid) ({method})" if method != "none" else "P(covid), not calibrated"


def version_description(metrics: dict[str, Any], run_key: str) -> str:
    promotion = metrics.get("promotion") or {}
    return (f"run {run_key}: sensitivity {metrics['sensitivity']:.3f}, specificity "
            f"{metrics['specificity']:.3f} at threshold {metrics['threshold']:.3f} on "
            f"{metrics.get('n_test')} test images; output {output_note(metrics.get('calibration') or {})}; "
            f"promotion rule {promotion.get('rule', 'n/a')}: {promotion.get('reason', '')}")


