"""What the page shows beside the served version, read from the registry: its model card, the lineage
of every registered version, and the champion's timeline figure.

The service sees only the registry (no data root), so each view is read from MLflow on demand
and kept for ``poll_interval_s`` seconds (:class:`RegistryViews`):

* :func:`read_card`: ``model_card.md`` of a version (``register`` writes it; ``validate --log``
  renders it again with the external validation);
* :func:`lineage`: every version of the model in order (``register`` gives each the alias
  ``challenger`` when it registers it, and ``champion`` when it is promoted) with the tags a person
  reads a week by: registered date, ``logical_date``, ``decision``, ``data_check``, the test ROC AUC,
  sensitivity and specificity with their intervals, the images and dataset version of
  ``training_data``, ``archived``, its aliases now;
* :func:`read_timeline`: the ``history/timeline.png`` that ``register`` logs with each MLflow run,
  of the champion's run.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from covid_tasks.config import redact_uri
from covid_tasks.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

CARD_PATH = "/v1/model/card"
HISTORY_PATH = "/v1/history"
TIMELINE_PATH = "/v1/history/timeline.png"
TIMELINE_ARTIFACT = "history/timeline.png"
#: Version tags shown per version, numbers parsed; ``*_ci95`` tags are ``"[low, high]"``.
FIGURE_TAGS = ("roc_auc", "sensitivity", "specificity")


def _iso(ms: Any) -> str | None:
    return None if ms is None else datetime.fromtimestamp(int(ms) / 1000, timezone.utc).isoformat()


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def _interval(text: Any) -> list[float] | None:
    """``"[0.5, 0.9]"`` -> ``[0.5, 0.9]``; anything else -> ``None``."""
    if not isinstance(text, str) or not text.startswith("["):
        return None
    parts = [_number(p) for p in text.strip("[] ").split(",")]
    return [p for p in parts if p is not None] if len(parts) == 2 and None not in parts else None


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def read_card(settings: ServeSettings, version: str) -> str | None:
    """``model_card.md`` of ``version``, ``None`` when it has none (registered before model cards).

    Raises:
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read.
    """
    from covid_tasks.model_card import CARD, read_artifact

    return _guarded(settings, f"read the model card of version {version}",
                    lambda: read_artifact(_client(settings.tracking_uri), settings.model_name, version,
                                          settings.tracking_uri, CARD))


def lineage(settings: ServeSettings) -> dict[str, Any]:
    """Every version of the model, oldest first, with its aliases and the tags of its week.

    Returns:
        ``{"model", "champion", "challenger", "versions": [{"version", "registered_at",
        "logical_date", "decision", "data_check", "roc_auc", "roc_auc_ci95", "sensitivity",
        "sensitivity_ci95", "specificity", "specificity_ci95", "training_images",
        "dataset_version", "archived", "aliases", "champion_now", "run_id",
        "external_validations"}], "timeline"}``.

    Raises:
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read.
    """
    return _guarded(settings, "read the model's versions", lambda: _lineage(settings))


def _lineage(settings: ServeSettings) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from covid_tasks.model_card import VERSION_TAG_PREFIX

    client, name = _client(settings.tracking_uri), settings.model_name
    try:
        aliases = {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {"model": name, "champion": None, "challenger": None, "versions": [], "timeline": None}
    by_version: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags, number = dict(v.tags or {}), str(v.version)
        data = _training_data(tags)
        row: dict[str, Any] = {
            "version": number, "registered_at": _iso(v.creation_timestamp),
            "logical_date": tags.get("logical_date") or None, "decision": tags.get("decision"),
            "data_check": tags.get("data_check"), "training_images": data.get("images"),
            "dataset_version": data.get("dataset_version"), "archived": tags.get("archived") == "true",
            "aliases": sorted(by_version.get(number, [])), "champion_now": aliases.get("champion") == number,
            "run_id": v.run_id,
            "external_validations": sum(1 for k in tags if k.startswith(VERSION_TAG_PREFIX))}
        for key in FIGURE_TAGS:
            row[key], row[f"{key}_ci95"] = _number(tags.get(key)), _interval(tags.get(f"{key}_ci95"))
        rows.append(row)
    champion = aliases.get("champion")
    return {"model": name, "champion": champion, "challenger": aliases.get("challenger"), "versions": rows,
            "timeline": TIMELINE_PATH if champion else None}


def _training_data(tags: dict[str, str]) -> dict[str, Any]:
    """The ``training_data`` tag (a JSON object), with the ``dataset_version`` tag as a fallback."""
    try:
        data = json.loads(tags.get("training_data") or "{}")
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    return {"images": data.get("images"), "dataset_version": data.get("dataset_version") or tags.get(
        "dataset_version")}


def read_timeline(settings: ServeSettings, run_id: str) -> bytes | None:
    """The ``history/timeline.png`` of an MLflow run, ``None`` when the run has none.

    Raises:
        covid_tasks.registry.RegistryUnavailableError: the registry cannot be read.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    def load() -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="covid-timeline-") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TIMELINE_ARTIFACT,
                                                            dst_path=tmp, tracking_uri=settings.tracking_uri)
            except (MlflowException, OSError) as exc:
                if isinstance(exc, MlflowException) and exc.error_code not in ("RESOURCE_DOES_NOT_EXIST",
                                                                               "INVALID_PARAMETER_VALUE"):
                    raise
                return None
            return Path(local).read_bytes() if Path(local).is_file() else None

    return _guarded(settings, f"read the timeline of run {run_id}", load)


def _guarded(settings: ServeSettings, doing: str, read: Callable[[], Any]) -> Any:
    """Run a registry read; a failure to reach or read it becomes a one-line ``RegistryUnavailableError``."""
    from mlflow.exceptions import MlflowException

    from covid_tasks.registry import RegistryUnavailableError, store_problem, unavailable

    broken = store_problem(settings.tracking_uri)
    if broken:
        raise RegistryUnavailableError(broken)
    try:
        return read()
    except (MlflowException, OSError) as exc:
        down = unavailable(exc, settings.tracking_uri, doing)
        raise (down or RegistryUnavailableError(redact_uri(
            f"cannot {doing} from the registry at {settings.tracking_uri}: {str(exc)[:300]}"))) from exc


class RegistryViews:
    """The three views, each read at most once per ``poll_interval_s`` (a thread-safe cache).

    Args:
        settings: the service's settings.
        clock: seconds, monotonic (tests may pass their own).
    """

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._cache: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _cached(self, key: tuple[str, ...], load: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.settings.poll_interval_s:
            return hit[1]
        value = load()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def card(self, version: str) -> str | None:
        """The version's model card (``None`` without one)."""
        return self._cached(("card", version), lambda: read_card(self.settings, version))

    def history(self) -> dict[str, Any]:
        """:func:`lineage`."""
        return self._cached(("history",), lambda: lineage(self.settings))

    def timeline(self, run_id: str) -> bytes | None:
        """:func:`read_timeline` of ``run_id``."""
        return self._cached(("timeline", run_id), lambda: read_timeline(self.settings, run_id))
