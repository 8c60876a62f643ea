"""The only module that touches Airflow at task run time: stage inputs, error policy and decisions.

Imported inside task bodies, never at DAG parse time. The stages stay Airflow-free; this module
turns a task's context into plain stage inputs and the stage's outcome into Airflow states:

* **Errors.** :func:`classify` sorts an exception into ``permanent`` (no retry can fix it: bad
  configuration or Params, missing inputs or weights, an empty data set or class, a corrupt file),
  ``transient`` (the registry or object store unreachable) or ``unknown``. A permanent error fails
  the task at once (``AirflowFailException``); the others keep the task's retries.
* **Decisions.** ``evaluate`` publishes the gate's verdict as an event of the asset
  ``covid-xray-evaluation``; ``register`` publishes the registry decision as an event of the asset
  ``covid-xray-classifier`` when it registered a version, and ends as *skipped*, with the reason,
  when the gate rejected the model (the run still succeeds; the MLflow run is logged either way).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from covid_tasks.config import Config, safe_run_key
from covid_tasks.run_outcome import decision_event, gate_event

logger = logging.getLogger(__name__)

#: Exceptions no retry can fix, matched by class along the MRO (``module.QualName``), so that
#: classifying needs no TensorFlow, MLflow or botocore import.
PERMANENT: dict[str, str] = {
    "builtins.ValueError": "bad configuration or data (also corrupt CSV, JSON, image or .keras files)",
    "builtins.FileNotFoundError": "a missing input, model or weights file",
    "builtins.NotADirectoryError": "a path that is not a folder",
    "builtins.IsADirectoryError": "a folder where a file was expected",
    "builtins.PermissionError": "a file or folder that may not be read or written",
    "zipfile.BadZipFile": "a corrupt model file",
    "covid_tasks.model.WeightsUnavailableError": "pretrained weights neither downloadable nor cached",
    "tensorflow.python.framework.errors_impl.InvalidArgumentError": "an input TensorFlow cannot use",
    "tensorflow.python.framework.errors_impl.NotFoundError": "a file TensorFlow cannot find",
}
#: Exceptions a retry may fix: checked first, along the exception's cause chain.
TRANSIENT: dict[str, str] = {
    "covid_tasks.registry.RegistryUnavailableError": "the MLflow registry is unreachable",
    "builtins.ConnectionError": "a connection failed",
    "builtins.TimeoutError": "a call timed out",
    "botocore.exceptions.ConnectionError": "the S3 endpoint is unreachable",
    "botocore.exceptions.HTTPClientError": "the S3 endpoint did not answer",
    "requests.exceptions.ConnectionError": "an HTTP server (MLflow) is unreachable",
    "requests.exceptions.Timeout": "an HTTP server (MLflow) timed out",
}

EVALUATION_ASSET = "covid-xray-evaluation"


def _names(exc: BaseException) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its explicit cause or implicit context, and theirs (no cycles)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)


def classify(exc: BaseException) -> tuple[str, str]:
    """Sort an exception into ``permanent``, ``transient`` or ``unknown``, with a short reason.

    An exception's own boolean ``retryable`` attribute wins; then a transient exception anywhere in
    the cause chain; then the type of the exception itself against :data:`PERMANENT`.
    """
    flag = getattr(exc, "retryable", None)
    if isinstance(flag, bool):
        return ("transient", "marked retryable") if flag else ("permanent", "marked not retryable")
    for link in _chain(exc):
        for name in _names(link):
            if name in TRANSIENT:
                return "transient", TRANSIENT[name]
    for name in _names(exc):
        if name in PERMANENT:
            return "permanent", PERMANENT[name]
    return "unknown", "unexpected error"


@contextmanager
def fail_fast(step: str) -> Iterator[None]:
    """Let transient and unknown errors through (Airflow retries them); fail permanent ones at once."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    try:
        yield
    except AirflowException:
        raise
    except Exception as exc:
        kind, why = classify(exc)
        if kind != "permanent":
            logger.warning("%s: %s error (%s), retried while tries are left: %s: %s", step, kind, why,
                           type(exc).__name__, exc)
            raise
        raise AirflowFailException(f"{step}: {type(exc).__name__}: {exc} [not retried: {why}]") from exc


def quiet_mlflow_logging() -> None:
    """Let MLflow's log records reach Airflow's task log at their own level.

    MLflow gives its loggers a handler of their own that writes to stderr, and Airflow files every
    stderr line of a task as an ERROR: "Created version '2' of model ..." showed up red. With
    ``MLFLOW_CONFIGURE_LOGGING=false`` (set before MLflow is imported in the task process) and its
    handlers dropped if it was imported already, MLflow's records propagate to the task's logger.
    """
    import sys

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if "mlflow" in sys.modules:
        mlflow_logger = logging.getLogger("mlflow")
        mlflow_logger.handlers = []
        mlflow_logger.propagate = True


def run_stage(step: str, **extra: Any) -> dict[str, Any]:
    """Run one pipeline stage for the current Airflow task and return its strict-JSON result.

    The stage gets plain inputs only: the Config built from the run's Params, the run key and,
    for ``pull``, the S3 options of the configured Airflow connection.

    Raises:
        AirflowFailException: the configuration or the stage failed in a way no retry can fix.
    """
    from airflow.sdk import get_current_context

    from covid_tasks.stages import run
    from covid_tasks.storage import jsonable

    quiet_mlflow_logging()
    ctx = get_current_context()
    with fail_fast(step):
        cfg = task_config(ctx["params"])
        if step == "pull":
            extra = {"s3_options": s3_options(cfg.s3_conn_id), **extra}
        if step == "register":
            logical = ctx.get("logical_date")
            extra = {"context": {"airflow_run_id": ctx["run_id"], **extra.get("context", {}),
                                 "logical_date": logical.isoformat() if logical is not None else None}}
        return jsonable(run(step, cfg, run_key(ctx), **extra))


def run_evaluate() -> dict[str, Any]:
    """Run ``evaluate`` and publish the gate's verdict as an event of the task's outlet assets."""
    from airflow.sdk import get_current_context

    result = run_stage("evaluate")
    ctx = get_current_context()
    for asset in ctx["task"].outlets:
        ctx["outlet_events"][asset].extra = gate_event(result, run_key(ctx))
    return result


def run_register(evaluated: dict[str, Any], dataset_version: str) -> dict[str, Any]:
    """Run ``register``; publish a registration as an asset event, or end *skipped* on a rejection.

    The stage logs the MLflow run either way. A rejected model leaves its result in XCom
    (``return_value``) and the reason in the skip message; the DAG run still succeeds.

    Raises:
        AirflowSkipException: the gate rejected the model, so nothing was registered.
    """
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowSkipException

    result = run_stage("register", context={"dataset_version": dataset_version})
    ctx = get_current_context()
    event = decision_event(result, evaluated)
    logger.info("register: %s", event["summary"])
    if not result.get("registered"):
        ctx["ti"].xcom_push(key="return_value", value=result)
        raise AirflowSkipException(event["summary"])
    for asset in ctx["task"].outlets:
        ctx["outlet_events"][asset].extra = event
    return result


def run_outcome() -> dict[str, Any]:
    """Name the run's outcome (``covid_tasks.run_outcome``) and publish it as an asset event.

    Runs last, whatever happened before. A run that failed or was blocked fails this task too (with
    the one-line summary), so the DAG run stays failed; otherwise the outcome (``promote``,
    ``challenger``, ``reject`` or ``skipped``) is an event of the task's outlet asset and its XCom.

    Raises:
        AirflowFailException: the run failed or the data checks blocked it.
    """
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    from covid_tasks.run_outcome import outcome

    ctx = get_current_context()
    ti = ctx["ti"]
    states = ti.get_task_states(dag_id=ctx["dag"].dag_id, run_ids=[ctx["run_id"]]).get(ctx["run_id"], {})
    result = outcome(task_config(ctx["params"]), run_key(ctx), states, ti.xcom_pull(task_ids="pull"),
                     ti.xcom_pull(task_ids="register"))
    logger.info("outcome: %s", result["summary"])
    if result["decision"] in ("failed", "blocked"):
        raise AirflowFailException(result["summary"])
    for asset in ctx["task"].outlets:
        ctx["outlet_events"][asset].extra = result
    return result


def task_config(params: dict[str, Any]) -> Config:
    """Config from defaults, ``COVID_*`` environment variables, then the run's Params."""
    return Config.from_env(dict(params))


def run_key(context: dict[str, Any]) -> str:
    """A stable key for this DAG run (its run id), safe as a folder name."""
    return safe_run_key(context["run_id"])


def s3_options(conn_id: str = "aws_default") -> dict[str, Any]:
    """S3 client options from an Airflow connection, or ``{}`` to use the AWS environment.

    The connection's login/password are the access key and secret, and its extra may hold
    ``endpoint_url`` (MinIO, SeaweedFS) and ``region_name``.
    """
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - an absent connection raises a different type per version
        logger.info("no Airflow connection %r; using the standard AWS environment", conn_id)
        return {}
    extra = conn.extra_dejson or {}
    opts = {
        "aws_access_key_id": conn.login or None,
        "aws_secret_access_key": conn.password or None,
        "endpoint_url": extra.get("endpoint_url") or (conn.host or None),
        "region_name": extra.get("region_name"),
    }
    return {k: v for k, v in opts.items() if v}
