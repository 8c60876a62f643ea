"""Input pipeline: split rows -> ``tf.data`` batches of raw 0..255 RGB images and labels.

Labels come from the explicit class list ``CLASS_NAMES`` (index 0 ``non_covid``, 1 ``covid``),
never from folder or row order. Images are decoded with :mod:`covid_tasks.images` (the one
decoder; DICOM films too, recognised by content), after every file's header has been checked
against ``cfg.max_image_pixels``; a file that fails the check or fails to decode is named and
skipped (training) or refused (evaluation).

Decoded images are cached as uint8 (4x smaller than float32) between epochs: in memory when the
set fits under ``memory_limit`` bytes, else in a file cache under ``<data_root>/cache/`` named by
a hash of the rows, file sizes and times (so a changed split never reads a stale cache). Only the
training set is shuffled and augmented (:mod:`covid_tasks.augment`); batches are prefetched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO, Any

from covid_tasks.augment import augment
from covid_tasks.config import CLASS_NAMES, Config
from covid_tasks.images import decode_failure, decode_uint8, image_size

logger = logging.getLogger(__name__)

#: Above this many decoded bytes (uint8) a data set is cached on disk instead of in memory.
MEMORY_CACHE_LIMIT = 2 * 1024**3
#: Bump when decoding changes, so file caches written by older code are not read (3: DICOM).
CACHE_VERSION = 3
#: File caches not used for this long are removed when a new one is made.
CACHE_MAX_AGE_S = 14 * 24 * 3600
#: How many unusable files a log line or an error message names (the count is always complete).
MAX_NAMED = 20
_CACHE_LOCKS: dict[Path, IO[str]] = {}
_CACHE_NAME = re.compile(r"\d+px-\d+-[0-9a-f]{20}")


def label_index(labels: Any) -> Any:
    """Map class names to indices with the one explicit class list.

    Args:
        labels: class names (``non_covid`` or ``covid``), any iterable.

    Returns:
        A float32 numpy array of 0.0 (non_covid) and 1.0 (covid), in input order.

    Raises:
        ValueError: a label is not in ``CLASS_NAMES``.
    """
    import numpy as np

    lookup = {name: i for i, name in enumerate(CLASS_NAMES)}
    try:
        return np.asarray([lookup[str(lab)] for lab in labels], dtype="float32")
    except KeyError as exc:
        raise ValueError(f"unknown label {exc.args[0]!r}; expected one of {CLASS_NAMES}") from exc


def make_dataset(frame: Any, images_dir: str | Path, cfg: Config, training: bool,
                 cache_dir: str | Path | None = None, memory_limit: int = MEMORY_CACHE_LIMIT,
                 skip_unusable: bool | None = None) -> Any:
    """Build a batched, prefetched ``tf.data.Dataset`` of ``(image, label)`` from split rows.

    Every file's header is checked first (a known format, at most ``cfg.max_image_pixels``
    pixels); a file that fails this, or fails to decode later, is *unusable*. With
    ``skip_unusable`` each one is logged by name and left out; without, the dataset fails with
    an error naming it, so no single file can stop a run without saying which file it was.

    Args:
        frame: rows with ``filename`` and ``label`` columns (one split of ``splits.csv``).
        images_dir: folder the file names are relative to (``raw/images``).
        cfg: configuration (``img_size``, ``batch_size``, ``seed``, ``max_image_pixels``,
            ``augment_strength``).
        training: shuffle and augment when true; keep row order otherwise.
        cache_dir: where a file cache goes when the decoded set exceeds ``memory_limit``;
            without it such a set is decoded again every epoch.
        memory_limit: the most decoded bytes (uint8) cached in memory.
        skip_unusable: leave unusable images out (logged) rather than fail; default ``training``.
            Evaluation keeps it off: its predictions must stay aligned with ``frame``'s rows.

    Returns:
        The dataset: float32 images ``(batch, img_size, img_size, 3)`` in 0..255 and float32
        labels, 0.0 (non_covid) or 1.0 (covid).

    Raises:
        FileNotFoundError: a listed image is missing.
        ValueError: a label is not in ``CLASS_NAMES``; an image is unusable (its header) and
            ``skip_unusable`` is off; or every image is unusable.
    """
    import tensorflow as tf

    skip = training if skip_unusable is None else skip_unusable
    images_dir = Path(images_dir)
    paths = [str(images_dir / f) for f in frame["filename"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the split are missing, "
                                f"e.g. {missing[:3]}")
    labels = label_index(frame["label"])
    paths, labels = _usable(paths, labels, cfg.max_image_pixels, skip)
    autotune = tf.data.AUTOTUNE
    image_bytes = cfg.img_size * cfg.img_size * 3
    ds = _decoded(paths, labels, cfg.img_size, skip)
    shuffle_buffer = len(paths)
    if len(paths) * image_bytes <= memory_limit:
        ds = ds.cache()
    else:
        prefix = None
        if cache_dir is not None:
            prefix = _disk_cache_prefix(Path(cache_dir), _cache_key(paths, labels, cfg.img_size))
        if prefix:
            ds = ds.cache(prefix)
        else:
            logger.info("%d images (%.1f GB decoded) exceed the memory cache limit and no file cache is "
                        "available: decoding every epoch", len(paths), len(paths) * image_bytes / 1e9)
        shuffle_buffer = min(len(paths), max(memory_limit // image_bytes, 1))
    if training:
        ds = ds.shuffle(max(shuffle_buffer, 1), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if training:
        seeds = tf.data.Dataset.random(seed=cfg.seed, rerandomize_each_iteration=True).batch(2)
        strength = cfg.augment_strength
        ds = tf.data.Dataset.zip(ds, seeds).map(lambda batch, s: (augment(batch[0], s, strength), batch[1]),
                                                 num_parallel_calls=autotune)
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def _usable(paths: list[str], labels: Any, max_pixels: int, skip: bool) -> tuple[list[str], Any]:
    """Check every file's header (format, pixel limit) without decoding; drop or refuse the bad ones."""
    bad: dict[str, str] = {}
    for path in paths:
        try:
            image_size(path, max_pixels)
        except (ValueError, OSError) as exc:
            bad[path] = str(exc)
    if not bad:
        return paths, labels
    named = "; ".join(bad[p] for p in list(bad)[:MAX_NAMED]) + (" ..." if len(bad) > MAX_NAMED else "")
    if not skip:
        raise ValueError(f"{len(bad)} of {len(paths)} image(s) cannot be used: {named}")
    keep = [i for i, p in enumerate(paths) if p not in bad]
    if not keep:
        raise ValueError(f"none of the {len(paths)} image(s) can be used: {named}")
    logger.warning("skipping %d of %d image(s) that cannot be used: %s", len(bad), len(paths), named)
    return [paths[i] for i in keep], labels[keep]


def _decoded(paths: list[str], labels: Any, img_size: int, skip: bool) -> Any:
    """``(uint8 image, label)`` per file, in order; a file that fails to decode is named.

    Decoding errors are caught by ``ignore_errors``; each element carries its row index, and a
    ``scan`` that expects consecutive indices spots the rows that went missing (a sentinel at the
    end catches trailing ones). For those rows a Python callback decodes the file again to get
    the decoder's message, then logs it (``skip``) or raises naming the file. The callback runs
    only when a row went missing, so a healthy data set pays one integer comparison per image.
    With ``skip`` the dataset's length is unknown until its first pass ends (Keras then warns
    once that the input "ran out of data"); without, it is asserted to be ``len(paths)``.
    """
    import tensorflow as tf

    n = len(paths)

    def report(expected: Any, got: Any) -> bool:
        lost = {p: _decode_error(p) for p in paths[int(expected):int(got)]}
        named = "; ".join(f"{p}: {why}" for p, why in lost.items())
        if not skip:
            raise ValueError(f"image(s) that cannot be decoded: {named}")
        logger.warning("skipping %d image(s) that cannot be decoded: %s", len(lost), named)
        return True

    def check(expected: Any, element: Any) -> Any:
        index = element[0]
        seen = tf.cond(tf.equal(index, expected), lambda: tf.constant(True),
                       lambda: tf.py_function(report, [expected, index], tf.bool))
        with tf.control_dependencies([seen]):
            return index + 1, element

    ds = tf.data.Dataset.from_tensor_slices((tf.range(n, dtype=tf.int64), paths, labels))
    ds = ds.map(lambda i, p, y: (i, decode_uint8(tf.io.read_file(p), img_size), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    end = tf.data.Dataset.from_tensors((tf.constant(n, tf.int64), tf.zeros((img_size, img_size, 3), tf.uint8),
                                        tf.constant(0.0, tf.float32)))
    def real(index: Any, img: Any, y: Any) -> Any:
        return index < n

    def without_index(index: Any, img: Any, y: Any) -> Any:
        return img, y

    ds = ds.concatenate(end).scan(tf.constant(0, tf.int64), check).filter(real).map(without_index)
    # Without skipping, every row comes out or the dataset fails: Keras may know the batch count.
    return ds if skip else ds.apply(tf.data.experimental.assert_cardinality(n))


def _decode_error(path: str) -> str:
    """Why ``path`` does not decode, as the decoder says it (eagerly, outside ``tf.data``)."""
    try:
        why = decode_failure(Path(path).read_bytes())
    except OSError as exc:  # pragma: no cover - a transient read error
        return str(exc)
    return why or "failed inside the input pipeline"  # pragma: no cover - a transient read error


def _cache_key(paths: list[str], labels: Any, img_size: int) -> str:
    """A name for the file cache of exactly these files (path, size, mtime), labels and size."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{img_size}".encode())
    for path, label in zip(paths, labels, strict=True):
        st = os.stat(path)
        digest.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}|{int(label)}".encode())
    return f"{img_size}px-{len(paths)}-{digest.hexdigest()[:20]}"


def _disk_cache_prefix(cache_dir: Path, key: str) -> str | None:
    """The file-cache prefix for ``key``, or None when another live process is writing it.

    A complete cache (TensorFlow's ``<prefix>.index``, no lockfile) is reused. Otherwise this
    process takes an ``flock`` on ``writer.lock`` (the OS drops it when a process dies), deletes
    what a killed run left (TensorFlow's lockfile and temporary shards, which would make the next
    run fail) and lets the first epoch write the cache.
    """
    folder = cache_dir / key
    prefix = folder / "images"
    tf_lock = Path(f"{prefix}_0.lockfile")
    if Path(f"{prefix}.index").is_file() and not tf_lock.exists():
        os.utime(folder)
        return str(prefix)
    folder.mkdir(parents=True, exist_ok=True)
    if folder in _CACHE_LOCKS:
        if tf_lock.exists():  # an iterator of this process is writing it now
            return None
    else:
        handle = open(folder / "writer.lock", "a")  # noqa: SIM115 - held until the process exits
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            logger.warning("file cache %s is being written by another process; not caching", folder)
            return None
        _CACHE_LOCKS[folder] = handle
        _prune_caches(cache_dir, keep=folder)
    for stale in folder.glob("images*"):
        logger.info("removing incomplete cache file %s", stale)
        stale.unlink()
    return str(prefix)


def _prune_caches(cache_dir: Path, keep: Path) -> None:
    """Delete file caches unused for ``CACHE_MAX_AGE_S`` that no live process holds."""
    for folder in cache_dir.iterdir():
        if folder == keep or not _CACHE_NAME.fullmatch(folder.name) or not folder.is_dir():
            continue
        if time.time() - folder.stat().st_mtime < CACHE_MAX_AGE_S:
            continue
        with contextlib.suppress(OSError), open(folder / "writer.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            logger.info("removing old file cache %s", folder)
            shutil.rmtree(folder)


def class_weights(labels: Any) -> dict[int, float]:
    """Balanced class weights ``n / (2 * n_c)`` keyed by class index; absent classes get 1.0.

    Args:
        labels: class indices (0 or 1), e.g. from :func:`label_index`.

    Returns:
        ``{0: w_non_covid, 1: w_covid}``.
    """
    import numpy as np

    y = np.asarray(labels).astype(int)
    n = len(y)
    return {i: (float(n / (len(CLASS_NAMES) * np.sum(y == i))) if np.sum(y == i) else 1.0)
            for i in range(len(CLASS_NAMES))}


def predict_split(model: Any, frame: Any, images_dir: Path, cfg: Config) -> Any:
    """P(covid) for every row of ``frame``, in row order, at ``cfg.img_size``."""
    ds = make_dataset(frame, images_dir, cfg, training=False)
    return model.predict(ds, verbose=0).reshape(-1)
