"""A DAG run's outcome in one word and one line, where REST clients and the UI look for it; and the
summaries of the gate's and the registry's decisions that the asset events carry.

The word is one of ``promote``, ``challenger``, ``reject``, ``blocked``, ``skipped`` and ``failed``
(:data:`covid_tasks.history.DECISIONS`). The DAG's last task, ``outcome``, publishes it as an event
of the asset ``covid-xray-run`` (and as its XCom), so a client reads one place whether a run
registered a model, was rejected by the gate, blocked by the data checks or skipped for lack of
new data; the season replay names its weeks with the same function.
"""

from __future__ import annotations

from typing import Any, Mapping

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from covid_tasks.storage import read_json

#: The tasks in pipeline order (the first failed one is named).
TASKS = ("pull", "check_new_data", "relabel", "check_data", "split", "train", "finetune", "evaluate",
         "register")
RUN_ASSET = "covid-xray-run"


def decide(states: Mapping[str, str | None], data_check: str | None,
           registered: Mapping[str, Any] | None) -> str:
    """The run's outcome from its task states, its data-check verdict and ``register``'s result.

    Args:
        states: task id -> state (``success``, ``failed``, ``skipped``, ``upstream_failed``...).
        data_check: the run's ``data_checks.json`` verdict, ``None`` when none was written.
        registered: ``register``'s result (its XCom, also pushed when the gate rejected), or ``None``.
    """
    if data_check == "block":
        return "blocked"
    if states.get("relabel") == "skipped":
        return "skipped"  # check_new_data: nothing new arrived and force is off
    if states.get("register") == "success":
        return (registered or {}).get("decision") or "failed"
    if states.get("register") == "skipped" and states.get("evaluate") == "success":
        return "reject"
    return "failed"


def outcome(cfg: Config, run_key: str, states: Mapping[str, str | None], pulled: Mapping[str, Any] | None,
            registered: Mapping[str, Any] | None) -> dict[str, Any]:
    """The outcome with its one-line summary and the figures a client needs.

    Returns:
        ``{"run_key", "decision", "summary", "version", "champion_version", "data_check",
        "dataset_version", "failed_task"}``.
    """
    run_dir = DataRoot.of(cfg).run(run_key)
    checks = read_json(run_dir.data_checks) if run_dir.data_checks.is_file() else None
    verdict = (checks or {}).get("verdict")
    decision = decide(states, verdict, registered)
    failed = next((t for t in TASKS if states.get(t) == "failed"), None)
    version = (pulled or {}).get("dataset_version")
    if decision == "skipped":
        summary = (f"skipped: no new or changed data since the last run (dataset {version}) and force is "
                   "off; nothing was trained or registered")
    elif decision == "blocked":
        summary = f"blocked by the data checks, nothing trained or registered: {checks['summary']}"
    elif decision == "failed":
        summary = f"failed at task {failed or 'unknown'}: see its log; nothing was registered by this run"
    else:
        summary = decision_event(dict(registered or {}))["summary"]
    return {"run_key": run_dir.key, "decision": decision, "summary": summary,
            "version": (registered or {}).get("version"),
            "champion_version": (registered or {}).get("champion_version"), "data_check": verdict,
            "dataset_version": version, "failed_task": failed}


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def gate_event(evaluated: dict[str, Any], key: str) -> dict[str, Any]:
    """The gate's verdict on one evaluation, as an asset event's ``extra`` (small, JSON)."""
    passed = bool(evaluated.get("passed"))
    reasons = list(evaluated.get("reasons") or [])
    champion = evaluated.get("champion") or {}
    summary = (f"gate {'passed' if passed else 'rejected'}: test sensitivity "
               f"{_pct(evaluated.get('sensitivity'))} (min {evaluated.get('min_sensitivity')}), specificity "
               f"{_pct(evaluated.get('specificity'))} (min {evaluated.get('min_specificity')})")
    if reasons:
        summary += ": " + "; ".join(reasons)
    return {
        "run_key": key, "gate": "passed" if passed else "rejected", "reasons": reasons,
        "recommendation": evaluated.get("decision"), "summary": summary,
        **{k: evaluated.get(k) for k in ("sensitivity", "specificity", "min_sensitivity", "min_specificity",
                                         "threshold", "roc_auc", "n_test")},
        "champion_version": champion.get("version"),
    }


def decision_event(registered: dict[str, Any], evaluated: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registry decision (``promoted``, ``challenger`` or ``rejected``) with a one-line summary."""
    evaluated = evaluated or {}
    champion = registered.get("champion_version")
    if not registered.get("registered"):
        decision = "rejected"
        why = "; ".join(registered.get("reasons") or evaluated.get("reasons") or []) or "gate failed"
        summary = (f"rejected by the gate ({why}); nothing registered, "
                   + (f"champion stays version {champion}" if champion else "no champion yet"))
    elif registered.get("promoted"):
        decision = "promoted"
        summary = f"version {registered.get('version')} registered and promoted to @champion"
    else:
        decision = "challenger"
        why = "; ".join(registered.get("promotion_reasons") or []) or "not better than the champion"
        summary = (f"version {registered.get('version')} registered as @challenger; champion stays "
                   f"version {champion} ({why})")
    return {
        "decision": decision, "summary": summary, "version": registered.get("version"),
        "aliases": registered.get("aliases") or [], "champion_version": champion,
        "model_uri": registered.get("model_uri"), "mlflow_run_id": registered.get("mlflow_run_id"),
        "reasons": registered.get("reasons") or [],
        "promotion_reasons": registered.get("promotion_reasons") or [],
        **{k: evaluated.get(k) for k in ("sensitivity", "specificity", "threshold")},
    }
