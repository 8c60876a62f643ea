"""Training augmentation: one random affine map (rotation, shift, zoom) and a brightness gain per image.

Light and anatomy-preserving. No flips: a chest film is never upside down and the heart's side is
information. ``Config.augment_strength`` scales every range (0 turns augmentation off).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

#: Ranges at strength 1: rotation in degrees, shift as a share of the side, zoom and brightness factors.
ROTATION_DEG = 10.0
SHIFT_FRACTION = 0.05
ZOOM_FRACTION = 0.10
BRIGHTNESS_FRACTION = 0.10


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


