"""A season of weekly retraining, replayed through the real scheduler (``make season``).

Weekly snapshots of the real data (:mod:`season_data`: growth in metadata row order, upstream
events, five injected faults) are pulled by one DAG run per week, each created over the REST API
of a local Airflow (LocalExecutor, ``make airflow``'s set-up in a folder of its own) with
consecutive Sunday logical dates and its week's snapshot as ``source_uri``. After each run the
replay reads what happened from the data root, the run folder and the registry; at the end it
scores every champion the season had on the final week's test split.

    python benchmarks/season.py            # the full shared data set, 13 weeks (docs/season.md)
    python benchmarks/season.py --quick    # sample data, 64 px, 5 weeks with two faults

Writes ``weeks.csv``, ``champions.csv``, ``timeline.png`` and ``season.json`` to
``benchmarks/results/season/`` (``season-quick/`` with ``--quick``, git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import season_data  # noqa: E402
from season_airflow import LocalAirflow  # noqa: E402

logger = logging.getLogger("season")

SHARED = REPO.parent / "shared" / "data" / "covid-chestxray"
MODEL = "covid-xray-classifier"
FIRST_SUNDAY = datetime(2020, 3, 1, tzinfo=timezone.utc)
COLUMNS = ("week", "logical_date", "dataset_version", "images_new", "images_changed", "images_removed",
           "n_labelled", "patients_moved", "fault", "event", "data_check", "data_check_anomalies", "roc_auc",
           "roc_auc_ci95", "sensitivity", "specificity", "decision", "version", "champion_version", "wall_s",
           "disk_mb", "disk_mb_without_retention", "quarantined")
#: The full season's recipe: the default's (EfficientNet-Lite0 at 224 px, lung gate, multiscale
#: features, linear-probe head) with 2 fine-tuning epochs instead of 5, so 13 weeks fit in about an
#: hour on 2 cores; and a gate this data can meet (on the fixed split the recipes reach about
#: 0.6-0.8 sensitivity at 0.3-0.7 specificity, so the defaults, 0.80 / 0.70, reject most weeks).
FULL_CONF = {"img_size": 224, "finetune_epochs": 2, "batch_size": 32, "min_sensitivity": 0.60,
             "min_specificity": 0.30}
#: The quick season (sample data): 64 px, no lung gate, one fine-tuning epoch, and no gate at all
#: (14 test images): promotion is left to the paired comparison with the champion.
QUICK_CONF = {"img_size": 64, "weights": "bundled", "lung_gate": False, "multiscale": False, "head": "probe",
              "finetune_epochs": 1, "batch_size": 16, "min_sensitivity": 0.0, "min_specificity": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sample data, 64 px, 5 weeks with two faults")
    parser.add_argument("--source", type=Path, help="the data set in the upstream layout (default: the "
                        "shared June 2020 set, or sample_data/ with --quick)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: benchmarks/results/season[-quick])")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--week-timeout", type=float, default=3600.0, help="seconds one DAG run may take")
    parser.add_argument("--replot", type=Path, metavar="RESULTS", help="only redraw RESULTS/timeline.png "
                        "from RESULTS/weeks.csv")
    parser.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", dest="settings",
                        help="a run Param on top of the season's (a JSON value), e.g. threshold_margin=0.1")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    signal.signal(signal.SIGTERM, _stop)  # stop the local Airflow too when the replay is stopped
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = args.source or (REPO / "sample_data" if args.quick else SHARED)
    if not (source / "metadata.csv").is_file():
        print(f"season: no data set at {source} (metadata.csv and images/); pass --source", file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / ("season-quick" if args.quick else "season")
    plan = season_data.quick_plan() if args.quick else season_data.full_plan()
    conf = {**(QUICK_CONF if args.quick else FULL_CONF), **_settings(args.settings)}
    work = args.work or Path(tempfile.mkdtemp(prefix="season-"))
    try:
        rows, meta = replay(source, work, plan, conf, args.week_timeout)
        champions = score_champions(work, rows)
        write_results(out, rows, champions, {**meta, "source": str(source), "conf": conf,
                                              "commit": _commit(), "plan": [w.__dict__ for w in plan]})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"season: {len(rows)} weeks; results in {out}")
    return 0


def _settings(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as Params; a value that is not JSON stays a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"season: --set {pair!r}: expected PARAM=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def replay(source: Path, work: Path, plan: list[season_data.Week], conf: dict[str, Any],
           week_timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One DAG run per week through the scheduler; one row per week."""
    data_root, mlflow_db = work / "data", work / "mlflow" / "mlflow.db"
    mlflow_db.parent.mkdir(parents=True, exist_ok=True)
    env = {"COVID_DATA_ROOT": str(data_root), "COVID_MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"}
    builder = season_data.SnapshotBuilder(source, work, data_root)
    rows: list[dict[str, Any]] = []
    gone = 0  # objects pull reports deleted upstream so far (it keeps them, and counts them weekly)
    started = time.monotonic()
    with LocalAirflow(work / "airflow", env) as airflow:
        for week in plan:
            snapshot, done = builder.build(week)
            logical = (FIRST_SUNDAY + timedelta(weeks=week.number - 1)).isoformat()
            run_id = f"season__week-{week.number:02d}"
            logger.info("week %d (%s): %s", week.number, logical, json.dumps(done))
            t0 = time.monotonic()
            airflow.trigger(run_id, logical, {**conf, "source_uri": str(snapshot)})
            run = airflow.wait(run_id, week_timeout)
            row = week_row(airflow, run_id, run, week, done, data_root, env["COVID_MLFLOW_TRACKING_URI"])
            row.update(logical_date=logical[:10], wall_s=round(time.monotonic() - t0, 1))
            # pull keeps the objects deleted upstream and counts them every week: show this week's
            total = row["images_removed"]
            row["images_removed"], gone = max(0, total - gone), max(gone, total)
            rows.append(row)
            logger.info("week %d: %s", week.number, json.dumps(row, default=str))
    return rows, {"wall_s_total": round(time.monotonic() - started, 1)}


def week_row(airflow: LocalAirflow, run_id: str, run: dict[str, Any], week: season_data.Week,
             done: dict[str, Any], data_root: Path, tracking_uri: str) -> dict[str, Any]:
    """What one week did, from the task states, their results and the files they wrote."""
    from covid_tasks.config import safe_run_key
    from covid_tasks.run_outcome import decide

    states = airflow.task_states(run_id)
    run_dir = data_root / "runs" / safe_run_key(run_id)
    pulled = airflow.xcom(run_id, "pull") if states.get("pull") == "success" else None
    relabelled = airflow.xcom(run_id, "relabel") if states.get("relabel") == "success" else None
    split = airflow.xcom(run_id, "split") if states.get("split") == "success" else None
    checks = _json(run_dir / "data_checks.json")
    metrics = _json(run_dir / "metrics.json") if states.get("evaluate") == "success" else None
    row: dict[str, Any] = {
        "week": week.number, "fault": week.fault or "", "event": week.event or "",
        "dataset_version": (pulled or {}).get("dataset_version") or _manifest_version(data_root),
        "images_new": (pulled or {}).get("new", 0),
        "images_changed": (pulled or {}).get("changed", 0),
        "images_removed": (pulled or {}).get("deleted", 0),
        "quarantined": (pulled or {}).get("quarantined", 0),
        "n_labelled": (relabelled or {}).get("n_images"),
        "patients_moved": (split or {}).get("moved_patients", 0),
        # a week with no new data keeps the version already checked
        "data_check": checks["verdict"] if checks else ("ok" if states.get("relabel") == "skipped" else ""),
        "data_check_anomalies": ";".join(a["code"] for a in (checks or {}).get("anomalies", [])),
        "decision": decide(states, (checks or {}).get("verdict"), airflow.xcom(run_id, "register")),
        "champion_version": _alias(tracking_uri, "champion"),
    }
    if metrics:
        row.update(roc_auc=metrics.get("roc_auc"), roc_auc_ci95=metrics.get("roc_auc_ci95"),
                   sensitivity=metrics.get("sensitivity"), specificity=metrics.get("specificity"))
    registered = airflow.xcom(run_id, "register") or {}
    row["version"] = registered.get("version") if registered.get("registered") else None
    row.update(disk(data_root))
    return row


def disk(data_root: Path) -> dict[str, float]:
    """Disk used by the data root and the MLflow store, and what it would be without retention."""
    used = sum(f.stat().st_size for base in (data_root, data_root.parent / "mlflow")
               for f in base.rglob("*") if f.is_file())
    freed = sum(_json(f).get("bytes_freed", 0) for f in (data_root / "runs").glob("*/retention.json"))
    return {"disk_mb": round(used / 1e6, 1), "disk_mb_without_retention": round((used + freed) / 1e6, 1)}


def score_champions(work: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every champion the season had, scored on the final week's test split at its own threshold."""
    import pandas as pd

    from covid_tasks.config import Config
    from covid_tasks.dataset import label_index, predict_split
    from covid_tasks.layout import DataRoot, load_splits
    from covid_tasks.metrics import binary_metrics
    from covid_tasks.registry import load_registered

    root = DataRoot(work / "data")
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    test = load_splits(root)["test"]
    y = label_index(test["label"]).astype(int)
    out = []
    versions = sorted({int(r["champion_version"]) for r in rows if r.get("champion_version")})
    for version in versions:
        loaded = load_registered(f"models:/{MODEL}/{version}", uri)
        cfg = Config(data_root=str(root.root), img_size=loaded.img_size, batch_size=16)
        prob = predict_split(loaded.model, test, root.images, cfg)
        m = binary_metrics(y, prob, loaded.threshold, seed=0)
        weeks = [r["week"] for r in rows if str(r.get("champion_version")) == str(version)]
        out.append({"version": version, "champion_weeks": f"{min(weeks)}-{max(weeks)}", "n_test": m["n"],
                    "roc_auc": m["roc_auc"], "roc_auc_ci95": m["roc_auc_ci95"],
                    "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                    "threshold": loaded.threshold, "img_size": loaded.img_size})
    return pd.DataFrame(out).to_dict("records") if out else []


def write_results(out: Path, rows: list[dict[str, Any]], champions: list[dict[str, Any]],
                  meta: dict[str, Any]) -> None:
    from covid_tasks.history import timeline_figure

    out.mkdir(parents=True, exist_ok=True)
    _csv(out / "weeks.csv", rows, COLUMNS)
    _csv(out / "champions.csv", champions, ("version", "champion_weeks", "n_test", "roc_auc", "roc_auc_ci95",
                                            "sensitivity", "specificity", "threshold", "img_size"))
    timeline_figure(rows, out / "timeline.png", title="Season replay: one DAG run per week")
    (out / "season.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def replot(results: Path) -> None:
    """Redraw ``timeline.png`` from a season's ``weeks.csv``."""
    from covid_tasks.history import timeline_figure

    with open(results / "weeks.csv", newline="", encoding="utf-8") as fh:
        rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    for row in rows:
        for key in ("n_labelled", "roc_auc", "sensitivity", "specificity"):
            row[key] = float(row[key]) if row[key] else None
        row["roc_auc_ci95"] = json.loads(row["roc_auc_ci95"]) if row["roc_auc_ci95"] else None
    timeline_figure(rows, results / "timeline.png", title="Season replay: one DAG run per week")


def _csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value) + "]"
        return "" if value is None else value

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([[cell(r.get(c)) for c in columns] for r in rows])


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _manifest_version(data_root: Path) -> str | None:
    return _json(data_root / "raw" / "manifest.json").get("dataset_version")


def _alias(tracking_uri: str, alias: str) -> str | None:
    from mlflow import MlflowClient

    from covid_tasks.registry import alias_version_number

    return alias_version_number(MlflowClient(tracking_uri, registry_uri=tracking_uri), MODEL, alias)


if __name__ == "__main__":
    sys.exit(main())
