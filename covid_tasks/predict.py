"""Predict: classify chest X-ray image files with a ``.keras`` file or a registered model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from covid_tasks.config import CLASS_NAMES

logger = logging.getLogger(__name__)


def load_model(model: str, tracking_uri: str | None = None, threshold: float | None = None) -> Any:
    """Load ``model``: an MLflow ``models:/...`` URI or a path to a ``.keras`` file."""
    from covid_tasks.registry import load_keras_file, load_registered

    if model.startswith(("models:/", "runs:/")):
        return load_registered(model, tracking_uri, threshold)
    return load_keras_file(model, threshold)


def predict(images: Sequence[str | Path], model: str, tracking_uri: str | None = None,
            threshold: float | None = None) -> dict[str, Any]:
    """Classify each image; covid when P(covid) >= the model's operating threshold.

    Returns:
        ``{"model", "version", "threshold", "predictions": [{"image", "class", "confidence",
        "prob_covid"}]}``; ``confidence`` is the probability of the predicted class.

    Raises:
        FileNotFoundError: an image or the model file is missing.
        ValueError: an image cannot be decoded.
    """
    import numpy as np

    from covid_tasks.data import load_image

    loaded = load_model(model, tracking_uri, threshold)
    batch = np.stack([load_image(p, loaded.img_size) for p in images])
    probs = loaded.model.predict(batch, verbose=0).reshape(-1)
    out = []
    for path, p in zip(images, probs):
        idx = 1 if p >= loaded.threshold else 0
        out.append({"image": str(path), "class": CLASS_NAMES[idx],
                    "confidence": float(p if idx == 1 else 1.0 - p), "prob_covid": float(p)})
    return {"model": loaded.source, "version": loaded.version, "threshold": loaded.threshold,
            "predictions": out}
