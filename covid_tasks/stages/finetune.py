"""Finetune stage: unfreeze the backbone (BatchNorm kept frozen) and train at a low learning rate."""

from __future__ import annotations

import logging
from typing import Any

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot, load_splits

logger = logging.getLogger(__name__)

#: The checkpoint keeps the epoch with the best validation AUC: threshold-free and robust to
#: the class imbalance, unlike validation accuracy.
MONITOR = "val_auc"


def finetune(cfg: Config, run_key: str) -> dict[str, Any]:
    """Load ``train.keras``, unfreeze all backbone layers, fit with checkpoint and early stopping.

    Args:
        cfg: configuration (``data_root``, ``finetune_epochs``, ``finetune_learning_rate``,
            ``finetune_schedule``, ``finetune_top_blocks``, ``early_stopping_patience``).
        run_key: this run's key; reads and writes ``<data_root>/runs/<run_key>/``.

    Returns:
        ``{"model_path", "class_indices", "history", "plots", "epochs_run", "final_val_loss",
        "best_val_auc", "monitor", "trainable_weights"}``; ``model_path`` is ``finetune.keras``,
        holding the best epoch's weights.

    Raises:
        FileNotFoundError: ``train.keras`` is missing (run ``train`` first).
    """
    import keras

    from covid_tasks.model import unfreeze, with_dtype_policy
    from covid_tasks.storage import require_file
    from covid_tasks.training import (
        configure_devices,
        finetune_schedule,
        finish,
        fit,
        global_batch,
        save_model,
        set_seeds,
    )

    root = DataRoot.of(cfg)
    run_dir = root.run(run_key)
    trained = require_file(run_dir.train_model, "train")
    logger.info("finetune: %s epochs=%d lr=%g monitor=%s", trained, cfg.finetune_epochs,
                cfg.finetune_learning_rate, MONITOR)
    set_seeds(cfg.seed)
    devices = configure_devices()
    splits = load_splits(root)
    with devices["strategy"].scope():
        # train.keras is saved in float32; on a GPU, fine-tune under the mixed precision policy.
        policy = keras.mixed_precision.global_policy().name
        model = with_dtype_policy(keras.saving.load_model(trained), policy)
        schedule = finetune_schedule(global_batch(cfg, devices), len(splits["train"]))
        n_trainable = unfreeze(model, schedule, cfg.finetune_top_blocks)
    checkpoint = run_dir.finetune_checkpoint
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=MONITOR, mode="max",
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience,
                                      restore_best_weights=True),
    ]
    history: dict[str, list[float]] = {}
    if cfg.finetune_epochs > 0:  # 0: the trained head as it is (e.g. the linear probe)
        history = fit(model, splits, root, global_batch(cfg, devices), cfg.finetune_epochs, "finetune",
                      callbacks)
    if checkpoint.is_file():
        model.load_weights(checkpoint)  # the best epoch, also when early stopping never fired
        checkpoint.unlink()  # finetune.keras below holds the same weights
    path = save_model(model, run_dir.finetune_model)
    return finish("finetune", run_dir, path, history, {"monitor": MONITOR, "trainable_weights": n_trainable})
