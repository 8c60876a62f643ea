"""Input pipeline: ``splits.csv`` rows -> ``tf.data`` batches of raw 0..255 RGB images and labels.

Labels come from the explicit class list ``CLASS_NAMES`` (index 0 ``non_covid``, 1 ``covid``),
never from folder or row order. Decoding handles JPEG and PNG (grey, grey+alpha, RGB, RGBA,
palette, 8 or 16 bits): all become RGB, resized to ``img_size`` and rounded to whole 0..255
values, so training, evaluation and :func:`load_image` see the same pixels. JPEGs decode
exactly as libjpeg's default (and Pillow) does.

One pixel limit (``Config.max_image_pixels``, default :data:`~covid_tasks.config.MAX_IMAGE_PIXELS`,
50 Mpx) applies before any pixel is decoded: width and height are read from the file's header
(:func:`image_size`), and a larger image raises :class:`ImageTooLargeError` (a ``ValueError``)
in :func:`load_image`, or is named and skipped (training) or refused (evaluation) by
:func:`make_dataset`. A file that passes the header check but fails to decode is treated the same
way: named and skipped when training, named in the error otherwise.

Decoded images are cached as uint8 (4x smaller than float32) between epochs: in memory when the
set fits under ``memory_limit`` bytes, else in a file cache under ``<data_root>/cache/`` named by
a hash of the rows, file sizes and times (so a changed split never reads a stale cache). Only the
training set is shuffled and augmented; batches are prefetched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import logging
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import IO, Any, BinaryIO

from covid_tasks.config import CLASS_NAMES, MAX_IMAGE_PIXELS, Config

logger = logging.getLogger(__name__)

#: Above this many decoded bytes (uint8) a data set is cached on disk instead of in memory.
MEMORY_CACHE_LIMIT = 2 * 1024**3
#: Bump when decoding changes, so file caches written by older code are not read.
CACHE_VERSION = 2
#: File caches not used for this long are removed when a new one is made.
CACHE_MAX_AGE_S = 14 * 24 * 3600

# Light, anatomy-preserving augmentation (training only): one random affine map per image
# (rotation, shift, zoom) plus brightness. No flips: a chest film is never upside down and the
# heart's side is information.
ROTATION_DEG = 10.0
SHIFT_FRACTION = 0.05
ZOOM_FRACTION = 0.10
BRIGHTNESS_FRACTION = 0.10

#: The formats the decoder reads (``tf.io.decode_jpeg``, ``decode_png``, ``decode_image``).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")
#: How many unusable files a log line or an error message names (the count is always complete).
MAX_NAMED = 20

_CACHE_LOCKS: dict[Path, IO[str]] = {}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CACHE_NAME = re.compile(r"\d+px-\d+-[0-9a-f]{20}")
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the limit; refused before decoding.

    Attributes:
        path: the file (or a name for in-memory bytes).
        width: width declared in the header.
        height: height declared in the header.
        max_pixels: the limit it exceeds (width x height).
    """

    def __init__(self, path: str, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"{path} is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{max_pixels} pixels; refused before decoding")
        self.path, self.width, self.height, self.max_pixels = path, width, height, max_pixels


def image_size(source: str | Path | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Width and height of a JPEG, PNG, BMP or GIF, read from its header without decoding any pixel.

    Args:
        source: a file path, or the file's bytes.
        max_pixels: refuse more than this many pixels (width x height); ``None`` for no limit.

    Returns:
        ``(width, height)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: width x height exceeds ``max_pixels``.
        ValueError: not one of these formats, or the header is truncated or invalid.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            width, height = _header_size(io.BytesIO(source))
        else:
            with open(source, "rb") as fh:
                width, height = _header_size(fh)
    except (struct.error, EOFError) as exc:
        raise ValueError(f"{name} is not a decodable image: its header is truncated ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{name} is not a decodable image: {exc}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} is not a decodable image: its header declares {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(name, width, height, max_pixels)
    return width, height


def _header_size(fh: BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from the header at the start of ``fh``; ValueError for other formats."""
    def read(n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError("unexpected end of file")
        return data

    head = fh.read(8)
    if not head:
        raise ValueError("the file is empty")
    if head.startswith(_PNG_SIGNATURE):
        length, kind = struct.unpack(">I4s", read(8))
        if kind != b"IHDR" or length < 8:
            raise ValueError("PNG without an IHDR chunk first")
        return struct.unpack(">II", read(8))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:8] + read(2))
    if head[:2] == b"BM":
        fh.seek(14)
        (dib,) = struct.unpack("<I", read(4))
        if dib == 12:  # BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack("<HH", read(4))
        width, height = struct.unpack("<ii", read(8))
        return width, abs(height)  # a negative height means top-down rows
    if head[:2] == b"\xff\xd8":
        fh.seek(2)
        while True:
            byte = read(1)
            while byte != b"\xff":  # libjpeg skips stray bytes between segments
                byte = read(1)
            while byte == b"\xff":  # fill bytes
                byte = read(1)
            marker = byte[0]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue  # standalone markers: no length
            if marker in (0xD9, 0xDA):
                raise ValueError("JPEG without a frame header before its image data")
            (length,) = struct.unpack(">H", read(2))
            if marker in _JPEG_SOF:
                _precision, height, width = struct.unpack(">BHH", read(5))
                return width, height
            if length < 2:
                raise ValueError("JPEG segment with an invalid length")
            fh.seek(length - 2, io.SEEK_CUR)
    raise ValueError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image")


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


def decode_full(contents: Any) -> Any:
    """Decode an image at its own size with the training pipeline's decoder (no resize).

    Args:
        contents: the encoded file's bytes (a string tensor or ``bytes``).

    Returns:
        A float32 ``(height, width, 3)`` RGB tensor in 0..255 (16-bit PNGs scaled, not rounded).

    Raises:
        tensorflow.errors.InvalidArgumentError: the decoder cannot read the bytes.
    """
    import tensorflow as tf

    def png() -> Any:
        return tf.cast(_png(contents), tf.float32) * (255.0 / 65535.0)

    is_png = tf.equal(tf.strings.substr(contents, 0, 8), _PNG_SIGNATURE)
    return tf.cond(tf.io.is_jpeg(contents), lambda: tf.cast(_jpeg(contents), tf.float32),
                   lambda: tf.cond(is_png, png, lambda: tf.cast(_other(contents), tf.float32)))


def decode_native(contents: bytes) -> Any:
    """Decode eagerly with the same TensorFlow ops as training, in the file's own bit depth.

    ``pull`` validates every image with this (what it accepts, training can read); it needs
    less memory than :func:`decode_full` (no float copy).

    Args:
        contents: the encoded file.

    Returns:
        A ``(height, width, 3)`` uint8 tensor (uint16 for PNG).

    Raises:
        tensorflow.errors.InvalidArgumentError: the decoder cannot read the bytes.
    """
    if contents[:3] == b"\xff\xd8\xff":  # what tf.io.is_jpeg tests
        return _jpeg(contents)
    return _png(contents) if contents[:8] == _PNG_SIGNATURE else _other(contents)


def _jpeg(contents: Any) -> Any:
    import tensorflow as tf

    # The accurate integer DCT decodes exactly like libjpeg's default (and Pillow); TensorFlow's
    # default (fast DCT) is off by up to a few levels.
    return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")


def _png(contents: Any) -> Any:
    import tensorflow as tf

    # channels=3 turns grey, grey+alpha, palette and RGBA into RGB; uint16 keeps 16-bit precision.
    return tf.io.decode_png(contents, channels=3, dtype=tf.uint16)


def _other(contents: Any) -> Any:  # BMP, GIF: 8 bits only
    import tensorflow as tf

    return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)


def _decode_uint8(contents: Any, img_size: int) -> Any:
    import tensorflow as tf

    img = tf.image.resize(decode_full(contents), (img_size, img_size), method="bilinear", antialias=True)
    img = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)
    img.set_shape((img_size, img_size, 3))
    return img


def decode_image(contents: Any, img_size: int) -> Any:
    """Decode JPEG/PNG bytes to a float32 ``(img_size, img_size, 3)`` RGB tensor of whole 0..255 values.

    Args:
        contents: the encoded file's bytes (a string tensor).
        img_size: output height and width; the image is resized (bilinear, antialiased).

    Returns:
        The image tensor the model takes.
    """
    import tensorflow as tf

    return tf.cast(_decode_uint8(contents, img_size), tf.float32)


def load_image(path: str | Path, img_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Any:
    """Read and decode one image file as a numpy array, with the training pipeline's code.

    The header is checked against ``max_pixels`` first, so a decompression bomb (a small file
    declaring a huge image) is refused before any memory is allocated for its pixels.

    Args:
        path: a JPEG, PNG, BMP or GIF file.
        img_size: output height and width.
        max_pixels: the most pixels (width x height) accepted; ``None`` for no limit.

    Returns:
        A float32 ``(img_size, img_size, 3)`` array of 0..255 RGB values.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: the image has more than ``max_pixels`` pixels (a ``ValueError``).
        ValueError: the file is not a decodable image.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    image_size(p, max_pixels)
    return load_image_bytes(p.read_bytes(), img_size, max_pixels, name=str(p))


def load_image_bytes(contents: bytes, img_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS,
                     name: str = "<bytes>") -> Any:
    """:func:`load_image` for an image already in memory (an upload, an object store body).

    Args:
        contents: the encoded image.
        img_size: output height and width.
        max_pixels: the most pixels (width x height) accepted; ``None`` for no limit.
        name: how error messages name the image.

    Returns:
        A float32 ``(img_size, img_size, 3)`` array of 0..255 RGB values.

    Raises:
        ImageTooLargeError: the image has more than ``max_pixels`` pixels (a ``ValueError``).
        ValueError: the bytes are not a decodable image.
    """
    import tensorflow as tf

    try:
        image_size(contents, max_pixels)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(name, exc.width, exc.height, exc.max_pixels) from None
    except ValueError as exc:
        raise ValueError(str(exc).replace("<bytes>", name, 1)) from None
    try:
        return decode_image(tf.constant(contents), img_size).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(f"{name} is not a decodable image: {decoder_message(exc)}") from exc


def decoder_message(exc: BaseException) -> str:
    """The first line of a TensorFlow decoding error, without its ``{{function_node ...}}`` prefix."""
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()[0] if str(exc).strip() else ""
    return re.sub(r"^\{\{[^}]*\}\}\s*", "", text) or type(exc).__name__


def augment(images: Any, seed: Any, strength: float = 1.0) -> Any:
    """Randomly rotate, shift, zoom and brighten a batch, one draw per image.

    Rotation, shift and zoom are composed into one affine map per image and resampled once
    (bilinear, edges extended), as ``ImageDataGenerator`` does per image, but vectorised over
    the batch and compiled with XLA into one fused loop (about 3x faster on a CPU than
    TensorFlow's ``ImageProjectiveTransformV3`` kernel, with the same output).

    Args:
        images: ``(batch, h, w, 3)`` uint8 or float32 in 0..255.
        seed: int32/int64 tensor of shape ``(2,)``; the same seed gives the same result.
        strength: scales every range (``ROTATION_DEG``...); 0 returns the batch as float32.

    Returns:
        The augmented batch, float32 in 0..255.
    """
    import tensorflow as tf

    if strength == 0:
        return tf.cast(images, tf.float32)
    shape = tf.shape(images)
    n = shape[0]
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    max_angle = strength * ROTATION_DEG * math.pi / 180.0
    shift_f, zoom_f = strength * SHIFT_FRACTION, strength * ZOOM_FRACTION
    gain_f = strength * BRIGHTNESS_FRACTION
    angle = tf.random.stateless_uniform([n], s[0], -max_angle, max_angle)
    shift = tf.random.stateless_uniform([n, 2], s[1], -shift_f, shift_f) * tf.stack([w, h])
    zoom = tf.random.stateless_uniform([n], s[2], 1.0 - zoom_f, 1.0 + zoom_f)
    gain = tf.random.stateless_uniform([n], s[3], 1.0 - gain_f, 1.0 + gain_f)
    # Output pixel o maps to input pixel A (o - c - t) + c, A = R(-angle) / zoom, c = centre.
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    ox, oy = cx + shift[:, 0], cy + shift[:, 1]
    affine = tf.stack([cos, sin, cx - (cos * ox + sin * oy), -sin, cos, cy - (-sin * ox + cos * oy)], axis=1)
    return _warp_fn()(images, affine, gain)


@functools.cache
def _warp_fn() -> Any:
    """The resampler behind :func:`augment`: :func:`_warp_gather` compiled with XLA.

    Where XLA cannot compile on this machine's CPU (checked once), TensorFlow's
    ``ImageProjectiveTransformV3`` kernel (:func:`_warp_kernel`) does the same, slower.
    """
    import tensorflow as tf

    xla = tf.function(_warp_gather, jit_compile=True, reduce_retracing=True)
    try:
        with tf.init_scope(), tf.device("/CPU:0"):  # eagerly, also when first called while tracing
            identity = tf.constant([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
            xla(tf.zeros((1, 4, 4, 3), tf.uint8), identity, tf.ones((1,))).numpy()
        return xla
    except (tf.errors.OpError, ValueError) as exc:  # pragma: no cover - XLA ships with TensorFlow
        logger.warning("XLA is unavailable for augmentation (%s); using ImageProjectiveTransformV3", exc)
        return tf.function(_warp_kernel, reduce_retracing=True)


def _warp_gather(images: Any, affine: Any, gain: Any) -> Any:
    """Bilinear affine resampling with edges extended, then a brightness gain and 0..255 clip.

    Args:
        images: ``(n, h, w, c)`` uint8 or float32.
        affine: ``(n, 6)`` maps ``[a0, a1, a2, b0, b1, b2]``: output pixel ``(x, y)`` samples
            input ``(a0 x + a1 y + a2, b0 x + b1 y + b2)``.
        gain: ``(n,)`` brightness factors.

    Returns:
        float32 ``(n, h, w, c)``.
    """
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    xs, ys = tf.reshape(xs, [1, -1]), tf.reshape(ys, [1, -1])
    sx = tf.clip_by_value(affine[:, 0:1] * xs + affine[:, 1:2] * ys + affine[:, 2:3], 0.0,
                          tf.cast(w - 1, tf.float32))
    sy = tf.clip_by_value(affine[:, 3:4] * xs + affine[:, 4:5] * ys + affine[:, 5:6], 0.0,
                          tf.cast(h - 1, tf.float32))
    x0, y0 = tf.floor(sx), tf.floor(sy)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0i, y0i = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1i, y1i = tf.minimum(x0i + 1, w - 1), tf.minimum(y0i + 1, h - 1)
    flat = tf.reshape(images, [-1, images.shape[-1]])
    base = (tf.range(n) * h * w)[:, None]

    def pixels(yi: Any, xi: Any) -> Any:
        return tf.cast(tf.gather(flat, base + yi * w + xi), tf.float32)

    top = pixels(y0i, x0i) * (1.0 - wx) + pixels(y0i, x1i) * wx
    bottom = pixels(y1i, x0i) * (1.0 - wx) + pixels(y1i, x1i) * wx
    out = (top * (1.0 - wy) + bottom * wy) * gain[:, None, None]
    return tf.reshape(tf.clip_by_value(out, 0.0, 255.0), shape)


def _warp_kernel(images: Any, affine: Any, gain: Any) -> Any:
    """:func:`_warp_gather` with TensorFlow's ``ImageProjectiveTransformV3`` kernel."""
    import tensorflow as tf

    transforms = tf.concat([affine, tf.zeros_like(affine[:, :2])], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")
    return tf.clip_by_value(out * gain[:, None, None, None], 0.0, 255.0)


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
    ds = ds.map(lambda i, p, y: (i, _decode_uint8(tf.io.read_file(p), img_size), y),
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
    import tensorflow as tf

    try:
        decode_full(tf.io.read_file(path))
    except (tf.errors.OpError, ValueError) as exc:
        return decoder_message(exc)
    return "failed inside the input pipeline"  # pragma: no cover - a transient read error


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
