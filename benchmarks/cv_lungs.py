"""Lung-focused inputs under cross-validation, with one lung segmenter trained per fold.

The segmenter learns from lung masks, which exist for COVID-19 images only, many of them in the
labelled set. So that nothing learnt has seen a held-out image, each fold trains its own
segmenter (:func:`covid_tasks.lungs.train_segmenter`) on the masks of the AP Supine images (never
in the labelled set) and of the labelled images in the fold's training part; the held-out
images are segmented by a model that never saw them, as new images would be.

Preparations:

* ``lungmask``: the image outside the (dilated, feathered) lung mask becomes mid-grey, exactly
  what :func:`covid_tasks.lungs.lung_gate` does inside a model;
* ``lungcrop``: the image is cropped to the mask's bounding box (plus a margin) and resized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("quality_cv")

MASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-chestxray-lung-masks"
SEG_EPOCHS = 30
CROP_MARGIN = 0.05


def _mask(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
    return (np.asarray(img, dtype="float32") / 255.0 > 0.5).astype("float32")[..., None]


def mask_table(images_dir: Path) -> pd.DataFrame:
    """X-ray PA / AP / AP Supine masks whose image was pulled: ``filename``, ``view``, ``mask``."""
    table = pd.read_csv(MASKS / "masks.csv", dtype=str, keep_default_na=False)
    table = table[(table["modality"] == "X-ray") & table["view"].isin(["PA", "AP", "AP Supine"])]
    return table[table["filename"].map(lambda f: (images_dir / f).is_file())].reset_index(drop=True)


def fold_segmenter(work: Path, folds: pd.DataFrame, repeat: int, fold: int) -> Any:
    """The fold's segmenter, trained once and cached under ``work/segmenters/``."""
    from covid_tasks.images import load_image
    from covid_tasks.lungs import SEG_SIZE, load_segmenter, train_segmenter

    path = work / "segmenters" / f"r{repeat}f{fold}.weights.h5"
    if path.is_file():
        return load_segmenter(path)
    images_dir = work / "data" / "raw" / "images"
    table = mask_table(images_dir)
    part = folds[folds["repeat"] == repeat]
    held_out = set(part.loc[part["fold"] == fold, "filename"])
    labelled = set(part["filename"])
    use = table[(table["view"] == "AP Supine") & ~table["filename"].isin(labelled)
                | table["filename"].isin(labelled - held_out)]
    x = np.stack([load_image(images_dir / f, SEG_SIZE) for f in use["filename"]])
    y = np.stack([_mask(MASKS / m, SEG_SIZE) for m in use["mask"]])
    logger.info("segmenter r%df%d: training on %d masks (%d AP Supine)", repeat, fold, len(use),
                int((use["view"] == "AP Supine").sum()))
    model = train_segmenter(x, y, epochs=SEG_EPOCHS, seed=1234 + 100 * repeat + fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(path))
    return model


def gate(images: np.ndarray, segmenter: Any) -> np.ndarray:
    """The in-model lung gate applied to 0..255 images: outside the lungs becomes mid-grey."""
    import keras

    from covid_tasks.lungs import lung_gate

    size = images.shape[1]
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, lung_gate(inputs, segmenter, size))
    return model.predict(images, batch_size=16, verbose=0)


def crop(images: np.ndarray, segmenter: Any) -> np.ndarray:
    """Crop each image to its predicted lungs' bounding box (plus ``CROP_MARGIN``) and resize back."""
    import tensorflow as tf

    from covid_tasks.lungs import SEG_SIZE

    size = images.shape[1]
    small = tf.image.resize(images, (SEG_SIZE, SEG_SIZE), antialias=True).numpy()
    masks = segmenter.predict(small, batch_size=32, verbose=0)[..., 0] > 0.5
    boxes = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if len(rows) < 4 or len(cols) < 4:  # no lungs found: keep the whole image
            boxes.append([0.0, 0.0, 1.0, 1.0])
            continue
        top, bottom = rows[0] / SEG_SIZE - CROP_MARGIN, (rows[-1] + 1) / SEG_SIZE + CROP_MARGIN
        left, right = cols[0] / SEG_SIZE - CROP_MARGIN, (cols[-1] + 1) / SEG_SIZE + CROP_MARGIN
        boxes.append([max(top, 0.0), max(left, 0.0), min(bottom, 1.0), min(right, 1.0)])
    out = tf.image.crop_and_resize(images, np.asarray(boxes, "float32"), np.arange(len(images)), (size, size))
    return out.numpy()


def held_out_dice(work: Path, folds: pd.DataFrame) -> dict[str, Any]:
    """Dice of each fold's segmenter on the held-out fold's masked images (none of which it saw)."""
    from covid_tasks.images import load_image
    from covid_tasks.lungs import SEG_SIZE, dice, load_segmenter

    images_dir = work / "data" / "raw" / "images"
    table = mask_table(images_dir).set_index("filename")
    scores: dict[str, Any] = {}
    for (repeat, fold), part in folds.groupby(["repeat", "fold"]):
        names = [f for f in part["filename"] if f in table.index]
        x = np.stack([load_image(images_dir / f, SEG_SIZE) for f in names])
        y = np.stack([_mask(MASKS / table.loc[f, "mask"], SEG_SIZE) for f in names])
        model = load_segmenter(work / "segmenters" / f"r{repeat}f{fold}.weights.h5")
        d = dice(model.predict(x, verbose=0), y)
        scores[f"r{repeat}f{fold}"] = {"n": len(names), "mean": float(d.mean()),
                                       "p5": float(np.percentile(d, 5))}
    all_means = [s["mean"] for s in scores.values()]
    return {"folds": scores, "mean_of_folds": float(np.mean(all_means)), "min_fold": float(np.min(all_means))}
