"""Check-data stage: compare the new labelled set with the last version that passed, before training.

In the spirit of TFX's StatisticsGen and ExampleValidator (:mod:`covid_tasks.data_checks`):
statistics of ``labeled.csv`` (rows per label, view and source; finding strings; image sizes
and grey levels) are compared with those of the last dataset version whose verdict was ``ok``
(``checks/baseline.json``). Every anomaly has a severity:

* **block**: a schema change, a class vanishing or collapsing, too many existing images changing
  label. The stage fails at once (no retry can fix the data): nothing is trained or registered,
  and the baseline stays the last good version, so the next week compares with it.
* **warn**: new finding strings, a source-label association jump, new images that are
  near-duplicates of held-out (val/test) films of other patients, intensity drift. The run goes
  on; ``evaluate`` lets the model become ``challenger``, never ``champion``, until a person
  promotes it.

The report is ``runs/<run_key>/data_checks.json`` (an MLflow artifact of the run) and one line of
the log; the thresholds are ``Config``'s ``check_*`` fields (and DAG Params).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot, RunDir
from covid_tasks.storage import read_json, require_file, write_json

logger = logging.getLogger(__name__)


class DataChecksBlocked(ValueError):
    """The data checks found a blocking anomaly; the run stops before training (not retried)."""

    retryable = False


def check_data(cfg: Config, run_key: str) -> dict[str, Any]:
    """Compute the statistics of ``labeled.csv``, check them against the baseline, write the report.

    Args:
        cfg: configuration (``data_root`` and the ``check_*`` thresholds).
        run_key: this run's key; the report goes to ``runs/<run_key>/data_checks.json``.

    Returns:
        ``{"verdict", "summary", "anomalies" (codes), "n_images", "baseline_images", "report",
        "baseline_updated"}``.

    Raises:
        FileNotFoundError: ``labeled.csv`` or ``raw/metadata.csv`` is missing.
        DataChecksBlocked: a blocking anomaly (a ``ValueError``: the task fails at once); the
            report is written first.
    """
    import pandas as pd

    from covid_tasks import data_checks

    root = DataRoot.of(cfg)
    run_dir = root.run(run_key)
    labeled = pd.read_csv(require_file(root.labeled, "relabel"), dtype=str, keep_default_na=False)
    metadata = with_header_cells(data_checks.read_metadata(require_file(root.metadata, "pull")), root)
    baseline = _read(root.checks_baseline)
    previous = _read(root.checks_latest) or baseline
    logger.info("check_data: %d labelled images against the baseline of %s images", len(labeled),
                baseline["n_images"] if baseline else "no")
    current = data_checks.statistics(labeled, root.images, metadata, previous)
    held_out = held_out_duplicates(root, labeled)
    anomalies = data_checks.compare(current, baseline, data_checks.Thresholds.from_mapping(cfg.to_dict()),
                                    held_out)
    report = data_checks.report(anomalies, current, baseline)
    report["held_out_duplicates"] = [list(p) for p in held_out[:data_checks.MAX_EXAMPLES]]
    write_report(run_dir, report)
    write_json(root.checks_latest, current)
    updated = report["verdict"] == data_checks.OK
    if updated:
        write_json(root.checks_baseline, current)
    result = {"verdict": report["verdict"], "summary": report["summary"],
              "anomalies": [a.code for a in anomalies], "n_images": current["n_images"],
              "baseline_images": baseline["n_images"] if baseline else None,
              "report": str(run_dir.data_checks), "baseline_updated": updated}
    logger.info("check_data: done %s", json.dumps(result))
    if report["verdict"] == data_checks.BLOCK:
        from covid_tasks import history

        pulled = _read(root.pull_report) or {}
        history.record(root, run_key=run_dir.key, dataset_version=pulled.get("dataset_version"),
                       n_labelled=current["n_images"], data_check=data_checks.BLOCK, decision="blocked")
        raise DataChecksBlocked(f"{report['summary']} (nothing is trained or registered; the baseline "
                                f"stays the last version that passed; report {run_dir.data_checks})")
    return result


def with_header_cells(metadata: Any, root: DataRoot) -> Any:
    """The metadata with the empty ``patientid`` cells ``relabel`` filled from DICOM headers.

    A site may leave ``patientid`` empty and let each film's header supply it (as a one-way hash,
    see docs/dicom.md); the schema check must not count those rows as invalid.
    """
    filled = ((_read(root.relabel_report) or {}).get("from_header") or {}).get("patient_of_file") or {}
    if not filled or "patientid" not in metadata.columns or "filename" not in metadata.columns:
        return metadata
    out = metadata.copy()
    empty = out["patientid"].astype(str).str.strip() == ""
    out.loc[empty, "patientid"] = out.loc[empty, "filename"].map(filled).fillna("")
    return out


def held_out_duplicates(root: DataRoot, labeled: Any) -> list[tuple[str, str, int]]:
    """Near-duplicate pairs (``relabel``'s) that tie a held-out film to another patient's new image.

    A pair counts when one film's patient was assigned to val or test by an earlier ``split``
    and the other film belongs to another patient who was not assigned to that same split (a new
    patient, or one elsewhere): the same film would be tested twice, or tested and trained on.
    ``relabel`` links such patients into one split group, so the split stays clean; the check
    warns because the data arrived that way.
    """
    report = _read(root.relabel_report) or {}
    pairs = (report.get("near_duplicates") or {}).get("pairs") or []
    if not pairs:
        return []
    assigned = (_read(root.split_assignments) or {}).get("patients", {})
    patient = dict(zip(labeled["filename"], labeled["patientid"], strict=True))
    out = []
    for pair in pairs:
        a, b = patient.get(pair["a"]), patient.get(pair["b"])
        if a is None or b is None or a == b:
            continue
        for held, other in ((a, b), (b, a)):
            if assigned.get(held) in ("val", "test") and assigned.get(other) != assigned.get(held):
                out.append((pair["a"], pair["b"], int(pair["distance"])))
                break
    return out


def write_report(run_dir: RunDir, report: dict[str, Any]) -> None:
    """Write ``data_checks.json`` into the run folder and log its summary line."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_json(run_dir.data_checks, report)
    log = {"block": logger.error, "warn": logger.warning}.get(report["verdict"], logger.info)
    log("check_data: %s", report["summary"])


def _read(path: Any) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None
