"""Retention: what a weekly process may delete, so ``runs/`` and the registry do not grow forever.

Two rules, both run by ``register`` at the end of every run (``Config`` fields):

* **Run folders** (``retain_runs``, N): the models of a run (``*.keras``, ``*.h5``: by far the
  heaviest files) are kept for the last N run folders and for every run whose model is a
  registered version; the other runs lose them. Metrics, predictions, plots and reports stay, so
  every week can still be read; a run whose models were removed gets a ``retention.json`` saying
  what went and when. A registered version's model stays in the MLflow artifact store either way.
* **Registry versions** (``archive_after_weeks``, K): a version that is neither ``champion`` nor
  ``challenger`` and was registered K or more weeks (of logical dates) before the current run is
  tagged ``archived=true`` (with the date). No alias is ever moved and no version deleted, so
  the champion and its history stay reachable; a person may still promote an archived version.

0 turns either rule off.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from covid_tasks.config import CHALLENGER_ALIAS, CHAMPION_ALIAS, Config
from covid_tasks.layout import DataRoot
from covid_tasks.storage import write_json

logger = logging.getLogger(__name__)

HEAVY_PATTERNS = ("*.keras", "*.h5")
ARCHIVED_TAG = "archived"


def prune_runs(root: DataRoot, keep_last: int, registered_keys: set[str], current_key: str) -> dict[str, Any]:
    """Delete the models of run folders beyond the last ``keep_last`` that hold no registered version.

    Args:
        root: the data root.
        keep_last: how many of the newest run folders (by their newest file) keep their models.
        registered_keys: run keys whose model is a registered version (always kept).
        current_key: this run's key (always kept).

    Returns:
        ``{"runs_pruned": [keys], "files_removed", "bytes_freed"}``.
    """
    out: dict[str, Any] = {"runs_pruned": [], "files_removed": 0, "bytes_freed": 0}
    if keep_last <= 0 or not root.runs.is_dir():
        return out
    folders = sorted((p for p in root.runs.iterdir() if p.is_dir()), key=_last_written, reverse=True)
    keep = {p.name for p in folders[:keep_last]} | set(registered_keys) | {current_key}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for folder in folders:
        if folder.name in keep:
            continue
        heavy = sorted({f for pattern in HEAVY_PATTERNS for f in folder.glob(pattern) if f.is_file()})
        if not heavy:
            continue
        freed = sum(f.stat().st_size for f in heavy)
        for f in heavy:
            f.unlink()
        write_json(root.run(folder.name).retention, {"removed": [f.name for f in heavy], "bytes_freed": freed,
                                                     "removed_at": now, "rule": f"retain_runs={keep_last}"})
        out["runs_pruned"].append(folder.name)
        out["files_removed"] += len(heavy)
        out["bytes_freed"] += freed
    if out["runs_pruned"]:
        logger.info("retention: removed %d model file(s), %.1f MB, from %d run folder(s): %s",
                    out["files_removed"], out["bytes_freed"] / 1e6, len(out["runs_pruned"]),
                    out["runs_pruned"])
    return out


def archive_versions(client: Any, name: str, after_weeks: int, now: datetime) -> list[str]:
    """Tag ``archived`` the versions that are neither champion nor challenger, ``after_weeks`` old.

    A version's age is measured from its ``logical_date`` tag (the DAG run that registered it),
    else its creation time, to ``now`` (the current run's logical date).

    Returns:
        The version numbers archived by this call.
    """
    if after_weeks <= 0:
        return []
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    protected = {str(v) for a, v in (model.aliases or {}).items() if a in (CHAMPION_ALIAS, CHALLENGER_ALIAS)}
    done = []
    for version in client.search_model_versions(f"name='{name}'"):
        number, tags = str(version.version), version.tags or {}
        if number in protected or tags.get(ARCHIVED_TAG) == "true":
            continue
        born = _when(tags.get("logical_date")) or datetime.fromtimestamp(
            version.creation_timestamp / 1000, timezone.utc)
        if now - born >= timedelta(weeks=after_weeks):
            client.set_model_version_tag(name, number, ARCHIVED_TAG, "true")
            client.set_model_version_tag(name, number, "archived_at", now.isoformat(timespec="seconds"))
            done.append(number)
    if done:
        logger.info("retention: archived version(s) %s of %s (neither champion nor challenger, %d+ "
                    "weeks old)", ", ".join(done), name, after_weeks)
    return done


def apply(cfg: Config, client: Any, run_key: str, logical_date: str | None) -> dict[str, Any]:
    """Both rules for one run; returns what they did (part of ``register``'s result).

    Args:
        cfg: configuration (``data_root``, ``model_name``, ``retain_runs``, ``archive_after_weeks``).
        client: an ``MlflowClient`` on the registry.
        run_key: this run's key.
        logical_date: this run's logical date (ISO 8601), ``None`` for now.
    """
    root = DataRoot.of(cfg)
    registered = _registered_keys(client, cfg.model_name)
    out = prune_runs(root, cfg.retain_runs, registered, root.run(run_key).key)
    now = _when(logical_date) or datetime.now(timezone.utc)
    out["archived_versions"] = archive_versions(client, cfg.model_name, cfg.archive_after_weeks, now)
    return out


def _last_written(folder: Any) -> float:
    """When the run last wrote a file (retention's own note does not count, nor do removals)."""
    times = [f.stat().st_mtime for f in folder.iterdir() if f.is_file() and f.name != "retention.json"]
    return max(times, default=folder.stat().st_mtime)


def _registered_keys(client: Any, name: str) -> set[str]:
    from mlflow.exceptions import MlflowException

    try:
        return {(v.tags or {}).get("run_key", "") for v in client.search_model_versions(f"name='{name}'")}
    except MlflowException:
        return set()


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
