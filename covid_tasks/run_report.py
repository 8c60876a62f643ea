"""What ``make run`` and ``make airflow`` print: the settings a run uses, and one line per task.

``python -m covid_tasks.run_report settings [--conf JSON]`` prints the settings a run of the DAG
uses: the Params' defaults (Config's), overridden by ``--conf``, on top of ``COVID_*`` variables
(which fill ``source_uri`` and every field that is not a Param), as the tasks build them.
``python -m covid_tasks.run_report tasks [--run-id ID]`` reads the Airflow metadata DB of
``$AIRFLOW_HOME`` and prints, for the latest (or the given) run of ``covid_retraining``, each
task's state, duration and key result (from its XCom), e.g.::

    pull            success      1.9s  101 images: 101 new, 0 changed, 0 quarantined; dataset 5d41402a

``python -m covid_tasks.run_report errors LOG`` prints the exception lines of a failed run's log.

The formatting functions take plain values; only :func:`collect` touches Airflow.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.run_outcome import TASKS

DAG_ID = "covid_retraining"
ORDER = (*TASKS, "outcome")
#: The DAG's Params, in the order ``make run`` prints them (a DAG test checks they match).
PARAMS = ("source_uri", "backbone", "weights", "multiscale", "lung_gate", "head", "img_size", "batch_size",
          "epochs", "finetune_epochs", "finetune_top_blocks", "min_sensitivity", "min_specificity", "gate_on",
          "min_roc_auc", "threshold_margin", "promotion_margin", "shortcut_blocks_promotion", "force",
          "check_max_label_change_share", "check_min_class_share_kept", "check_max_invalid_row_share",
          "check_source_label_jump", "check_source_purity", "check_intensity_psi",
          "check_max_cross_split_duplicates", "check_new_finding_min_images")


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pull(r: dict[str, Any]) -> str:
    return (f"{r.get('n_images')} images: {r.get('new')} new, {r.get('changed')} changed, "
            f"{r.get('quarantined')} quarantined; dataset {r.get('dataset_version')}")


def _relabel(r: dict[str, Any]) -> str:
    counts = r.get("class_counts") or {}
    dropped = sum((r.get("dropped") or {}).values())
    return (f"{r.get('n_images')} images of {r.get('n_patients')} patients: "
            + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {dropped} rows dropped")


def _split(r: dict[str, Any]) -> str:
    counts = r.get("counts") or {}
    parts = []
    for name in ("train", "val", "test"):
        per_class = counts.get(name) or {}
        images = sum(c.get("images", 0) for c in per_class.values())
        covid = (per_class.get("covid") or {}).get("images", 0)
        parts.append(f"{name} {images} ({covid} covid)")
    return "images: " + ", ".join(parts)


def _training(r: dict[str, Any]) -> str:
    if r.get("head") == "probe":
        return f"linear-probe head (C={r.get('probe_c'):g}), val AUC {_f(r.get('best_val_auc'))}"
    return f"{r.get('epochs_run')} epochs, best val AUC {_f(r.get('best_val_auc'))}"


def _evaluate(r: dict[str, Any]) -> str:
    verdict = "gate passed" if r.get("passed") else "gate REJECTED: " + "; ".join(r.get("reasons") or [])
    return (f"test sensitivity {_f(r.get('sensitivity'))}, specificity {_f(r.get('specificity'))} "
            f"at threshold {_f(r.get('threshold'))}: {verdict}")


def _register(r: dict[str, Any]) -> str:
    from covid_tasks.run_outcome import decision_event

    return decision_event(r)["summary"]


def _check_data(r: dict[str, Any]) -> str:
    anomalies = r.get("anomalies") or []
    return f"data checks {r.get('verdict')}" + (f": {', '.join(anomalies)}" if anomalies else ", no anomaly")


def _outcome(r: dict[str, Any]) -> str:
    return f"{r.get('decision')}: {r.get('summary')}"


FORMATTERS = {"pull": _pull, "relabel": _relabel, "check_data": _check_data, "split": _split,
              "train": _training, "finetune": _training, "evaluate": _evaluate, "register": _register,
              "outcome": _outcome}


def key_result(task_id: str, result: Any) -> str:
    """The one fact worth reading about a task's result (its XCom ``return_value``)."""
    if result is None:
        return ""
    if task_id == "check_new_data":
        return "continue" if result else "no new data and force off: the rest is skipped"
    fmt = FORMATTERS.get(task_id)
    if fmt is None or not isinstance(result, dict):
        return json.dumps(result, default=str)[:120]
    try:
        return fmt(result)
    except (KeyError, TypeError, ValueError, AttributeError):
        return json.dumps(result, default=str)[:120]


def task_line(task_id: str, state: str | None, seconds: float | None, result: Any = None,
              tries: int | None = None) -> str:
    """``task  state  duration  key result``; a failed task also says how many tries it had."""
    state = state or "not run"
    duration = "-" if seconds is None else f"{seconds:.1f}s"
    extra = key_result(task_id, result)
    if state == "failed" and tries:
        extra = f"after {tries} tr{'y' if tries == 1 else 'ies'}; see the log below" + (f"; {extra}" if extra
                                                                                       else "")
    return f"  {task_id:<15} {state:<15} {duration:>8}  {extra}".rstrip()


def _value(state: Any) -> str | None:
    return None if state is None else str(getattr(state, "value", state))


def collect(dag_id: str = DAG_ID, run_id: str | None = None) -> dict[str, Any]:
    """The latest (or the given) run of ``dag_id`` and its task instances, from Airflow's DB.

    Returns:
        ``{"run_id", "state", "seconds", "tasks": [{"task_id", "state", "seconds", "tries",
        "result"}]}``, tasks in pipeline order; ``{}`` when the DAG has no run.
    """
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(DagRun).where(DagRun.dag_id == dag_id)
        query = query.where(DagRun.run_id == run_id) if run_id else query.order_by(DagRun.id.desc())
        run = session.scalars(query.limit(1)).first()
        if run is None:
            return {}
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                         TaskInstance.run_id == run.run_id)).all()
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id,
                                                        XComModel.run_id == run.run_id,
                                                        XComModel.key == "return_value")).all()
        results = {x.task_id: XComModel.deserialize_value(x) for x in xcoms}
        rank = {t: i for i, t in enumerate(ORDER)}
        tasks = [{"task_id": ti.task_id, "state": _value(ti.state),
                  "seconds": ti.duration, "tries": ti.try_number, "result": results.get(ti.task_id)}
                 for ti in sorted(tis, key=lambda t: (rank.get(t.task_id, len(ORDER)), t.task_id))]
        seconds = (run.end_date - run.start_date).total_seconds() if run.end_date and run.start_date else None
        return {"run_id": run.run_id, "state": _value(run.state),
                "seconds": seconds, "tasks": tasks}


def report_lines(run: dict[str, Any]) -> list[str]:
    """The lines ``make run`` prints for one collected run."""
    if not run:
        return [f"no run of {DAG_ID} in this Airflow home"]
    lines = [task_line(t["task_id"], t["state"], t["seconds"], t["result"], t["tries"]) for t in run["tasks"]]
    took = "" if run["seconds"] is None else f" in {run['seconds']:.0f}s"
    return lines + [f"DAG run {run['run_id']}: {run['state']}{took}"]


def settings_line(conf: dict[str, Any] | None = None) -> str:
    """The values of the Params a DAG run with ``conf`` uses (see the module docstring)."""
    from covid_tasks.config import Config, field_defaults

    defaults = field_defaults()
    params = {name: defaults[name] for name in PARAMS if name != "source_uri"}
    cfg = Config.from_env({**params, **(conf or {})})
    shown = [f"{name}={getattr(cfg, name)}" for name in PARAMS if not name.startswith("check_")]
    checks = [f"{name}={getattr(cfg, name)}" for name in PARAMS
              if name.startswith("check_") and getattr(cfg, name) != defaults[name]]
    return ", ".join(shown + (checks or ["data checks at their defaults"]))


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\w*: ")


def error_lines(log: str, limit: int = 6) -> list[str]:
    """The distinct exception lines of a log (``ValueError: ...``), the last ``limit`` of them.

    A line whose message a later line repeats (the cause of an ``AirflowFailException``) is left out.
    """
    found: list[str] = []
    for line in log.splitlines():
        if _EXCEPTION_LINE.match(line) and line not in found:
            found.append(line)
    kept = [line for i, line in enumerate(found)
            if not any(line.split(": ", 1)[1] in later for later in found[i + 1:])]
    return [line[:400] for line in kept[-limit:]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covid_tasks.run_report",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="effective settings").add_argument("--conf", default="{}",
                                                                     help="the run's conf as JSON")
    tasks = sub.add_parser("tasks", help="one line per task of the latest run")
    tasks.add_argument("--run-id")
    sub.add_parser("errors", help="the exception lines of a log").add_argument("log", type=Path)
    args = parser.parse_args(argv)
    if args.command == "settings":
        print(settings_line(json.loads(args.conf)))
        return 0
    if args.command == "errors":
        print("\n".join(error_lines(args.log.read_text(errors="replace"))))
        return 0
    run = collect(DAG_ID, args.run_id)
    print("\n".join(report_lines(run)))
    return 0 if run.get("state") == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
