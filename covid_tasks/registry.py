"""Downstream lookup: resolve the registered champion and load it with its class mapping.

Other services can copy this pattern: resolve ``models:/covid-xray-classifier@champion``,
download the version's artifacts, load ``data/model.keras`` with plain Keras, and read
``class_indices.json`` and ``operating_point.json`` beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_tasks.config import CHAMPION_ALIAS, CLASS_NAMES, MODEL_NAME
from covid_tasks.storage import read_json

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to predict, with the facts needed to read its output."""

    model: Any
    class_indices: dict[str, int]
    threshold: float
    img_size: int
    source: str
    version: str | None = None


def check_class_indices(mapping: dict[str, int]) -> dict[str, int]:
    """Refuse any mapping other than ``non_covid`` -> 0, ``covid`` -> 1."""
    expected = {name: i for i, name in enumerate(CLASS_NAMES)}
    if {k: int(v) for k, v in mapping.items()} != expected:
        raise ValueError(f"class_indices {mapping} differ from the required {expected}")
    return expected


def load_keras_file(path: str | Path, threshold: float | None = None) -> LoadedModel:
    """Load a ``.keras`` file; class mapping and threshold come from files beside it."""
    import keras

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    mapping_file = p.parent / "class_indices.json"
    mapping = check_class_indices(read_json(mapping_file)) if mapping_file.is_file() else \
        {n: i for i, n in enumerate(CLASS_NAMES)}
    if threshold is None:
        metrics = p.parent / "metrics.json"
        threshold = float(read_json(metrics)["threshold"]) if metrics.is_file() else 0.5
    model = keras.saving.load_model(p)
    return LoadedModel(model, mapping, threshold, int(model.input_shape[1]), str(p))


def load_registered(model_uri: str, tracking_uri: str | None = None, threshold: float | None = None
                    ) -> LoadedModel:
    """Resolve an MLflow ``models:/`` URI and load the model with its mapping and threshold.

    Raises:
        mlflow.exceptions.MlflowException: the registry is unreachable or the alias is unknown.
        ValueError: the model's ``class_indices.json`` differs from the required order.
    """
    import keras
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    version = _resolve_version(MlflowClient(), model_uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    mapping = check_class_indices(read_json(local / "class_indices.json"))
    op = read_json(local / "operating_point.json")
    model_file = next(local.rglob("*.keras"))
    model = keras.saving.load_model(model_file)
    logger.info("loaded %s (version %s) from %s", model_uri, version, local)
    return LoadedModel(model, mapping, float(op["threshold"]) if threshold is None else threshold,
                       int(model.input_shape[1]), model_uri, version)


def load_champion(tracking_uri: str | None = None, name: str = MODEL_NAME) -> LoadedModel:
    """Load ``models:/<name>@champion``, the version downstream services should use."""
    return load_registered(f"models:/{name}@{CHAMPION_ALIAS}", tracking_uri)


def _resolve_version(client: Any, model_uri: str) -> str | None:
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    parts = rest.split("/")
    return parts[1] if len(parts) > 1 else None
