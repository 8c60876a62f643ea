"""Register stage: log the run to MLflow and, when the gate passed, register and promote the model.

One MLflow run per DAG run (tagged ``run_key``) holds params, per-epoch and test metrics and the
run's artifacts. A passing model becomes a new version of ``covid-xray-classifier``; the alias
``champion`` that downstream services read is moved only after the version is READY. A retry
finds the version already tagged with the run key and does not register twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, Config
from covid_tasks.storage import jsonable, read_json, require_file, write_json

logger = logging.getLogger(__name__)

ARTIFACT_GLOBS = ("*.png", "*.json", "predictions.csv")
PIP_REQUIREMENTS = ("tensorflow==2.21.0", "keras==3.15.1", "pillow==13.0.0")


def register(data_root: str | Path, cfg: Config, run_key: str, context: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Log this run to MLflow; register and alias the fine-tuned model if it passed the gate.

    Args:
        data_root: the data root (for the split and pull reports).
        cfg: configuration (``mlflow_tracking_uri``, ``experiment_name``, ``model_name``).
        run_key: this run's key; reads ``<data_root>/runs/<run_key>/``.
        context: small extra facts to log as params (dataset version, Airflow run id).

    Returns:
        ``{"mlflow_run_id", "registered", "model_name", "version", "alias", "model_uri",
        "passed", "reasons", "tracking_uri"}``.

    Raises:
        FileNotFoundError: ``metrics.json`` or the model is missing.
        mlflow.exceptions.MlflowException: the tracking server is unreachable or refuses a call;
            no alias is changed in that case.
    """
    import mlflow
    from mlflow import MlflowClient

    run_dir = cfg.run_dir(run_key)
    metrics = read_json(require_file(run_dir / "metrics.json", "evaluate"))
    model_path = require_file(run_dir / "finetune.keras", "finetune")
    tracking_uri = cfg.tracking_uri
    logger.info("register: %s -> %s (passed=%s)", run_dir, tracking_uri, metrics["passed"])
    Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True) \
        if tracking_uri.startswith("sqlite:///") else None
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = _experiment(client, cfg)

    existing = client.search_model_versions(f"name='{cfg.model_name}' and tag.run_key='{run_key}'") \
        if _model_exists(client, cfg.model_name) else []
    run_id = _find_run(client, experiment_id, run_key)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_key,
                          tags={"run_key": run_key}) as run:
        run_id = run.info.run_id
        if not existing:
            _log_run(run_dir, cfg, metrics, context or {})
        result: dict[str, Any] = {
            "mlflow_run_id": run_id, "registered": False, "model_name": cfg.model_name, "version": None,
            "alias": None, "model_uri": None, "passed": bool(metrics["passed"]),
            "reasons": metrics.get("reasons", []), "tracking_uri": tracking_uri,
        }
        if not metrics["passed"]:
            logger.warning("register: gate failed, nothing registered: %s", "; ".join(result["reasons"]))
            return jsonable(result)
        if existing:
            version = existing[0]
            logger.info("register: version %s already holds run %s; not registering again",
                        version.version, run_key)
        else:
            version = _register_model(client, run_id, model_path, cfg, metrics, run_key, context or {})
    client.set_registered_model_alias(cfg.model_name, CHAMPION_ALIAS, version.version)
    result.update(registered=True, version=int(version.version), alias=CHAMPION_ALIAS,
                  model_uri=f"models:/{cfg.model_name}@{CHAMPION_ALIAS}")
    logger.info("register: done %s", json.dumps(result))
    return jsonable(result)


def _experiment(client: Any, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if cfg.tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(cfg.experiment_name, artifact_location=artifact_location)


def _model_exists(client: Any, name: str) -> bool:
    return bool(client.search_registered_models(f"name='{name}'"))


def _find_run(client: Any, experiment_id: str, run_key: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.run_key = '{run_key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _log_run(run_dir: Path, cfg: Config, metrics: dict[str, Any], context: dict[str, Any]) -> None:
    import mlflow

    params = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
              for k, v in cfg.to_dict().items() if k not in ("mlflow_tracking_uri",)}
    params.update({k: v for k, v in context.items() if v is not None})
    params["git_commit"] = _git_commit()
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    for phase in ("train", "finetune"):
        hist_path = run_dir / f"{phase}_history.json"
        if hist_path.is_file():
            for name, values in read_json(hist_path).items():
                for step, value in enumerate(values):
                    mlflow.log_metric(f"{phase}_{name}", value, step=step)
    scalars = {f"test_{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    scalars["gate_passed"] = float(bool(metrics["passed"]))
    mlflow.log_metrics(scalars)
    for pattern in ARTIFACT_GLOBS:
        for f in sorted(run_dir.glob(pattern)):
            mlflow.log_artifact(str(f), artifact_path="evaluation")


def _register_model(client: Any, run_id: str, model_path: Path, cfg: Config, metrics: dict[str, Any],
                    run_key: str, context: dict[str, Any]) -> Any:
    """Save with ``mlflow.keras`` into a prepared folder, log it, register it, wait until READY."""
    import keras
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    model = keras.saving.load_model(model_path)
    example = np.zeros((1, cfg.img_size, cfg.img_size, 3), dtype="float32")
    signature = infer_signature(example, model.predict(example, verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        local.mkdir()  # mlflow 3.17 writes the input example before creating the folder
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=example,
                                pip_requirements=list(PIP_REQUIREMENTS))
        shutil.copy(model_path.parent / "class_indices.json", local / "class_indices.json")
        write_json(local / "operating_point.json", {
            "threshold": metrics["threshold"], "positive_class": "covid",
            "rule": metrics.get("threshold_rule", ""), "img_size": cfg.img_size})
        mlflow.log_artifacts(str(local), artifact_path="model")
    tags = {
        "run_key": run_key,
        "source_uri": cfg.source_uri,
        "dataset_version": str(context.get("dataset_version", "unknown")),
        "gate": "passed",
        "threshold": f"{metrics['threshold']:.6f}",
        "sensitivity": f"{metrics['sensitivity']:.4f}",
        "specificity": f"{metrics['specificity']:.4f}",
        "min_sensitivity": str(metrics["min_sensitivity"]),
        "min_specificity": str(metrics["min_specificity"]),
        "backbone": cfg.backbone,
        "img_size": str(cfg.img_size),
    }
    version = mlflow.register_model(f"runs:/{run_id}/model", cfg.model_name, tags=tags)
    client.update_model_version(cfg.model_name, version.version,
                                description=f"run {run_key}: sensitivity {metrics['sensitivity']:.3f}, "
                                            f"specificity {metrics['specificity']:.3f} at threshold "
                                            f"{metrics['threshold']:.3f}")
    return version
