"""Predict: classify chest X-ray image files with a registered model (default ``@champion``) or a file.

``models:/covid-xray-classifier@champion`` is resolved to a version number first and that exact
version is loaded; the result names it, so the CLI can print which model answered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.config import POSITIVE_INDEX, redact_uri

logger = logging.getLogger(__name__)


def load_model(model: str, tracking_uri: str | None = None, threshold: float | None = None) -> Any:
    """Load ``model``: an MLflow ``models:/...`` / ``runs:/...`` URI or a path to a ``.keras`` file.

    Raises:
        RuntimeError: the registry cannot be reached, or has no such model, version or alias.
        FileNotFoundError: the file, or a registered version's mapping files, are missing.
        ValueError: the class mapping differs from ``non_covid`` -> 0, ``covid`` -> 1.
    """
    from mlflow.exceptions import MlflowException

    from covid_tasks.registry import load_keras_file, load_registered

    if model.startswith(("models:/", "runs:/")):
        try:
            return load_registered(model, tracking_uri, threshold)
        except MlflowException as exc:
            raise RuntimeError(redact_uri(f"cannot load {model} from {tracking_uri}: {exc.message}")) from exc
    return load_keras_file(model, threshold)


def predict(images: Sequence[str | Path], model: str, tracking_uri: str | None = None,
            threshold: float | None = None) -> dict[str, Any]:
    """Classify each image; covid when P(covid) >= the model's operating threshold.

    Args:
        images: JPEG, PNG or DICOM files (DICOM recognised by content; also BMP, GIF).
        model: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/...`` or a
            ``.keras`` file.
        tracking_uri: MLflow tracking URI for registered models.
        threshold: override the model's recorded operating threshold.

    Returns:
        ``{"model", "version", "threshold", "img_size", "calibration", "output", "predictions":
        [{"image", "class", "confidence", "prob_covid"}]}``; ``version`` is the registered version
        used (``None`` for a file), ``confidence`` the model's probability of the predicted class,
        ``calibration`` the model's calibration record (``None`` when its output is uncalibrated)
        and ``output`` what the probabilities mean (e.g. "calibrated P(covid): platt scaling
        fitted on the validation split").

    Raises:
        FileNotFoundError: an image or the model file is missing.
        ValueError: an image cannot be decoded, or no image was given.
        RuntimeError: the registered model cannot be resolved or loaded.
    """
    import numpy as np

    from covid_tasks.images import load_image

    if not images:
        raise ValueError("no image to classify")
    loaded = load_model(model, tracking_uri, threshold)
    logger.info("predict: %s version %s threshold %.4f img_size %d", loaded.source, loaded.version,
                loaded.threshold, loaded.img_size)
    names = sorted(loaded.class_indices, key=loaded.class_indices.get)
    batch = np.stack([load_image(p, loaded.img_size) for p in images])
    probs = loaded.model.predict(batch, verbose=0).reshape(-1)
    out = []
    for path, p in zip(images, probs, strict=True):
        idx = POSITIVE_INDEX if p >= loaded.threshold else 1 - POSITIVE_INDEX
        out.append({"image": str(path), "class": names[idx],
                    "confidence": float(p if idx == POSITIVE_INDEX else 1.0 - p), "prob_covid": float(p)})
    return {"model": loaded.source, "version": loaded.version, "threshold": loaded.threshold,
            "img_size": loaded.img_size, "calibration": _calibration(loaded), "output": loaded.output,
            "predictions": out}


def _calibration(loaded: Any) -> dict[str, Any] | None:
    """The loaded model's calibration record, ``None`` when its output is not calibrated."""
    calibration = getattr(loaded, "calibration", None)
    return calibration if calibration and calibration.get("method", "none") != "none" else None
