"""The only module that touches Airflow: turns a task's context into plain stage inputs.

Imported inside task bodies, never at DAG parse time.
"""

from __future__ import annotations

import logging
from typing import Any

from covid_tasks.config import Config, safe_run_key

logger = logging.getLogger(__name__)


def run_stage(step: str, **extra: Any) -> dict[str, Any]:
    """Run one pipeline stage for the current Airflow task and return its strict-JSON result.

    The stage gets plain inputs only: the Config built from the run's Params, the run key and,
    for ``pull``, the S3 options of the configured Airflow connection.
    """
    from airflow.sdk import get_current_context

    from covid_tasks.cli import run_step
    from covid_tasks.storage import jsonable

    ctx = get_current_context()
    cfg = task_config(ctx["params"])
    if step == "pull":
        extra = {"s3_options": s3_options(cfg.s3_conn_id), **extra}
    if step == "register":
        extra = {"context": {"airflow_run_id": ctx["run_id"], **extra.get("context", {})}}
    return jsonable(run_step(step, cfg, run_key(ctx), **extra))


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
