"""Register stage: log the run to MLflow, register a passing model, move the aliases in a safe order.

* One MLflow run per DAG run (tag ``run_key``) holds params (hyper-parameters, data version, split
  counts, Airflow run id, git commit), per-epoch and test metrics (with interval bounds, and the
  champion's figures on the same test split) and the evaluation artifacts.
* A model that passed the gate is saved with ``mlflow.keras`` (signature and input example), with
  ``class_indices.json`` and ``operating_point.json`` beside it, and registered as a new version
  of ``covid-xray-classifier`` tagged with its metrics, thresholds, data version and decision.
* Aliases: once the version is READY it takes ``challenger``; only then, and only when evaluate
  decided ``promote``, does ``champion`` move to it. A reader therefore never finds an alias on a
  version that is not READY, and ``champion`` never moves to an unvetted version.
* A failing model is not registered; the task still succeeds and logs why. A registry error
  raises (the task fails and Airflow retries) before any alias has moved.
* A retry finds the version already tagged with the run key and does not register twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from covid_tasks.config import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    CLASS_NAMES,
    POSITIVE_INDEX,
    Config,
    sqlite_path,
)
from covid_tasks.registry import alias_version_number
from covid_tasks.storage import jsonable, read_json, require_file, write_json

logger = logging.getLogger(__name__)

ARTIFACT_GLOBS = ("*.png", "*.json", "*.txt", "predictions.csv", "champion_predictions.csv")
PIP_REQUIREMENTS = ("tensorflow==2.21.0", "keras==3.15.1", "pillow==13.0.0")
#: How long to wait for a new model version to become READY.
READY_TIMEOUT_S = 300.0
_LOGGED_TAG = "run_logged"


def register(data_root: str | Path, cfg: Config, run_key: str, context: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Log this run to MLflow; register a passing model, alias it ``challenger``, promote if decided.

    Args:
        data_root: the data root (for the split counts).
        cfg: configuration (``tracking_uri``, ``experiment_name``, ``model_name``).
        run_key: this run's key; reads ``<data_root>/runs/<run_key>/``.
        context: small extra facts to log as params (``dataset_version``, ``airflow_run_id``).

    Returns:
        ``{"mlflow_run_id", "registered", "model_name", "version", "alias", "aliases",
        "promoted", "decision", "champion_version", "model_uri", "passed", "reasons",
        "promotion_reasons", "tracking_uri"}``; ``champion_version`` is the champion after
        this step.

    Raises:
        FileNotFoundError: ``metrics.json`` or the model is missing.
        mlflow.exceptions.MlflowException: the tracking server is unreachable or refuses a call;
            no alias is changed when this happens before the version is READY.
        RuntimeError: the new version ended in ``FAILED_REGISTRATION`` or never became READY.
    """
    import mlflow
    from mlflow import MlflowClient

    context = context or {}
    run_dir = cfg.run_dir(run_key)
    metrics = read_json(require_file(run_dir / "metrics.json", "evaluate"))
    model_path = require_file(run_dir / "finetune.keras", "finetune")
    tracking_uri = cfg.tracking_uri
    logger.info("register: %s -> %s (passed=%s, decision=%s)", run_dir, tracking_uri, metrics["passed"],
                metrics.get("decision"))
    db_file = sqlite_path(tracking_uri)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # mlflow.register_model uses the process-wide registry
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment_id = _experiment(client, cfg)

    result: dict[str, Any] = {
        "mlflow_run_id": None, "registered": False, "model_name": cfg.model_name, "version": None,
        "alias": None, "aliases": [], "promoted": False, "decision": metrics.get("decision", "reject"),
        "champion_version": None, "model_uri": None, "passed": bool(metrics["passed"]),
        "reasons": metrics.get("reasons", []), "promotion_reasons": metrics.get("promotion_reasons", []),
        "tracking_uri": tracking_uri,
    }
    run = _find_run(client, experiment_id, run_key)
    with mlflow.start_run(run_id=run.info.run_id if run else None, experiment_id=experiment_id,
                          run_name=run_key, tags={"run_key": run_key}) as active:
        run_id = active.info.run_id
        result["mlflow_run_id"] = run_id
        if run is None or run.data.tags.get(_LOGGED_TAG) != "true":
            _log_run(run_dir, Path(data_root), cfg, metrics, context)
            mlflow.set_tag(_LOGGED_TAG, "true")
        if not metrics["passed"]:
            mlflow.set_tag("decision", "reject")
            current = alias_version_number(client, cfg.model_name, CHAMPION_ALIAS)
            result.update(decision="reject", champion_version=current)
            logger.warning("register: gate failed, nothing registered (champion stays %s): %s", current,
                           "; ".join(result["reasons"]))
            logger.info("register: done %s", json.dumps(jsonable(result)))
            return jsonable(result)
        existing = _existing_version(client, cfg.model_name, run_key)
        if existing is not None:
            version = existing.version
            logger.info("register: version %s already holds run %s; not registering again", version, run_key)
        else:
            version = _register_model(client, run_id, model_path, cfg, metrics, run_key, context)
        mlflow.set_tag("model_version", str(version))

    _wait_ready(client, cfg.model_name, str(version))
    client.set_registered_model_alias(cfg.model_name, CHALLENGER_ALIAS, str(version))
    aliases = [CHALLENGER_ALIAS]
    promoted, why_not = _promote(client, cfg.model_name, str(version), metrics)
    if promoted:
        aliases.append(CHAMPION_ALIAS)
    decision = "promote" if promoted else "challenger"
    client.set_model_version_tag(cfg.model_name, str(version), "decision", decision)
    client.set_tag(run_id, "decision", decision)
    result.update(registered=True, version=int(version), aliases=aliases, alias=aliases[-1],
                  promoted=promoted, decision=decision,
                  champion_version=alias_version_number(client, cfg.model_name, CHAMPION_ALIAS),
                  promotion_reasons=result["promotion_reasons"] + why_not,
                  model_uri=f"models:/{cfg.model_name}/{version}")
    logger.info("register: done %s", json.dumps(jsonable(result)))
    return jsonable(result)


def _promote(client: Any, name: str, version: str, metrics: dict[str, Any]) -> tuple[bool, list[str]]:
    """Move ``champion`` to ``version`` if evaluate decided so against the champion still in place.

    Returns:
        ``(promoted, reasons_not_promoted)``. When the champion changed after evaluate compared
        against it, the version is not promoted (re-run evaluate to compare with the new one).
    """
    current = alias_version_number(client, name, CHAMPION_ALIAS)
    if current == version:
        return True, []  # a retry after the alias had already moved
    if not metrics.get("promote", False):
        logger.info("register: version %s stays %s; champion stays %s: %s", version, CHALLENGER_ALIAS,
                    current, "; ".join(metrics.get("promotion_reasons", [])))
        return False, []
    compared = (metrics.get("champion") or {}).get("version")
    if current != (str(compared) if compared is not None else None):
        reason = (f"champion changed since evaluate (compared with {compared}, now {current}); "
                  "re-run evaluate to compare with the current champion")
        logger.warning("register: not promoting version %s: %s", version, reason)
        return False, [reason]
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    logger.info("register: version %s is now %s (was %s)", version, CHAMPION_ALIAS, current)
    return True, []


def _experiment(client: Any, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is not None:
        return exp.experiment_id
    db_file = sqlite_path(cfg.tracking_uri)
    artifact_location = (db_file.parent / "artifacts").as_uri() if db_file is not None else None
    return client.create_experiment(cfg.experiment_name, artifact_location=artifact_location)


def _existing_version(client: Any, name: str, run_key: str) -> Any | None:
    if _model_exists(client, name):
        found = client.search_model_versions(f"name='{name}' and tag.run_key='{run_key}'")
        if found:
            return max(found, key=lambda v: int(v.version))
    return None


def _model_exists(client: Any, name: str) -> bool:
    return bool(client.search_registered_models(f"name='{name}'"))


def _find_run(client: Any, experiment_id: str, run_key: str) -> Any | None:
    runs = client.search_runs([experiment_id], f"tags.run_key = '{run_key}'", max_results=1)
    return runs[0] if runs else None


def _wait_ready(client: Any, name: str, version: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll the version until READY; raise on FAILED_REGISTRATION or timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        status = str(client.get_model_version(name, version).status)
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RuntimeError(f"{name} version {version} failed registration; no alias was moved")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} version {version} still {status} after {timeout:.0f}s; "
                               "no alias was moved")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _split_counts(data_root: Path) -> dict[str, int]:
    """Images, covid images and patients per split, from ``splits.csv`` (empty when absent)."""
    import pandas as pd

    path = data_root / "splits.csv"
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


def _test_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries of ``metrics.json`` as MLflow metrics; intervals as ``_low``/``_high``."""
    out: dict[str, float] = {}

    def add(prefix: str, source: dict[str, Any]) -> None:
        for k, v in source.items():
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)):
                out[f"{prefix}{k}"] = float(v)
            elif k.endswith("_ci95") and isinstance(v, list) and len(v) == 2 and None not in v:
                out[f"{prefix}{k}_low"], out[f"{prefix}{k}_high"] = float(v[0]), float(v[1])

    add("test_", metrics)
    if metrics.get("champion"):
        add("champion_test_", {k: v for k, v in metrics["champion"].items() if k != "version"})
    out["gate_passed"] = float(bool(metrics["passed"]))
    out["promote"] = float(bool(metrics.get("promote", False)))
    return out


def _log_run(run_dir: Path, data_root: Path, cfg: Config, metrics: dict[str, Any],
             context: dict[str, Any]) -> None:
    import mlflow

    params = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
              for k, v in cfg.to_dict().items() if k not in ("mlflow_tracking_uri",)}
    params.update({k: v for k, v in context.items() if v is not None})
    params.update(_split_counts(data_root))
    params["git_commit"] = _git_commit()
    params["threshold_rule"] = metrics.get("threshold_rule", "")
    champion = metrics.get("champion") or {}
    params["champion_version_compared"] = champion.get("version", "none")
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    for phase in ("train", "finetune"):
        hist_path = run_dir / f"{phase}_history.json"
        if hist_path.is_file():
            history = read_json(hist_path)
            for step in range(max((len(v) for v in history.values()), default=0)):
                mlflow.log_metrics({f"{phase}_{name}": values[step] for name, values in history.items()
                                    if step < len(values) and values[step] is not None}, step=step)
    mlflow.log_metrics(_test_scalars(metrics))
    for pattern in ARTIFACT_GLOBS:
        for f in sorted(run_dir.glob(pattern)):
            mlflow.log_artifact(str(f), artifact_path="evaluation")


def _register_model(client: Any, run_id: str, model_path: Path, cfg: Config, metrics: dict[str, Any],
                    run_key: str, context: dict[str, Any]) -> str:
    """Save with ``mlflow.keras`` into a prepared folder, log it, register it; returns the version."""
    import keras
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    model = keras.saving.load_model(model_path)
    size = int(model.input_shape[1])
    example = np.full((1, size, size, 3), 127.0, dtype="float32")
    signature = infer_signature(example, model.predict(example, verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        local.mkdir()  # mlflow 3.17 writes the input example before creating the folder
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=example,
                                pip_requirements=list(PIP_REQUIREMENTS))
        mapping = model_path.parent / "class_indices.json"
        if mapping.is_file():
            shutil.copy(mapping, local / "class_indices.json")
        else:
            write_json(local / "class_indices.json", {n: i for i, n in enumerate(CLASS_NAMES)})
        write_json(local / "operating_point.json", {
            "threshold": metrics["threshold"], "positive_class": CLASS_NAMES[POSITIVE_INDEX],
            "rule": metrics.get("threshold_rule", ""), "img_size": size, "run_key": run_key,
            "input": "float32 RGB 0..255, shape (N, img_size, img_size, 3); output P(covid)",
            "test_sensitivity": metrics["sensitivity"], "test_specificity": metrics["specificity"]})
        mlflow.log_artifacts(str(local), artifact_path="model")
    champion = metrics.get("champion") or {}
    tags = {
        "run_key": run_key,
        "source_uri": cfg.source_uri,
        "dataset_version": str(context.get("dataset_version", "unknown")),
        "airflow_run_id": str(context.get("airflow_run_id", "unknown")),
        "gate": "passed",
        "decision": "pending",
        "threshold": f"{metrics['threshold']:.6f}",
        "threshold_rule": metrics.get("threshold_rule", ""),
        "min_sensitivity": str(metrics["min_sensitivity"]),
        "min_specificity": str(metrics["min_specificity"]),
        "promotion_margin": str(metrics.get("promotion_margin", "")),
        "champion_compared": str(champion.get("version", "none")),
        "n_test": str(metrics.get("n_test", "")),
        "backbone": cfg.backbone,
        "img_size": str(size),
        "git_commit": _git_commit(),
    }
    for name in ("sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc"):
        value = metrics.get(name)
        tags[name] = "nan" if value is None else f"{value:.4f}"
        ci = metrics.get(f"{name}_ci95")
        if ci and None not in ci:
            tags[f"{name}_ci95"] = f"[{ci[0]:.4f}, {ci[1]:.4f}]"
    version = mlflow.register_model(f"runs:/{run_id}/model", cfg.model_name, tags=tags)
    client.update_model_version(cfg.model_name, version.version,
                                description=f"run {run_key}: sensitivity {metrics['sensitivity']:.3f}, "
                                            f"specificity {metrics['specificity']:.3f} at threshold "
                                            f"{metrics['threshold']:.3f} on {metrics.get('n_test')} "
                                            "test images")
    return str(version.version)
