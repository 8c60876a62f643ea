"""Train stage: fit the classifier head on a frozen ImageNet backbone (Airflow queue and pool ``gpu``)."""

from __future__ import annotations

import logging
from typing import Any

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot, load_splits
from covid_tasks.storage import write_json

logger = logging.getLogger(__name__)


def train(cfg: Config, run_key: str) -> dict[str, Any]:
    """Build the model with a frozen backbone, fit its head and save ``train.keras``.

    Args:
        cfg: configuration (``data_root``, ``backbone``, ``weights``, ``img_size``, ``head``, ``epochs``,
            ``learning_rate``).
        run_key: this run's key; outputs go to ``<data_root>/runs/<run_key>/``.

    Returns:
        ``{"model_path", "class_indices", "history", "plots", "epochs_run", "final_val_loss",
        "best_val_auc", "trainable_weights", "gpus", "mixed_precision"}``; with the probe head also
        ``probe_c``, ``probe_c_at_edge``, ``probe_inner_auc`` (``_ci95``), ``probe_signal`` and
        the rest of :meth:`covid_tasks.training.ProbeFit.as_dict`, also written to ``probe.json``.

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
        save_model,
        set_seeds,
    )

    root = DataRoot.of(cfg)
    run_dir = root.run(run_key)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    head = "linear probe" if cfg.head == "probe" else f"adam epochs={cfg.epochs} lr={cfg.learning_rate:g}"
    logger.info("train: backbone=%s weights=%s img_size=%d lung_gate=%s multiscale=%s head=%s -> %s",
                cfg.backbone, cfg.weights, cfg.img_size, cfg.lung_gate, cfg.multiscale, head, run_dir.path)
    set_seeds(cfg.seed)
    devices = configure_devices()
    splits = load_splits(root)
    with devices["strategy"].scope():
        model = build_model(cfg)
    extra: dict[str, Any] = {"head": cfg.head}
    run_dir.probe.unlink(missing_ok=True)  # a re-run with another head leaves no stale record
    if cfg.head == "probe":
        history, probe = fit_probe_head(model, splits, root, cfg)
        extra.update(probe.as_dict())
        write_json(run_dir.probe, probe.as_dict())  # evaluate copies it into metrics.json
    else:
        history = fit(model, splits, root, global_batch(cfg, devices), cfg.epochs, "train")
    path = save_model(model, run_dir.train_model)
    return finish("train", run_dir, path, history, {
        **extra,
        "trainable_weights": len(model.trainable_weights),
        "gpus": devices["gpus"],
        "mixed_precision": devices["mixed_precision"],
    })
