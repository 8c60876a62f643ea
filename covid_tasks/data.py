"""Input pipeline: ``splits.csv`` rows -> ``tf.data`` batches of raw 0..255 RGB images and labels.

Labels come from the explicit class list ``CLASS_NAMES`` (index 0 ``non_covid``, 1 ``covid``),
never from folder or row order. Decoding handles JPEG and PNG (grey, RGB, RGBA, 16-bit): all
become 3-channel float32 in 0..255, resized to ``img_size``. Decoded images are cached (memory
or disk, by size), only the training set is shuffled and augmented, and batches are prefetched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from covid_tasks.config import CLASS_NAMES, Config

logger = logging.getLogger(__name__)

#: Above this many decoded bytes the cache goes to disk instead of memory.
MEMORY_CACHE_LIMIT = 2 * 1024**3


def label_index(labels: Any) -> Any:
    """Map class names to indices with the one explicit class list; unknown names raise."""
    import numpy as np

    lookup = {name: i for i, name in enumerate(CLASS_NAMES)}
    try:
        return np.asarray([lookup[str(lab)] for lab in labels], dtype="float32")
    except KeyError as exc:
        raise ValueError(f"unknown label {exc.args[0]!r}; expected one of {CLASS_NAMES}") from exc


def decode_image(contents: Any, img_size: int) -> Any:
    """Decode JPEG/PNG bytes to a float32 ``(img_size, img_size, 3)`` tensor in 0..255."""
    import tensorflow as tf

    img = tf.io.decode_image(contents, channels=0, dtype=tf.uint16, expand_animations=False)
    img = tf.cast(img, tf.float32) * (255.0 / 65535.0)
    channels = tf.shape(img)[-1]
    img = tf.cond(channels >= 3, lambda: img[..., :3], lambda: tf.image.grayscale_to_rgb(img[..., :1]))
    img = tf.image.resize(img, (img_size, img_size), method="bilinear", antialias=True)
    img = tf.clip_by_value(img, 0.0, 255.0)
    img.set_shape((img_size, img_size, 3))
    return img


def load_image(path: str | Path, img_size: int) -> Any:
    """Read and decode one image file as a numpy array; the same code path as training."""
    import tensorflow as tf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    try:
        return decode_image(tf.io.read_file(str(p)), img_size).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(f"{p} is not a decodable JPEG or PNG image: {exc.message.splitlines()[0]}") from exc


def augmenter(seed: int) -> Any:
    """Light, anatomy-preserving augmentation: small rotations, shifts, zoom, brightness.

    No vertical flips (a chest film is never upside down) and no horizontal flips either
    (the heart's side is information).
    """
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
            keras.layers.RandomBrightness(0.1, value_range=(0.0, 255.0), seed=seed + 3),
        ],
        name="augment",
    )


def make_dataset(frame: Any, images_dir: str | Path, cfg: Config, training: bool,
                 cache_dir: str | Path | None = None) -> Any:
    """Build a batched, prefetched ``tf.data.Dataset`` of ``(image, label)`` from split rows.

    Args:
        frame: rows with ``filename`` and ``label`` columns (one split of ``splits.csv``).
        images_dir: folder the file names are relative to (``raw/images``).
        cfg: configuration (``img_size``, ``batch_size``, ``seed``).
        training: shuffle and augment when true; keep row order otherwise.
        cache_dir: where a disk cache goes when the decoded set is too big for memory.

    Returns:
        The dataset; labels are float32 0.0 (non_covid) or 1.0 (covid).
    """
    import tensorflow as tf

    images_dir = Path(images_dir)
    paths = [str(images_dir / f) for f in frame["filename"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the split are missing, e.g. {missing[:3]}")
    labels = label_index(frame["label"])
    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (decode_image(tf.io.read_file(p), cfg.img_size), y), num_parallel_calls=autotune)
    decoded_bytes = len(paths) * cfg.img_size * cfg.img_size * 3 * 4
    if decoded_bytes <= MEMORY_CACHE_LIMIT or cache_dir is None:
        ds = ds.cache()
    else:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(Path(cache_dir) / ("train" if training else "eval")))
    if training:
        ds = ds.shuffle(max(len(paths), 1), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if training:
        aug = augmenter(cfg.seed)
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def class_weights(labels: Any) -> dict[int, float]:
    """Balanced class weights ``n / (2 * n_c)`` keyed by class index; absent classes get 1.0."""
    import numpy as np

    y = np.asarray(labels).astype(int)
    n = len(y)
    return {i: (float(n / (len(CLASS_NAMES) * np.sum(y == i))) if np.sum(y == i) else 1.0)
            for i in range(len(CLASS_NAMES))}
