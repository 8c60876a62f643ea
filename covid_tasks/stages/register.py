"""Register stage: log the run to MLflow, register a passing model, move the aliases in a safe order.

* What is registered is identified by **content**: ``content_id`` hashes the evaluated model file
  (``model.keras``, calibrated) and its ``operating_point.json``. An MLflow run, a logged model
  and a model version are reused only when they carry the same ``run_key`` *and* ``content_id``;
  a re-run that re-trained or re-evaluated under the same run key gets a new run and version,
  so a reported version always holds the evaluated model.
* One MLflow run per evaluated model (tags ``run_key``, ``content_id``) holds params (settings,
  data version, split counts, Airflow run id, git commit), per-epoch metrics (step = the 1-based
  epoch the logs print), test metrics with interval bounds, the champion's figures and the
  evaluation artifacts, and tags naming the decisions and the rule that made them.
* A model that passed the gate is logged as an **MLflow 3 logged model** of that run (``keras``
  flavour, signature, input example, explicit requirements, plus ``class_indices.json`` and
  ``operating_point.json``; the run's params and test metrics linked to it) and registered from
  it as a new version of ``covid-xray-classifier`` tagged with its metrics, thresholds, data
  version and decisions. The version's artifacts keep the layout services read:
  ``data/model.keras``, ``class_indices.json``, ``operating_point.json``.
* Aliases: once the version is READY it takes ``challenger``; only then, and only when evaluate
  decided ``promote``, does ``champion`` move to it. A reader therefore never finds an alias on a
  version that is not READY, and ``champion`` never moves to an unvetted version.
* A failing model is not registered; the task still succeeds and logs why. A registry error
  raises before any alias has moved; an unreachable registry raises
  ``RegistryUnavailableError`` (one line naming the URI, after MLflow's bounded retries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from covid_tasks import model_card
from covid_tasks.config import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    Config,
    class_indices,
    redact_uri,
    sqlite_path,
)
from covid_tasks.layout import (
    CHAMPION_PREDICTIONS,
    CLASS_INDICES,
    MODEL_FILE,
    OPERATING_POINT,
    PREDICTIONS,
    SPLITS,
    VAL_PREDICTIONS,
    DataRoot,
    RunDir,
)
from covid_tasks.registry import alias_version_number, bound_mlflow_http, unavailable
from covid_tasks.storage import file_sha256, jsonable, read_json, require_file, write_json
from covid_tasks.tracking import (
    decision_tags,
    metric_scalars,
    run_params,
    version_description,
    version_tags,
)

logger = logging.getLogger(__name__)

ARTIFACT_GLOBS = ("*.png", "*.json", "*.txt", PREDICTIONS, VAL_PREDICTIONS, CHAMPION_PREDICTIONS)
#: Shipped with the model only: a folder holding it is taken for a servable model version.
RUN_ONLY_FILES = (OPERATING_POINT,)
PIP_REQUIREMENTS = ("tensorflow==2.21.0", "keras==3.15.1", "pillow==13.0.0")
#: How long to wait for a new model version to become READY.
READY_TIMEOUT_S = 300.0
LOGGED_MODEL_NAME = "model"
_LOGGED_TAG = "run_logged"


def register(cfg: Config, run_key: str, *, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log this run to MLflow; register a passing model, alias it ``challenger``, promote if decided.

    Args:
        cfg: configuration (``data_root``, ``tracking_uri``, ``experiment_name``, ``model_name``).
        run_key: this run's key; reads ``<data_root>/runs/<run_key>/``.
        context: small extra facts to log as params (``dataset_version``, ``airflow_run_id``).

    Returns:
        ``{"mlflow_run_id", "registered", "model_name", "version", "alias", "aliases",
        "promoted", "decision", "champion_version", "model_uri", "passed", "reasons",
        "promotion_reasons", "tracking_uri", "promotion_rule", "content_id", "model_id"}``;
        ``champion_version`` is the champion after this step, ``model_id`` the MLflow logged model.

    Raises:
        FileNotFoundError: ``metrics.json``, ``model.keras`` or ``operating_point.json`` is missing.
        ValueError: the model or operating point changed since evaluate wrote ``metrics.json``.
        covid_tasks.registry.RegistryUnavailableError: the tracking server cannot be reached.
        mlflow.exceptions.MlflowException: the registry refuses a call; no alias is changed when
            this happens before the version is READY.
        RuntimeError: the new version ended in ``FAILED_REGISTRATION`` or never became READY.
    """
    from mlflow.exceptions import MlflowException

    root = DataRoot.of(cfg)
    run_dir = root.run(run_key)
    metrics = read_json(require_file(run_dir.metrics, "evaluate"))
    content = _content(run_dir, metrics)
    tracking_uri = cfg.tracking_uri
    logger.info("register: %s -> %s (passed=%s, decision=%s, content %s)", run_dir.path,
                redact_uri(tracking_uri), metrics["passed"], metrics.get("decision"),
                content["content_id"][:12])
    bound_mlflow_http()
    try:
        return _register(root, cfg, run_dir, metrics, content, context or {})
    except MlflowException as exc:
        down = unavailable(exc, tracking_uri, f"register run {run_key}")
        if down is not None:
            raise down from exc
        raise
    except OSError as exc:  # requests' connection errors are OSErrors too
        down = unavailable(exc, tracking_uri, f"register run {run_key}")
        if down is not None:
            raise down from exc
        raise


def _content(run_dir: RunDir, metrics: dict[str, Any]) -> dict[str, str]:
    """Hashes of the evaluated model and its operating point; check they are what evaluate wrote.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the model file is not the one ``metrics.json`` describes.
    """
    model_path = require_file(run_dir.model, "evaluate")
    op_path = require_file(run_dir.operating_point, "evaluate")
    model_sha, op_sha = file_sha256(model_path), file_sha256(op_path)
    recorded = metrics.get("model_sha256")
    if recorded != model_sha or read_json(op_path).get("model_sha256") != model_sha:
        raise ValueError(f"{model_path} (sha256 {model_sha[:12]}) is not the model metrics.json and "
                         f"operating_point.json describe (sha256 {str(recorded)[:12]}); re-run evaluate")
    content_id = hashlib.sha256(f"{model_sha}:{op_sha}".encode()).hexdigest()
    return {"content_id": content_id, "model_sha256": model_sha, "operating_point_sha256": op_sha,
            "model_path": str(model_path), "operating_point_path": str(op_path)}


def _register(root: DataRoot, cfg: Config, run_dir: RunDir, metrics: dict[str, Any],
              content: dict[str, str], context: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    tracking_uri, run_key = cfg.tracking_uri, run_dir.key
    db_file = sqlite_path(tracking_uri)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # mlflow.register_model uses the process-wide registry
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment_id = _experiment(client, cfg)
    promotion = metrics.get("promotion") or {}
    result: dict[str, Any] = {
        "mlflow_run_id": None, "registered": False, "model_name": cfg.model_name, "version": None,
        "alias": None, "aliases": [], "promoted": False, "decision": metrics.get("decision", "reject"),
        "champion_version": None, "model_uri": None, "passed": bool(metrics["passed"]),
        "reasons": metrics.get("reasons", []), "promotion_reasons": metrics.get("promotion_reasons", []),
        "tracking_uri": redact_uri(tracking_uri), "promotion_rule": promotion.get("rule"),
        "content_id": content["content_id"], "model_id": None,
    }
    run = _find_run(client, experiment_id, run_key, content["content_id"])
    tags = {"run_key": run_key, "content_id": content["content_id"], "model_sha256": content["model_sha256"]}
    with mlflow.start_run(run_id=run.info.run_id if run else None, experiment_id=experiment_id,
                          run_name=run_key, tags=tags) as active:
        run_id = active.info.run_id
        result["mlflow_run_id"] = run_id
        if run is None or run.data.tags.get(_LOGGED_TAG) != "true":
            _log_run(run_dir, root, cfg, metrics, context, content)
            mlflow.set_tag(_LOGGED_TAG, "true")
        if not metrics["passed"]:
            mlflow.set_tags(decision_tags(metrics, "reject"))
            current = alias_version_number(client, cfg.model_name, CHAMPION_ALIAS)
            result.update(decision="reject", champion_version=current)
            logger.warning("register: gate failed, nothing registered (champion stays %s): %s", current,
                           "; ".join(result["reasons"]))
            return _finish(root, cfg, client, run_dir, metrics, context, result)
        model_id = _logged_model(client, experiment_id, run_id, cfg, metrics, content)
        version = _version(client, cfg, metrics, run_key, context, content, model_id)
        mlflow.set_tags({"model_version": str(version.version), "model_id": model_id})
    result["model_id"] = model_id
    _wait_ready(client, cfg.model_name, str(version.version))
    card = model_card.facts(root, cfg, metrics, context, version=str(version.version), run_key=run_key,
                            run_id=run_id, model_id=model_id)
    model_card.publish(client, cfg.model_name, str(version.version), card)  # before any alias moves
    if not version.description:  # a re-run completing a registration that stopped before this
        client.update_model_version(cfg.model_name, version.version,
                                    description=version_description(metrics, run_key))
    client.set_registered_model_alias(cfg.model_name, CHALLENGER_ALIAS, str(version.version))
    aliases = [CHALLENGER_ALIAS]
    promoted, why_not = _promote(client, cfg.model_name, str(version.version), metrics)
    if promoted:
        aliases.append(CHAMPION_ALIAS)
    decision = "promote" if promoted else "challenger"
    client.set_model_version_tag(cfg.model_name, str(version.version), "decision", decision)
    for key, value in decision_tags(metrics, decision).items():
        client.set_tag(run_id, key, value)
    result.update(registered=True, version=int(version.version), aliases=aliases, alias=aliases[-1],
                  promoted=promoted, decision=decision,
                  champion_version=alias_version_number(client, cfg.model_name, CHAMPION_ALIAS),
                  promotion_reasons=result["promotion_reasons"] + why_not,
                  model_uri=f"models:/{cfg.model_name}/{version.version}")
    return _finish(root, cfg, client, run_dir, metrics, context, result)


def _finish(root: DataRoot, cfg: Config, client: Any, run_dir: RunDir, metrics: dict[str, Any],
            context: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """After the decision: the run's history line, the timeline as an artifact, then retention."""
    from covid_tasks import history, retention
    from covid_tasks.tracking import split_counts

    counts = split_counts(root)
    history.record(root, run_key=run_dir.key, logical_date=context.get("logical_date"),
                   dataset_version=context.get("dataset_version"),
                   n_labelled=sum(counts.get(f"n_{s}", 0) for s in SPLITS) or None,
                   data_check=(metrics.get("data_check") or {}).get("verdict"),
                   roc_auc=metrics.get("roc_auc"), roc_auc_ci95=metrics.get("roc_auc_ci95"),
                   sensitivity=metrics.get("sensitivity"),
                   specificity=metrics.get("specificity"), decision=result["decision"],
                   version=result["version"], champion_version=result["champion_version"])
    figure = history.timeline_figure(history.load(root), run_dir.figure("timeline"),
                                     title=f"{cfg.model_name}: weekly retraining")
    client.log_artifact(result["mlflow_run_id"], figure, "history")
    result["retention"] = retention.apply(cfg, client, run_dir.key, context.get("logical_date"))
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


def _existing_version(client: Any, name: str, run_key: str, content_id: str) -> Any | None:
    """The newest version holding exactly this run's evaluated model (same run key and content)."""
    if _model_exists(client, name):
        found = client.search_model_versions(
            f"name='{name}' and tag.run_key='{run_key}' and tag.content_id='{content_id}'")
        if found:
            return max(found, key=lambda v: int(v.version))
    return None


def _model_exists(client: Any, name: str) -> bool:
    return bool(client.search_registered_models(f"name='{name}'"))


def _find_run(client: Any, experiment_id: str, run_key: str, content_id: str) -> Any | None:
    query = f"tags.run_key = '{run_key}' and tags.content_id = '{content_id}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
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






def _log_run(run_dir: RunDir, root: DataRoot, cfg: Config, metrics: dict[str, Any],
             context: dict[str, Any], content: dict[str, str]) -> None:
    """Params, per-epoch metrics (step = 1-based epoch), test metrics and evaluation artifacts."""
    import mlflow

    mlflow.log_params(run_params(root, cfg, metrics, context, content))
    for phase in ("train", "finetune"):
        hist_path = run_dir.history(phase)
        if hist_path.is_file():
            history = read_json(hist_path)
            for index in range(max((len(v) for v in history.values()), default=0)):
                mlflow.log_metrics({f"{phase}_{name}": values[index] for name, values in history.items()
                                    if index < len(values) and values[index] is not None}, step=index + 1)
    mlflow.log_metrics(metric_scalars(metrics))
    for pattern in ARTIFACT_GLOBS:
        for f in sorted(run_dir.path.glob(pattern)):
            if f.name not in RUN_ONLY_FILES:
                mlflow.log_artifact(str(f), artifact_path="evaluation")


def _logged_model(client: Any, experiment_id: str, run_id: str, cfg: Config, metrics: dict[str, Any],
                  content: dict[str, str]) -> str:
    """The run's READY logged model holding this content, logging it first if there is none.

    The model is saved with ``mlflow.keras.save_model`` into a folder made beforehand (mlflow 3.17
    writes the input example before creating it), then uploaded as the logged model's artifacts;
    the run's params and test metrics are linked to it.
    """
    import keras
    import mlflow
    import numpy as np
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model, infer_signature

    query = f"source_run_id = '{run_id}' AND tags.content_id = '{content['content_id']}'"
    found = client.search_logged_models([experiment_id], filter_string=query, max_results=10)
    ready = [m for m in found if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    if ready:
        logger.info("register: logged model %s already holds this content", ready[0].model_id)
        return ready[0].model_id
    params = client.get_run(run_id).data.params
    logged = mlflow.initialize_logged_model(
        name=LOGGED_MODEL_NAME, source_run_id=run_id, experiment_id=experiment_id, params=params,
        model_type="keras-binary-classifier",
        tags={k: content[k] for k in ("content_id", "model_sha256", "operating_point_sha256")})
    try:
        model = keras.saving.load_model(content["model_path"])
        size = int(model.input_shape[1])
        example = np.full((1, size, size, 3), 127.0, dtype="float32")
        signature = infer_signature(example, model.predict(example, verbose=0))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            local.mkdir()  # mlflow 3.17 writes the input example before creating the folder
            mlmodel = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                            model_id=logged.model_id)
            mlflow.keras.save_model(model, str(local), mlflow_model=mlmodel, signature=signature,
                                    input_example=example, pip_requirements=list(PIP_REQUIREMENTS))
            # The evaluated file itself, byte for byte (a re-save would differ in its timestamp), so
            # the version's data/model.keras has the SHA-256 its tags and operating point name.
            shutil.copy(content["model_path"], local / "data" / MODEL_FILE)
            write_json(local / CLASS_INDICES, class_indices())
            shutil.copy(content["operating_point_path"], local / OPERATING_POINT)
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0, run_id=run_id, model_id=logged.model_id)
                                          for k, v in metric_scalars(metrics).items()])
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    logger.info("register: logged model %s (%s) in run %s", logged.model_id, logged.artifact_location, run_id)
    return logged.model_id


def _version(client: Any, cfg: Config, metrics: dict[str, Any], run_key: str, context: dict[str, Any],
             content: dict[str, str], model_id: str) -> Any:
    """The model version holding this content: the existing one, or a new one from the logged model."""
    import mlflow

    existing = _existing_version(client, cfg.model_name, run_key, content["content_id"])
    if existing is not None:
        logger.info("register: version %s already holds run %s's model (content %s); not registering again",
                    existing.version, run_key, content["content_id"][:12])
        return existing
    stale = _model_exists(client, cfg.model_name) and client.search_model_versions(
        f"name='{cfg.model_name}' and tag.run_key='{run_key}'")
    if stale:
        logger.warning("register: version(s) %s hold an earlier model of run %s (different content); "
                       "registering the evaluated one as a new version",
                       ", ".join(sorted((str(v.version) for v in stale), key=int)), run_key)
    version = mlflow.register_model(f"models:/{model_id}", cfg.model_name,
                                    tags=version_tags(cfg, metrics, run_key, context, content, model_id))
    return client.get_model_version(cfg.model_name, str(version.version))



