"""Follow ``name@alias`` in the MLflow registry and hold the version being served.

A background thread looks the alias up every ``poll_interval_s`` seconds. When it points to a
new version, that version is downloaded, loaded and warmed up in the same thread while requests
keep using the current one; then one reference assignment swaps it in. A request takes the
reference once (:attr:`ModelHolder.current`) and uses that :class:`ServedModel` for decoding,
predicting and explaining, so no request fails or mixes two versions during a swap.

When the registry is unreachable, or a local store is gone or broken (moved, deleted, replaced
by a file that is not an MLflow store: :func:`covid_tasks.registry.store_problem`), the loaded
version keeps serving and the failure is reported (:meth:`ModelHolder.status`). The registry URI
is shown everywhere without its credentials (:func:`covid_tasks.config.redact_uri`). A version
that cannot be used (missing files, wrong class order, no such version) is not retried until the
alias moves; transient failures are retried at the next poll.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from covid_tasks.config import redact_uri
from covid_tasks.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

#: Version tags copied into ``/v1/model``'s ``gate`` (the evaluation that let the version in).
GATE_TAGS = ("gate", "decision", "sensitivity", "specificity", "sensitivity_ci95", "specificity_ci95",
             "roc_auc", "roc_auc_ci95", "pr_auc", "ppv", "npv", "min_sensitivity", "min_specificity",
             "n_test", "champion_compared", "promotion_margin")


def _iso(ms: Any) -> str | None:
    return None if ms is None else datetime.fromtimestamp(int(ms) / 1000, timezone.utc).isoformat()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(eq=False)
class ServedModel:
    """One loaded registered version, immutable once served.

    Attributes:
        name: registered model name.
        version: the version number (a string, as MLflow gives it).
        run_id: the MLflow run that logged the model.
        threshold: predict covid when P(covid) >= threshold.
        img_size: the square input size.
        calibrated: whether ``operating_point.json`` records a calibration folded into the model.
        info: what ``/v1/model`` shows.
        model: the Keras model.
        gradcam: the Grad-CAM explainer, ``None`` when the model does not allow one.
        gradcam_error: why there is no explainer.
        card: the version's model card (Markdown) as loaded, ``None`` without one.
    """

    name: str
    version: str
    run_id: str | None
    threshold: float
    img_size: int
    calibrated: bool
    info: dict[str, Any]
    model: Any
    gradcam: Any = None
    gradcam_error: str | None = None
    card: str | None = None
    _forward: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import tensorflow as tf

        model = self.model
        self._forward = tf.function(lambda x: model([x], training=False), reduce_retracing=True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """P(covid) for a float32 ``(n, img_size, img_size, 3)`` batch of raw 0..255 RGB."""
        return np.asarray(self._forward(batch)).reshape(-1).astype(float)

    def warm_up(self) -> None:
        """Trace the prediction (and Grad-CAM) graphs once, before the version takes requests."""
        batch = np.full((1, self.img_size, self.img_size, 3), 127.0, dtype="float32")
        self.predict(batch)
        if self.gradcam is not None:
            self.gradcam(batch, [True])


def load_served(settings: ServeSettings, version: Any) -> ServedModel:
    """Download, load and warm up one registered version.

    Args:
        settings: service settings (registry URI, model name, alias).
        version: the ``ModelVersion`` the alias points to.

    Returns:
        The version, ready to serve.

    Raises:
        RegistryUnavailableError: the registry could not be reached while downloading.
        FileNotFoundError, ValueError, mlflow.exceptions.MlflowException: the version is unusable.
    """
    from covid_tasks.registry import load_registered
    from covid_tasks.serve.gradcam import GradCam, GradCamUnavailableError

    name, number, uri = settings.model_name, str(version.version), settings.tracking_uri
    loaded = load_registered(f"models:/{name}/{number}", uri)
    op = _operating_point(uri, name, number)
    gradcam, gradcam_error = None, None
    try:
        gradcam = GradCam(loaded.model)
    except GradCamUnavailableError as exc:
        gradcam_error = str(exc)
        logger.warning("serve: version %s has no Grad-CAM: %s", number, exc)
    info = _model_info(settings, version, op, loaded, uri)
    card = _card(uri, name, number)
    info["model_card"] = "/v1/model/card" if card else None
    served = ServedModel(name, number, version.run_id, loaded.threshold, loaded.img_size,
                         bool(op.get("calibration")), info, loaded.model, gradcam, gradcam_error, card)
    served.warm_up()
    info["loaded_at"] = _now()
    return served


def _card(uri: str, name: str, version: str) -> str | None:
    """``model_card.md`` of the version (``None`` for a version registered before model cards)."""
    from mlflow import MlflowClient

    from covid_tasks.model_card import CARD, read_artifact

    return read_artifact(MlflowClient(uri, registry_uri=uri), name, version, uri, CARD)


def _operating_point(uri: str, name: str, version: str) -> dict[str, Any]:
    """``operating_point.json`` of the version (a few hundred bytes, fetched on its own)."""
    import mlflow
    from mlflow import MlflowClient

    from covid_tasks.storage import read_json

    source = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="covid-serve-op-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"{source.rstrip('/')}/operating_point.json",
                                                    dst_path=tmp, tracking_uri=uri)
        return read_json(Path(local))


def _model_info(settings: ServeSettings, version: Any, op: dict[str, Any], loaded: Any, uri: str
                ) -> dict[str, Any]:
    """The facts ``/v1/model`` reports, from the version, its tags, its run and its files."""
    tags = dict(version.tags or {})
    return {
        "name": settings.model_name, "version": str(version.version), "alias": settings.alias,
        "run_id": version.run_id, "run_key": tags.get("run_key") or loaded.run_key,
        "threshold": loaded.threshold, "img_size": loaded.img_size, "class_indices": loaded.class_indices,
        "calibrated": bool(op.get("calibration")), "calibration": op.get("calibration"),
        "threshold_rule": op.get("rule") or tags.get("threshold_rule"),
        "gate": {k: tags[k] for k in GATE_TAGS if k in tags},
        "dataset_version": tags.get("dataset_version"), "backbone": tags.get("backbone"),
        "trained_at": _run_start(uri, version.run_id), "registered_at": _iso(version.creation_timestamp),
        "description": version.description or None, "registry": redact_uri(uri),
        "training_data": training_data(tags),
    }


def training_data(tags: dict[str, str]) -> dict[str, Any]:
    """What the version was trained on, from the tags ``register`` writes (``training_data``, a
    JSON object: images per split and label, dataset version, source, ``demo``).

    Versions registered before that tag existed get what their other tags say, and ``demo`` is
    then ``None`` (unknown).
    """
    import json

    try:
        data = json.loads(tags.get("training_data") or "{}")
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    data.setdefault("dataset_version", tags.get("dataset_version"))
    data["source"] = redact_uri(str(data.get("source") or tags.get("source_uri") or "")) or None
    data.setdefault("demo", {"true": True, "false": False}.get(tags.get("demo", "")))
    return data


def _run_start(uri: str, run_id: str | None) -> str | None:
    """When the version's MLflow run (the training run) started; ``None`` when it cannot be read."""
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return _iso(MlflowClient(uri).get_run(run_id).info.start_time)
    except MlflowException as exc:
        logger.warning("serve: cannot read run %s: %s", run_id, exc)
        return None


class ModelHolder:
    """The served version and the poller that follows the alias.

    Args:
        settings: service settings.
        loader: builds a :class:`ServedModel` from a ``ModelVersion`` (tests may wrap it).
        on_swap: called with the new model after each swap (metrics).
    """

    def __init__(self, settings: ServeSettings, loader: Callable[..., ServedModel] = load_served,
                 on_swap: Callable[[ServedModel], None] | None = None) -> None:
        self.settings = settings
        self._loader = loader
        self._on_swap = on_swap
        self._current: ServedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()  # guards _failed and _state against status() reading mid-update
        self._state: dict[str, Any] = {
            "registry_reachable": None, "registry_error": None, "last_check": None, "last_success": None,
            "alias_version": None, "loading": None, "checks": 0}

    @property
    def current(self) -> ServedModel | None:
        """The version serving now; read it once per request."""
        return self._current

    @property
    def target(self) -> str:
        return f"models:/{self.settings.model_name}@{self.settings.alias}"

    def start(self) -> None:
        """Start the poller thread (the first look-up happens at once, in the background)."""
        self._thread = threading.Thread(target=self._run, name="covid-serve-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the poller must survive anything and try again
                logger.exception("serve: unexpected error while following %s", self.target)
            if self._stop.wait(self.settings.poll_interval_s):
                return

    def refresh(self) -> None:
        """Look the alias up once; load and swap in a new version when it moved."""
        from covid_tasks.registry import RegistryUnavailableError, alias_version, store_problem

        s = self.settings
        gone = store_problem(s.tracking_uri)  # a missing store is "no registry" here, not "no model"
        if gone:
            self._registry_failed(RegistryUnavailableError(gone))
            return
        try:
            version = alias_version(s.model_name, s.alias, s.tracking_uri)
        except RegistryUnavailableError as exc:
            self._registry_failed(exc)
            return
        with self._lock:
            self._state.update(registry_reachable=True, registry_error=None, last_success=_now(),
                               last_check=_now(), checks=self._state["checks"] + 1,
                               alias_version=None if version is None else str(version.version))
        current = self._current
        if version is None or (current is not None and current.version == str(version.version)):
            return
        with self._lock:
            if str(version.version) in self._failed:
                return
        self._load(version)

    def _registry_failed(self, exc: Exception) -> None:
        error = redact_uri(str(exc))[:500]
        with self._lock:
            was = self._state["registry_reachable"]
            self._state.update(registry_reachable=False, registry_error=error, last_check=_now(),
                               checks=self._state["checks"] + 1)
        if was is not False:
            logger.warning("serve: registry unreachable or unreadable (%s); %s; %s", error,
                           self._serving_note(), retry_note(self.settings))

    def _serving_note(self) -> str:
        current = self._current
        return f"still serving version {current.version}" if current else "no model loaded yet"

    def _load(self, version: Any) -> None:
        from mlflow.exceptions import MlflowException

        from covid_tasks.registry import RegistryUnavailableError

        number = str(version.version)
        self._state["loading"] = number
        started = time.monotonic()
        logger.info("serve: %s now points to version %s; loading it (%s)", self.target, number,
                    self._serving_note())
        try:
            served = self._loader(self.settings, version)
        except FileNotFoundError as exc:
            self._skip(number, str(exc))
        except (RegistryUnavailableError, OSError) as exc:
            self._registry_failed(exc)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                self._skip(number, str(exc))
            else:
                self._registry_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a broken version must not stop the service
            self._skip(number, f"{type(exc).__name__}: {exc}")
        else:
            previous, self._current = self._current, served
            logger.info("serve: now serving %s version %s (was %s; loaded in %.1f s)",
                        self.settings.model_name, number, previous.version if previous else "none",
                        time.monotonic() - started)
            if self._on_swap is not None:
                self._on_swap(served)
        finally:
            self._state["loading"] = None

    def _skip(self, number: str, why: str) -> None:
        why = redact_uri(why)
        with self._lock:
            self._failed[number] = why[:1000]
        logger.error("serve: version %s cannot be served and is skipped until the alias moves: %s",
                     number, why)

    def status(self) -> dict[str, Any]:
        """Readiness and why: what is served, the registry's state, what failed."""
        with self._lock:
            current, state, failed = self._current, dict(self._state), dict(self._failed)
        out: dict[str, Any] = {
            "ready": current is not None, "target": self.target,
            "model": None if current is None else {"name": current.name, "version": current.version,
                                                   "run_id": current.run_id},
            "registry": {"uri": redact_uri(self.settings.tracking_uri),
                         "reachable": state["registry_reachable"], "error": state["registry_error"],
                         "last_check": state["last_check"], "last_success": state["last_success"]},
            "alias_version": state["alias_version"], "loading": state["loading"],
            "failed_versions": failed,
        }
        out["reason"] = readiness_reason(self.settings, self.target, current, state, failed)
        return out


def retry_note(s: ServeSettings) -> str:
    """What the service does about a registry it cannot read: it polls again."""
    return f"retrying every {s.poll_interval_s:g} s in the background"


def readiness_reason(s: ServeSettings, target: str, current: ServedModel | None, state: dict[str, Any],
                     failed: dict[str, str]) -> str:
    """One sentence on the state: the ``reason`` of ``/readyz`` and the message of every 503.

    The registry URI appears without credentials.
    """
    alias_version = state["alias_version"]
    uri = redact_uri(s.tracking_uri)
    if current is not None:
        if state["registry_reachable"] is False:
            return (f"serving version {current.version}; the registry at {uri} is unreachable "
                    f"({state['registry_error']}): still serving version {current.version}, "
                    f"{retry_note(s)}; alias moves are seen once it is back")
        if alias_version is None:
            return f"serving version {current.version}; {target} is no longer set in the registry"
        if alias_version != current.version:
            why = failed.get(alias_version)
            state_of_new = f"which cannot be served: {why}" if why else "which is loading"
            return (f"serving version {current.version}; {target} points to version "
                    f"{alias_version}, {state_of_new}")
        return f"serving version {current.version} ({target})"
    if state["checks"] == 0:
        return f"starting: looking up {target} in the registry at {uri}"
    if state["registry_reachable"] is False:
        return (f"no model loaded: the registry at {uri} is unreachable "
                f"({state['registry_error']}); {retry_note(s)}")
    if alias_version is None:
        return (f"no champion yet: no version of '{s.model_name}' carries the alias '{s.alias}' in the "
                f"registry at {uri}; a pipeline run that passes the gate sets it (make run)")
    if alias_version in failed:
        return f"no model loaded: version {alias_version} cannot be served: {failed[alias_version]}"
    return f"no model loaded yet: loading version {alias_version} of '{s.model_name}'"
