"""Downstream lookup: resolve a registered model (normally ``@champion``) and load it with its mapping.

A registered version's artifacts are one folder (the MLflow ``keras`` flavour plus two files)::

    MLmodel                 flavour, signature (float32 images N x S x S x 3) and input example
    data/model.keras        the Keras 3 model: raw 0..255 RGB in, P(covid) out
    class_indices.json      {"non_covid": 0, "covid": 1}
    operating_point.json    {"threshold": t, "img_size": S, "positive_class": "covid", ...}

The alias is resolved to a version number *first*, and that exact version is downloaded, so the
version a caller reports is the one it loaded even if the alias moves in between. Other services
can copy the pattern with plain ``mlflow`` and ``keras`` (see the README's "Using the model").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, MODEL_NAME, sqlite_path
from covid_tasks.storage import read_json

logger = logging.getLogger(__name__)


class RegistryUnavailableError(RuntimeError):
    """The MLflow registry could not be reached or refused a read (not "the model is absent")."""


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
    """

    model: Any
    class_indices: dict[str, int]
    threshold: float
    img_size: int
    source: str
    version: str | None = None
    run_key: str | None = None


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

    A SQLite registry file that does not exist yet means "no model" (it is not created here).

    Args:
        name: registered model name.
        alias: alias such as ``champion``.
        tracking_uri: MLflow tracking (and registry) URI.

    Returns:
        The ``mlflow.entities.model_registry.ModelVersion`` or ``None``.

    Raises:
        RegistryUnavailableError: the registry cannot be reached or refuses the request.
    """
    db_file = sqlite_path(tracking_uri)
    if db_file is not None and not db_file.is_file():
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        version = alias_version_number(client, name, alias)
        return None if version is None else client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryUnavailableError(
            f"cannot read {name}@{alias} from the MLflow registry at {tracking_uri}: {exc}") from exc


def load_keras_file(path: str | Path, threshold: float | None = None) -> LoadedModel:
    """Load a ``.keras`` file; mapping and threshold come from files beside it.

    ``class_indices.json`` is read when present (else the fixed class order). The threshold is
    ``threshold`` when given, else the ``threshold`` of ``operating_point.json`` or
    ``metrics.json`` beside the file; without either, loading fails rather than assume 0.5.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``class_indices.json`` differs from the required order, or no threshold was
            given and none is recorded beside the file.
    """
    import keras

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    mapping_file = p.parent / "class_indices.json"
    mapping = check_class_indices(read_json(mapping_file)) if mapping_file.is_file() else \
        {n: i for i, n in enumerate(CLASS_NAMES)}
    if threshold is None:
        recorded = [f for f in (p.parent / "operating_point.json", p.parent / "metrics.json") if f.is_file()]
        if not recorded:
            raise ValueError(f"{p} has no operating point beside it (operating_point.json or metrics.json "
                             f"with its threshold): pass the threshold explicitly (predict --threshold) "
                             f"rather than assume 0.5")
        threshold = float(read_json(recorded[0])["threshold"])
    model = keras.saving.load_model(p)
    return LoadedModel(model, mapping, float(threshold), int(model.input_shape[1]), str(p))


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
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if model_uri.startswith("runs:/"):
        version, pinned, source = None, model_uri, model_uri  # an unregistered run's model
    else:
        name, version = _resolve(client, model_uri)
        pinned = f"models:/{name}/{version}"
    try:
        if version is not None:
            # The version's own artifact URI: mlflow 3.17 resolves a models:/ URI against the
            # process-wide registry URI, ignoring the tracking_uri passed to download_artifacts.
            source = client.get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryUnavailableError(f"cannot download {pinned}: {exc}") from exc
    for required in ("class_indices.json", "operating_point.json"):
        if not (local / required).is_file():
            raise FileNotFoundError(f"{pinned} has no {required}; it was not registered by this pipeline")
    mapping = check_class_indices(read_json(local / "class_indices.json"))
    op = read_json(local / "operating_point.json")
    model = keras.saving.load_model(next(local.rglob("*.keras")))
    img_size = int(model.input_shape[1] or op["img_size"])
    logger.info("loaded %s (version %s, threshold %.4f) from %s", model_uri, version, op["threshold"], local)
    return LoadedModel(model, mapping, float(op["threshold"]) if threshold is None else float(threshold),
                       img_size, model_uri, version, op.get("run_key"))


def load_champion(tracking_uri: str | None = None, name: str = MODEL_NAME) -> LoadedModel:
    """Load ``models:/<name>@champion``, the version downstream services should use.

    Raises:
        RegistryUnavailableError: the registry cannot be reached.
        mlflow.exceptions.MlflowException: no such model or no champion yet.
    """
    return load_registered(f"models:/{name}@{CHAMPION_ALIAS}", tracking_uri)


def _resolve(client: Any, model_uri: str) -> tuple[str, str]:
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
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise RegistryUnavailableError(f"cannot resolve {model_uri}: {exc}") from exc
    parts = rest.split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}")
    return parts[0], parts[1]
