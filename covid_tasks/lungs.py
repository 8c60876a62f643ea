"""Lung segmentation: a small U-Net that finds the lung fields, and the lung gate built from it.

The segmenter maps a 0..255 RGB chest X-ray at ``SEG_SIZE`` px to P(lung) per pixel. It is trained
(:func:`train_segmenter`, ``scripts/train_lung_segmenter.py``) on the V7 Labs lung annotations of
the covid-chestxray-dataset (CC BY 4.0, see ``covid_tasks/assets/README.md``), which cover only
COVID-19 images; lungs look alike across findings, and the training script checks the masks it
predicts on images of both classes.

:func:`lung_gate` wires the segmenter into a classifier with built-in Keras layers only (so a
service loads the registered model with plain Keras): the input is resized to ``SEG_SIZE``, the
mask is dilated (``MaxPooling2D`` with stride 1) and feathered (``AveragePooling2D``), resized
back to the input size, and everything outside it is replaced by mid-grey before the backbone's
own preprocessing, so borders, devices and burnt-in text outside the lung fields do not reach
the classifier.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SEG_SIZE = 128
SEG_FILTERS = (8, 16, 32, 64)
SEGMENTER_LAYER = "lung_segmenter"
#: Dilation (pixels at SEG_SIZE) and feathering of the predicted mask before it gates the image.
DILATE_PX = 5
FEATHER_PX = 7
MID_GREY = 127.5
ASSET = Path(__file__).resolve().parent / "assets" / "lung_segmenter.weights.h5"


def build_segmenter(size: int = SEG_SIZE, filters: tuple[int, ...] = SEG_FILTERS) -> Any:
    """A U-Net (random weights): ``(size, size, 3)`` 0..255 RGB in, ``(size, size, 1)`` P(lung) out.

    Args:
        size: input height and width; a multiple of ``2 ** (len(filters) - 1)``.
        filters: channels per level, the last one being the bottleneck.

    Returns:
        An uncompiled ``keras.Model`` named ``lung_segmenter``.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), name="xray")
    # Per-image standardisation: sources differ widely in exposure and contrast.
    x = layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, name="seg_standardise")(inputs)
    skips = []
    for i, f in enumerate(filters[:-1]):
        x = _double_conv(x, f, f"seg_down{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"seg_pool{i}")(x)
    x = _double_conv(x, filters[-1], "seg_bottom")
    for i, f in reversed(list(enumerate(filters[:-1]))):
        x = layers.UpSampling2D(2, name=f"seg_up{i}")(x)
        x = layers.Concatenate(name=f"seg_cat{i}")([x, skips[i]])
        x = _double_conv(x, f, f"seg_dec{i}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="seg_mask", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=SEGMENTER_LAYER)


def _double_conv(x: Any, filters: int, name: str) -> Any:
    from keras import layers

    for j in range(2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{j}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{j}")(x)
        x = layers.ReLU(name=f"{name}_relu{j}")(x)
    return x


def load_segmenter(path: str | Path | None = None) -> Any:
    """The trained segmenter (frozen), from ``path`` or the weights shipped in the package.

    Raises:
        FileNotFoundError: the weights file is missing.
    """
    weights = Path(path) if path else ASSET
    if not weights.is_file():
        raise FileNotFoundError(f"lung segmenter weights {weights} not found (train them with "
                                "scripts/train_lung_segmenter.py)")
    model = build_segmenter()
    model.load_weights(str(weights))
    model.trainable = False
    return model


def lung_gate(image: Any, segmenter: Any, size: int) -> Any:
    """Replace everything outside the segmenter's (dilated, feathered) lung mask by mid-grey.

    Args:
        image: the model's raw ``(size, size, 3)`` 0..255 input tensor.
        segmenter: a model from :func:`build_segmenter` / :func:`load_segmenter` (frozen).
        size: the classifier's input size.

    Returns:
        ``(image - 127.5) * mask + 127.5``: still 0..255 RGB, for any backbone's preprocessing.
    """
    from keras import layers

    small = layers.Resizing(SEG_SIZE, SEG_SIZE, antialias=True, name="lung_resize_in")(image)
    mask = segmenter(small, training=False)
    mask = layers.MaxPooling2D(2 * DILATE_PX + 1, strides=1, padding="same", name="lung_dilate")(mask)
    mask = layers.AveragePooling2D(FEATHER_PX, strides=1, padding="same", name="lung_feather")(mask)
    mask = layers.Resizing(size, size, name="lung_resize_out")(mask)
    mask = layers.Concatenate(name="lung_mask_rgb")([mask, mask, mask])
    centred = layers.Rescaling(1.0, offset=-MID_GREY, name="lung_centre")(image)
    gated = layers.Multiply(name="lung_gate")([centred, mask])
    return layers.Rescaling(1.0, offset=MID_GREY, name="lung_uncentre")(gated)


def dice(pred: Any, truth: Any, eps: float = 1e-6) -> Any:
    """Per-image Dice coefficient of binary masks ``(n, h, w[, 1])``, as a numpy array."""
    import numpy as np

    p = np.asarray(pred).reshape(len(pred), -1) > 0.5
    t = np.asarray(truth).reshape(len(truth), -1) > 0.5
    inter = (p & t).sum(axis=1)
    return (2 * inter + eps) / (p.sum(axis=1) + t.sum(axis=1) + eps)


def train_segmenter(images: Any, masks: Any, epochs: int = 40, batch_size: int = 16, seed: int = 1234,
                    learning_rate: float = 1e-3) -> Any:
    """Fit a new segmenter on ``images`` (n, SEG_SIZE, SEG_SIZE, 3) 0..255 and 0/1 ``masks`` (n, ., ., 1).

    Augmentation draws one affine warp and brightness gain per image (the pipeline's
    :func:`covid_tasks.augment.augment`, applied to image and mask together) plus a random gamma.
    The loss is binary cross-entropy plus soft Dice; the learning rate follows a cosine decay.

    Returns:
        The trained, frozen segmenter.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from covid_tasks.augment import augment

    keras.utils.set_random_seed(seed)
    model = build_segmenter()
    steps = int(np.ceil(len(images) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(epochs * steps, 1))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=_bce_dice, jit_compile=False)
    joint = np.concatenate([np.asarray(images, "float32"), np.asarray(masks, "float32") * 255.0], axis=-1)
    ds = tf.data.Dataset.from_tensor_slices(joint).shuffle(len(joint), seed=seed).batch(batch_size)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)

    def _augment(batch: Any, s: Any) -> Any:
        warped = augment(batch, s)
        gamma = tf.exp(tf.random.stateless_uniform([tf.shape(batch)[0], 1, 1, 1], s + 1, -0.3, 0.3))
        image = 255.0 * tf.pow(warped[..., :3] / 255.0, gamma)
        return image, tf.cast(warped[..., 3:] > 127.5, tf.float32)

    ds = tf.data.Dataset.zip(ds, seeds).map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    model.fit(ds.prefetch(tf.data.AUTOTUNE), epochs=epochs, verbose=0)
    model.trainable = False
    return model


def _bce_dice(y_true: Any, y_pred: Any) -> Any:
    import keras
    from keras import ops

    bce = keras.losses.binary_crossentropy(y_true, y_pred)
    inter = ops.sum(y_true * y_pred, axis=(1, 2, 3))
    soft_dice = (2 * inter + 1.0) / (ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3)) + 1.0)
    return ops.mean(bce, axis=(1, 2)) + (1.0 - soft_dice)
