"""What ``make run`` prints at the end: the latest run's gate result and the registry's champion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, Config
from covid_tasks.storage import read_json


def summary(cfg: Config) -> tuple[str, dict[str, Any]]:
    """Return a human-readable summary and the same facts as a dict."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    lines = []
    result: dict[str, Any] = {"tracking_uri": cfg.tracking_uri, "model_name": cfg.model_name}
    runs = sorted((cfg.root / "runs").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if runs:
        m = read_json(runs[-1])
        result["latest_run"] = {"run_dir": str(runs[-1].parent), **{k: m.get(k) for k in (
            "passed", "sensitivity", "specificity", "threshold", "roc_auc", "n_test", "reasons")}}
        verdict = "PASSED" if m["passed"] else "FAILED: " + "; ".join(m.get("reasons", []))
        lines.append(f"Latest run: {runs[-1].parent}")
        lines.append(f"  test sensitivity {m['sensitivity']:.3f} (min {m['min_sensitivity']}), "
                     f"specificity {m['specificity']:.3f} (min {m['min_specificity']}), "
                     f"ROC AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 3)}, "
                     f"threshold {m['threshold']:.3f}, n_test {m['n_test']}")
        lines.append(f"  gate {verdict}")
    client = MlflowClient(cfg.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, CHAMPION_ALIAS)
        result["champion_version"] = int(mv.version)
        lines.append(f"Registered: {cfg.model_name} version {mv.version} is @{CHAMPION_ALIAS} "
                     f"(sensitivity {mv.tags.get('sensitivity')}, specificity {mv.tags.get('specificity')}, "
                     f"run {mv.tags.get('run_key')})")
    except MlflowException:
        result["champion_version"] = None
        lines.append(f"Registered: no {cfg.model_name}@{CHAMPION_ALIAS} in {cfg.tracking_uri} yet")
    sample = next(iter(sorted(Path(cfg.root / "raw" / "images").glob("*"))), None)
    lines += [
        "Look it up:",
        f"  MLFLOW_TRACKING_URI={cfg.tracking_uri} .venv/bin/mlflow models list 2>/dev/null || "
        f".venv/bin/python -c \"from mlflow import MlflowClient; "
        f"print(MlflowClient('{cfg.tracking_uri}').get_model_version_by_alias('{cfg.model_name}', "
        f"'{CHAMPION_ALIAS}'))\"",
        "Predict:",
        f"  COVID_MLFLOW_TRACKING_URI={cfg.tracking_uri} .venv/bin/python -m covid_tasks predict "
        f"{sample or '<image>'} --model models:/{cfg.model_name}@{CHAMPION_ALIAS}",
        f"Browse: .venv/bin/mlflow ui --backend-store-uri {cfg.tracking_uri}",
    ]
    return "\n".join(lines), result
