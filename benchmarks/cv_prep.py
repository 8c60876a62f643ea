"""Input preparations screened by the quality benchmark (applied to decoded 0..255 RGB batches)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def _grey(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _rgb(grey01: np.ndarray) -> np.ndarray:
    return np.repeat((np.clip(grey01, 0, 1) * 255.0)[..., None], 3, axis=-1).astype("float32")


def none(x: np.ndarray, names: list[str]) -> np.ndarray:
    return x


def standardize(x: np.ndarray, names: list[str]) -> np.ndarray:
    """Per-image zero mean, unit variance, mapped back to 127 +- 64 (what a LayerNormalization does)."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True) + 1e-3
    return ((x - mean) / std * 64.0 + 127.0).astype("float32")


def histeq(x: np.ndarray, names: list[str]) -> np.ndarray:
    from skimage import exposure

    return np.stack([_rgb(exposure.equalize_hist(_grey(img) / 255.0)) for img in x])


def clahe(x: np.ndarray, names: list[str]) -> np.ndarray:
    from skimage import exposure

    return np.stack([_rgb(exposure.equalize_adapthist(_grey(img) / 255.0, clip_limit=0.01)) for img in x])


def _zoom(fraction: float) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """Central crop of ``fraction`` of each side, resized back (a test-time augmentation view)."""

    def zoom(x: np.ndarray, names: list[str]) -> np.ndarray:
        import tensorflow as tf

        lo, hi = (1 - fraction) / 2, (1 + fraction) / 2
        boxes = np.tile(np.array([[lo, lo, hi, hi]], "float32"), (len(x), 1))
        return tf.image.crop_and_resize(x, boxes, np.arange(len(x)), x.shape[1:3]).numpy()

    return zoom


PREPS: dict[str, Callable[[np.ndarray, list[str]], np.ndarray]] = {
    "none": none, "standardize": standardize, "histeq": histeq, "clahe": clahe,
    "zoom90": _zoom(0.90), "zoom95": _zoom(0.95),
}
