"""Train stage: fit the classifier head on a frozen ImageNet backbone (Airflow queue and pool ``gpu``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from covid_tasks.config import Config

logger = logging.getLogger(__name__)


def train(data_root: str | Path, cfg: Config, run_key: str) -> dict[str, Any]:
    """Build the model with a frozen backbone, fit its head and save ``train.keras``.

    Args:
        data_root: the data root holding ``splits.csv`` and ``raw/images``.
        cfg: configuration (``backbone``, ``weights``, ``img_size``, ``head``, ``epochs``,
            ``learning_rate``).
        run_key: this run's key; outputs go to ``<data_root>/runs/<run_key>/``.

    Returns:
        ``{"model_path", "class_indices", "history", "plots", "epochs_run", "final_val_loss",
        "best_val_auc", "trainable_weights", "gpus", "mixed_precision"}``.

    Raises:
        FileNotFoundError: ``splits.csv`` or an image is missing.
        covid_tasks.model.WeightsUnavailableError: ImageNet weights cannot be had.
    """
    from covid_tasks.model import build_model
    from covid_tasks.training import (
        configure_devices,
        finish,
        fit,
        fit_probe_head,
        global_batch,
        load_splits,
        save_model,
        set_seeds,
    )

    run_dir = cfg.run_dir(run_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    head = "linear probe" if cfg.head == "probe" else f"adam epochs={cfg.epochs} lr={cfg.learning_rate:g}"
    logger.info("train: backbone=%s weights=%s img_size=%d lung_gate=%s multiscale=%s head=%s -> %s",
                cfg.backbone, cfg.weights, cfg.img_size, cfg.lung_gate, cfg.multiscale, head, run_dir)
    set_seeds(cfg.seed)
    devices = configure_devices()
    splits = load_splits(data_root)
    with devices["strategy"].scope():
        model = build_model(cfg)
    extra: dict[str, Any] = {"head": cfg.head}
    if cfg.head == "probe":
        history, extra["probe_c"] = fit_probe_head(model, splits, data_root, cfg)
    else:
        history = fit(model, splits, data_root, global_batch(cfg, devices), cfg.epochs, "train")
    path = save_model(model, run_dir / "train.keras")
    return finish("train", run_dir, path, history, {
        **extra,
        "trainable_weights": len(model.trainable_weights),
        "gpus": devices["gpus"],
        "mixed_precision": devices["mixed_precision"],
    })
