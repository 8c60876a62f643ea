"""Full recipes under cross-validation: the pipeline's own ``train`` and ``finetune`` stages per fold.

For each repeat and fold, a fold data root gets a ``splits.csv`` whose ``train`` and ``val`` rows
come from the fold's training part (``val``: a patient-grouped, label-stratified fifth of it, for
early stopping, the checkpoint and the threshold) and whose ``test`` rows are the held-out fold.
``raw/`` is a symbolic link to the shared pulled data. The stages run exactly as in the DAG; the
fold's model then scores its held-out images as they are and occluded
(``covid_tasks.occlusion``), and the threshold is chosen on the fold's own validation part.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_tasks.layout import DataRoot

logger = logging.getLogger("quality_cv")

#: Options in a configuration name (``ft-lite0-224-none-<option>...``) and the Config fields they set.
#: ``lung`` also points ``lung_segmenter`` at the fold's own segmenter (``cv_lungs``).
OPTIONS: dict[str, dict[str, Any]] = {
    "lung": {"lung_gate": True},
    "ms": {"multiscale": True},
    "probe": {"head": "probe"},
    "cos": {"finetune_schedule": "cosine"},
    **{f"top{n}": {"finetune_top_blocks": n} for n in (2, 4, 6, 8)},
    **{f"lr{k}": {"finetune_learning_rate": float(f"1e-{k}")} for k in (3, 4, 5)},
    "ft0": {"finetune_epochs": 0},
    **{f"aug{k}": {"augment_strength": float(k)} for k in (0, 2)},
}

#: The recipe a name without options means (the pipeline before the quality work), pinned here so
#: that a saved configuration reruns the same way whatever Config's defaults become.
BASE: dict[str, Any] = {"lung_gate": False, "multiscale": False, "head": "adam", "finetune_top_blocks": 0,
                        "finetune_schedule": "constant", "learning_rate": 1e-2,
                        "finetune_learning_rate": 1e-5, "augment_strength": 1.0}


def inner_split(train: pd.DataFrame, seed: int) -> pd.Series:
    """``train`` / ``val`` for each row of a fold's training part (val: one grouped, stratified fifth)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = (train["label"] == "covid").to_numpy().astype(int)
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
    _, val_idx = next(cv.split(np.zeros(len(train)), y, train["split_group"]))
    out = pd.Series("train", index=train.index)
    out.iloc[val_idx] = "val"
    return out


def fold_config(spec: dict[str, Any], root: Path, args: argparse.Namespace, segmenter: str = "") -> Any:
    from covid_tasks.config import Config

    fields: dict[str, Any] = {"data_root": str(root), "backbone": spec["backbone"], "weights": "bundled",
                              "img_size": spec["size"], "batch_size": args.batch_size,
                              "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                              "early_stopping_patience": args.patience, **BASE}
    for option in spec["options"]:
        if option not in OPTIONS:
            raise ValueError(f"unknown fine-tuning option {option!r}; known: {sorted(OPTIONS)}")
        fields.update(OPTIONS[option])
    if fields.get("lung_gate"):
        fields["lung_segmenter"] = segmenter
    if args.learning_rate:
        fields["learning_rate"] = args.learning_rate
    if args.finetune_learning_rate and not any(o.startswith("lr") for o in spec["options"]):
        fields["finetune_learning_rate"] = args.finetune_learning_rate
    return Config(**fields)


def _score(model: Any, frame: pd.DataFrame, images: Path, size: int, views: tuple[str, ...]
           ) -> dict[str, np.ndarray]:
    """P(covid) of ``frame``'s images in each occlusion view (images decoded once)."""
    from covid_tasks.images import load_image
    from covid_tasks.occlusion import occlude

    batch = np.stack([load_image(images / f, size) for f in frame["filename"]])
    return {view: model.predict(occlude(batch, view), batch_size=16, verbose=0).reshape(-1) for view in views}


def run_fold(spec: dict[str, Any], labeled: pd.DataFrame, folds: pd.DataFrame, repeat: int, fold: int,
             work: Path, args: argparse.Namespace) -> pd.DataFrame:
    """Train, fine-tune and score one fold; returns its held-out rows with P(covid) per view."""
    import keras

    from covid_tasks.operating_point import highest_threshold_reaching
    from covid_tasks.stages.finetune import finetune
    from covid_tasks.stages.train import train

    part = folds[folds["repeat"] == repeat]
    root = work / "ft" / spec["name"] / f"r{repeat}f{fold}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "raw").symlink_to(work / "data" / "raw")
    rows = labeled.merge(part[["filename", "split_group", "fold"]], on="filename")
    train_part = rows[rows["fold"] != fold]
    rows["split"] = "test"
    rows.loc[train_part.index, "split"] = inner_split(train_part, 1000 * repeat + fold)
    rows.drop(columns=["fold"]).to_csv(root / "splits.csv", index=False)
    segmenter = ""
    if "lung" in spec["options"]:
        import cv_lungs

        cv_lungs.fold_segmenter(work, folds, repeat, fold)  # trained once per fold, then cached
        segmenter = str(work / "segmenters" / f"r{repeat}f{fold}.weights.h5")
    cfg = fold_config(spec, root, args, segmenter)
    from cv_probe import saved_probe_search

    with saved_probe_search():  # the probe head searches the grid alone, as for the saved results
        train(cfg, "cv")
    finetune(cfg, "cv")
    model = keras.saving.load_model(DataRoot.of(cfg).run("cv").finetune_model)
    images = root / "raw" / "images"
    val, test = rows[rows["split"] == "val"], rows[rows["split"] == "test"]
    threshold = highest_threshold_reaching((val["label"] == "covid").to_numpy().astype(int),
                                           _score(model, val, images, cfg.img_size, ("full",))["full"],
                                           args.target_sensitivity)
    out = test[["filename", "patientid", "label"]].assign(fold=fold, repeat=repeat)
    scores = _score(model, test, images, cfg.img_size, ("full", "lungs_hidden", "outside_hidden"))
    for view, prob in scores.items():
        out["prob_covid" if view == "full" else f"prob_covid_{view}"] = prob
    out["threshold"] = threshold
    shutil.rmtree(root, ignore_errors=True)  # the models are large; the predictions are what count
    keras.backend.clear_session()
    return out


def run_finetune(spec: dict[str, Any], labeled: pd.DataFrame, folds: pd.DataFrame, work: Path,
                 args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every fold of every repeat; returns the out-of-fold predictions and throughput figures."""
    spec = {**spec, "name": "-".join(["ft", spec["backbone"].split("_")[-1], str(spec["size"]), spec["prep"],
                                      *spec["options"]])}
    if spec["prep"] != "none":
        raise ValueError("fine-tuning configurations take prep 'none'; preprocessing belongs in the model")
    parts, start = [], time.perf_counter()
    n_trained = 0
    for (repeat, fold), _ in folds.groupby(["repeat", "fold"]):
        t0 = time.perf_counter()
        parts.append(run_fold(spec, labeled, folds, int(repeat), int(fold), work, args))
        n_trained += int((folds["repeat"] == repeat).sum() - len(parts[-1]))
        logger.info("%s repeat %d fold %d done in %.0fs", spec["name"], repeat, fold,
                    time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    epochs = args.epochs + args.finetune_epochs
    return pd.concat(parts, ignore_index=True), {
        "images_per_s": n_trained * epochs / seconds, "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs, "batch_size": args.batch_size}
