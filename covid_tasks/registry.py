"""Downstream lookup: resolve a registered model (normally ``@champion``) and load it with its mapping.

A registered version's artifacts are one folder (the MLflow ``keras`` flavour plus two files)::

    MLmodel                 flavour, signature (float32 images N x S x S x 3) and input example
    data/model.keras        the Keras 3 model: raw 0..255 RGB in, P(covid) out
    class_indices.json      {"non_covid": 0, "covid": 1}
    operating_point.json    {"threshold": t, "img_size": S, "positive_class": "covid", ...}

The alias is resolved to a version number *first*, and that exact version is downloaded, so the
version a caller reports is the one it loaded even if the alias moves in between. Other services
can copy the pattern with plain ``mlflow`` and ``keras`` (see docs/serving.md).

A lookup never creates a store: a SQLite or folder URI that does not exist is reported as such,
and every lookup error names the tracking URI it used, without its credentials
(:func:`covid_tasks.config.redact_uri`: ``http://user:password@host`` is shown as
``http://***@host`` in every message and log line). MLflow's own HTTP retries (minutes by
default) are bounded by :func:`bound_mlflow_http`, so an unreachable registry fails in seconds
with one line naming the URI. The errors say what failed, not what happens next: the caller says
that (a task fails and Airflow retries it; the service keeps serving and polls again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, MODEL_NAME, Config, redact_uri, sqlite_path
from covid_tasks.layout import CLASS_INDICES, METRICS, OPERATING_POINT
from covid_tasks.storage import file_sha256, read_json

logger = logging.getLogger(__name__)

#: MLflow HTTP client limits set by the tasks and lookups unless the environment sets them (MLflow's
#: defaults, 7 retries with factor 2 and 120 s per request, take minutes to give up): two retries
#: about 1 s and 2 s apart, 10 s per request. A refused connection fails in about 3 s, a host that
#: drops packets in under 50 s.
MLFLOW_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class RegistryUnavailableError(RuntimeError):
    """The MLflow registry could not be reached or refused a read (not "the model is absent")."""


def bound_mlflow_http(env: dict[str, str] | None = None) -> dict[str, str]:
    """Bound MLflow's HTTP retries and timeouts (``MLFLOW_HTTP_LIMITS``) where the environment does not.

    The tasks and the inference service use the same limits; an operator's value is kept.

    Args:
        env: the environment to set (``os.environ`` by default).

    Returns:
        The limits in effect.
    """
    env = os.environ if env is None else env
    for key, value in MLFLOW_HTTP_LIMITS.items():
        env.setdefault(key, value)
    return {key: env[key] for key in MLFLOW_HTTP_LIMITS}


def unavailable(exc: BaseException, uri: str, doing: str) -> RegistryUnavailableError | None:
    """A one-line ``RegistryUnavailableError`` when ``exc`` means the registry cannot be reached.

    The message names the URI without credentials and says what failed, not what happens next
    (the caller knows: a task fails and Airflow retries it, the service keeps serving and polls).

    Args:
        exc: an exception raised by an MLflow call.
        uri: the tracking URI used.
        doing: what was being done, for the message (``"register the model"``).

    Returns:
        The error to raise, or ``None`` when ``exc`` is an answer from the registry (not found,
        refused as invalid, permission denied), which retrying would not change.
    """
    text = str(exc)
    code = getattr(exc, "error_code", None)
    transport = ("API request to" in text and "failed with exception" in text) or code in (
        "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or _is_requests_error(exc)
    if not transport:
        return None
    short = text.splitlines()[0][:160] if text else type(exc).__name__
    for pattern in (r"\[Errno -?\d+\] ([^\"')]+)", r"(Read timed out)", r"(Max retries exceeded)"):
        found = re.search(pattern, text)
        if found:
            short = found.group(1).strip()
            break
    return RegistryUnavailableError(redact_uri(f"MLflow registry at {uri} is unreachable ({short}) while "
                                               f"trying to {doing}"))


def _is_requests_error(exc: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - mlflow depends on requests
        return False
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI a lookup uses: the argument, else ``MLFLOW_TRACKING_URI`` or the URI set in
    this process with ``mlflow.set_tracking_uri``, else the project's (``COVID_MLFLOW_TRACKING_URI``
    or the SQLite store beside the data root)."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI") or mlflow.tracking.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    return Config.from_env().tracking_uri


def require_store(tracking_uri: str) -> None:
    """Refuse a local store that does not exist (MLflow would create an empty one and find nothing).

    Raises:
        mlflow.exceptions.MlflowException: ``RESOURCE_DOES_NOT_EXIST``, naming the URI.
    """
    from mlflow.exceptions import MlflowException

    local = _local_store(tracking_uri)
    if local is not None and not local.exists():
        raise MlflowException(f"no MLflow store at {tracking_uri} ({local} does not exist); nothing was "
                              "registered there. Pass the tracking URI of your registry (or set "
                              "MLFLOW_TRACKING_URI / COVID_MLFLOW_TRACKING_URI)",
                              error_code="RESOURCE_DOES_NOT_EXIST")


def _local_store(tracking_uri: str) -> Path | None:
    """The file or folder of a local store (SQLite, folder path, ``file:``), ``None`` for a server."""
    local = sqlite_path(tracking_uri)
    if local is None and tracking_uri.startswith(("/", "./", "../")):
        local = Path(tracking_uri)  # a plain folder path (a file store)
    elif local is None and tracking_uri.startswith("file:"):
        local = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
    return local


def store_problem(tracking_uri: str) -> str | None:
    """Why a local store cannot be read, checked without opening it for MLflow; ``None`` when fine.

    A store that is gone (moved, deleted, never made), a SQLite file that is not a database (or
    not MLflow's), or a folder store that is a file: each would otherwise look like a reachable,
    empty registry, and MLflow would create a fresh store in its place. Remote stores (``http``,
    databases) are not checked here; their look-ups fail on their own.

    Args:
        tracking_uri: the tracking URI.

    Returns:
        One sentence naming the URI and the path, or ``None``.
    """
    local = _local_store(tracking_uri)
    if local is None:
        return None
    shown = redact_uri(tracking_uri)
    if not local.exists():
        return f"no MLflow store at {shown}: {local} does not exist (not made yet, moved or deleted)"
    if sqlite_path(tracking_uri) is None:
        return None if local.is_dir() else f"the MLflow store {shown} is not a folder"
    if not local.is_file():
        return f"the MLflow store {shown} is not a file ({local})"
    try:  # read-only: a lookup never writes to, or creates, the store
        with contextlib.closing(sqlite3.connect(f"{local.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        return f"the MLflow store {shown} cannot be read: {exc}"
    if "registered_models" not in tables:
        return f"{local} is not an MLflow store (no registered_models table)"
    return None


@dataclass
class LoadedModel:
    """A model ready to predict, with the facts needed to read its output.

    Attributes:
        model: the Keras model (raw 0..255 RGB in, P(covid) out).
        class_indices: ``{"non_covid": 0, "covid": 1}``, checked.
        threshold: predict covid when P(covid) >= threshold.
        img_size: the square input size the model expects.
        source: what the caller asked for (a ``models:/`` URI or a file path).
        version: the registered version actually loaded, or ``None`` for a file.
        run_key: the pipeline run that produced the version, when known.
        output: what the model's output means (``operating_point.json``'s ``output``), e.g.
            "calibrated P(covid): platt scaling fitted on the validation split".
        calibration: the calibration recorded with the version (method, parameters, ECE), if any.
    """

    model: Any
    class_indices: dict[str, int]
    threshold: float
    img_size: int
    source: str
    version: str | None = None
    run_key: str | None = None
    output: str = "P(covid)"
    calibration: dict[str, Any] | None = field(default=None)


def check_class_indices(mapping: dict[str, int]) -> dict[str, int]:
    """Refuse any mapping other than ``non_covid`` -> 0, ``covid`` -> 1.

    Raises:
        ValueError: the mapping differs.
    """
    expected = {name: i for i, name in enumerate(CLASS_NAMES)}
    if {k: int(v) for k, v in mapping.items()} != expected:
        raise ValueError(f"class_indices {mapping} differ from the required {expected}")
    return expected


def alias_version_number(client: Any, name: str, alias: str) -> str | None:
    """The version number ``name@alias`` points to, ``None`` if the model or alias is absent.

    Raises:
        mlflow.exceptions.MlflowException: any registry error other than "model does not exist".
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def alias_version(name: str, alias: str, tracking_uri: str) -> Any | None:
    """The ``ModelVersion`` that ``name@alias`` points to, or ``None`` when there is none.

    A local store (SQLite file or folder) that does not exist yet means "no model"; it is not
    created here.

    Args:
        name: registered model name.
        alias: alias such as ``champion``.
        tracking_uri: MLflow tracking (and registry) URI.

    Returns:
        The ``mlflow.entities.model_registry.ModelVersion`` or ``None``.

    Raises:
        RegistryUnavailableError: the registry cannot be reached or refuses the request, or the
            local store exists but is not a readable MLflow store (:func:`store_problem`).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        require_store(tracking_uri)
    except MlflowException:
        return None
    broken = store_problem(tracking_uri)
    if broken:
        raise RegistryUnavailableError(broken)
    try:
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        version = alias_version_number(client, name, alias)
        return None if version is None else client.get_model_version(name, version)
    except MlflowException as exc:
        down = unavailable(exc, tracking_uri, f"read {name}@{alias}")
        raise (down or RegistryUnavailableError(redact_uri(
            f"cannot read {name}@{alias} from the MLflow registry at {tracking_uri}: {exc}"))) from exc
    except Exception as exc:  # SQLAlchemy errors of a local store that broke while in use
        if type(exc).__module__.startswith("sqlalchemy"):
            raise RegistryUnavailableError(redact_uri(
                f"cannot read {name}@{alias} from the MLflow store at {tracking_uri}: "
                f"{str(exc).splitlines()[0][:300]}")) from exc
        raise


def load_keras_file(path: str | Path, threshold: float | None = None) -> LoadedModel:
    """Load a ``.keras`` file; mapping and threshold come from files beside it.

    ``class_indices.json`` is read when present (else the fixed class order). The threshold is
    ``threshold`` when given, else the one recorded beside the file: ``operating_point.json`` when
    it belongs to this file (its ``model_sha256``), else ``metrics.json`` (whose ``threshold``
    applies to the evaluated, calibrated ``model.keras``; for the uncalibrated ``finetune.keras``
    it records ``threshold_uncalibrated``); without either, loading fails rather than assume 0.5.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``class_indices.json`` differs from the required order, or no threshold was
            given and none is recorded beside the file.
    """
    import keras

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    mapping_file = p.parent / CLASS_INDICES
    mapping = check_class_indices(read_json(mapping_file)) if mapping_file.is_file() else \
        {n: i for i, n in enumerate(CLASS_NAMES)}
    recorded, output, calibration = _recorded_beside(p)
    if threshold is None and recorded is None:
        raise ValueError(f"{p} has no operating point beside it (operating_point.json or metrics.json "
                         f"with its threshold): pass the threshold explicitly (predict --threshold) "
                         f"rather than assume 0.5")
    model = keras.saving.load_model(p)
    return LoadedModel(model, mapping, float(recorded if threshold is None else threshold),
                       int(model.input_shape[1]), str(p), output=output, calibration=calibration)


def _recorded_beside(path: Path) -> tuple[float | None, str, dict[str, Any] | None]:
    """The threshold, output meaning and calibration recorded beside a model file, if any."""
    op_file, metrics_file = path.parent / OPERATING_POINT, path.parent / METRICS
    if op_file.is_file():
        op = read_json(op_file)
        if op.get("model_sha256") in (None, file_sha256(path)):  # written for this very file
            return float(op["threshold"]), op.get("output", "P(covid)"), op.get("calibration")
    if metrics_file.is_file():
        return _recorded_operating_point(path, read_json(metrics_file))
    return None, "P(covid), calibration unknown", None


def _recorded_operating_point(path: Path, metrics: dict[str, Any]
                              ) -> tuple[float, str, dict[str, Any] | None]:
    """The threshold ``metrics.json`` records for the model file ``path``, what its output means,
    and its calibration record (``None`` for the uncalibrated ``finetune.keras``)."""
    source = metrics.get("source_model_path")
    if source and Path(source).name == path.name and "threshold_uncalibrated" in metrics:
        return float(metrics["threshold_uncalibrated"]), "P(covid), not calibrated", None
    calibration = metrics.get("calibration") or {}
    method = calibration.get("method", "none")
    if method == "none":
        return float(metrics["threshold"]), "P(covid), not calibrated", None
    record = {k: calibration.get(k) for k in ("method", "params", "fitted_on", "ece_before", "ece_after")}
    output = f"calibrated P(covid): {method} scaling fitted on the validation split"
    return float(metrics["threshold"]), output, record


def load_registered(model_uri: str, tracking_uri: str | None = None, threshold: float | None = None
                    ) -> LoadedModel:
    """Resolve a ``models:/name@alias`` or ``models:/name/version`` URI and load that version.

    A ``runs:/<run_id>/model`` URI is loaded as is (``version`` is then ``None``).

    Args:
        model_uri: the registered model URI.
        tracking_uri: MLflow tracking URI; ``None`` uses MLflow's current one.
        threshold: override the version's recorded operating threshold.

    Returns:
        The loaded model, its checked class mapping, threshold, input size and version.

    Raises:
        RegistryUnavailableError: the registry cannot be reached.
        mlflow.exceptions.MlflowException: the model, version or alias does not exist.
        FileNotFoundError: the version lacks ``class_indices.json`` or ``operating_point.json``.
        ValueError: a malformed URI, or ``class_indices.json`` differs from the required order.
    """
    import keras
    from mlflow import MlflowClient

    bound_mlflow_http()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    require_store(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if model_uri.startswith("runs:/"):
        name, version, pinned, source = None, None, model_uri, model_uri  # an unregistered run's model
    else:
        name, version = _resolve(client, model_uri, tracking_uri)
        pinned = source = f"models:/{name}/{version}"
    # The files are read into memory and the download removed: a service that follows the alias
    # loads a version every time it moves and must not fill its disk with old copies.
    with tempfile.TemporaryDirectory(prefix="covid-model-") as tmp:
        local = _download(client, source, name, version, pinned, tracking_uri, tmp)
        for required in (CLASS_INDICES, OPERATING_POINT):
            if not (local / required).is_file():
                raise FileNotFoundError(f"{pinned} (registry {redact_uri(tracking_uri)}) has no "
                                        f"{required}; it was not registered by this pipeline")
        mapping = check_class_indices(read_json(local / CLASS_INDICES))
        op = read_json(local / OPERATING_POINT)
        model = keras.saving.load_model(next(local.rglob("*.keras")))
    img_size = int(model.input_shape[1] or op["img_size"])
    logger.info("loaded %s (version %s, threshold %.4f) from %s", model_uri, version, op["threshold"],
                redact_uri(tracking_uri))
    return LoadedModel(model, mapping, float(op["threshold"]) if threshold is None else float(threshold),
                       img_size, model_uri, version, op.get("run_key"),
                       output=op.get("output", "P(covid), not calibrated"), calibration=op.get("calibration"))


def _download(client: Any, source: str, name: str | None, version: str | None, pinned: str,
              tracking_uri: str, dst: str) -> Path:
    """Download a version's (or a run's) model folder into ``dst``; registry errors made clear."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            # The version's own artifact URI: mlflow 3.17 resolves a models:/ URI against the
            # process-wide registry URI, ignoring the tracking_uri passed to download_artifacts.
            source = client.get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri, dst_path=dst))
    except MlflowException as exc:
        raise _lookup_error(exc, pinned, tracking_uri, "download",
                            f"cannot download {pinned} from {tracking_uri}: {exc}") from exc


def _lookup_error(exc: Any, target: str, uri: str, doing: str, otherwise: str) -> Exception:
    """The error for an MLflow failure to ``doing`` ``target``: not found (naming the registry),
    unreachable (:func:`unavailable`), or a ``RegistryUnavailableError`` saying ``otherwise``."""
    from mlflow.exceptions import MlflowException

    if exc.error_code in _NOT_FOUND:
        message = f"{target} not found in the MLflow registry at {uri}: {exc.message}"
        return MlflowException(redact_uri(message), error_code=exc.error_code)
    return unavailable(exc, uri, f"{doing} {target}") or RegistryUnavailableError(redact_uri(otherwise))


def load_champion(tracking_uri: str | None = None, name: str = MODEL_NAME) -> LoadedModel:
    """Load ``models:/<name>@champion``, the version downstream services should use.

    Args:
        tracking_uri: the registry; ``None`` uses ``MLFLOW_TRACKING_URI`` (or the URI set with
            ``mlflow.set_tracking_uri``), else the project's (``COVID_MLFLOW_TRACKING_URI`` or
            the SQLite store beside the data root). A local store that does not exist is an
            error; it is never created.
        name: the registered model name.

    Raises:
        RegistryUnavailableError: the registry cannot be reached.
        mlflow.exceptions.MlflowException: no store, no such model or no champion yet (the
            message names the tracking URI).
    """
    return load_registered(f"models:/{name}@{CHAMPION_ALIAS}", tracking_uri)


def _resolve(client: Any, model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """``(name, version)`` for ``models:/name@alias`` or ``models:/name/version``."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ValueError(f"expected a models:/ URI, got {model_uri!r}")
    rest = model_uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            raise _lookup_error(exc, model_uri, tracking_uri, "resolve",
                                f"cannot resolve {model_uri} at {tracking_uri}: {exc}") from exc
    parts = rest.split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}")
    return parts[0], parts[1]
