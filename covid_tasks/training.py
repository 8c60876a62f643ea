"""What ``train`` and ``finetune`` share: seeding, device set-up, fitting, saving and plots."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from covid_tasks.config import Config, class_indices
from covid_tasks.storage import atomic_path, require_file, write_json

logger = logging.getLogger(__name__)

PLOT_METRICS = ("accuracy", "loss", "precision", "recall", "auc")


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and the Keras/TensorFlow generators in one place."""
    import keras
    import numpy as np

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def configure_devices() -> dict[str, Any]:
    """GPU set-up: memory growth, mixed precision when a GPU is visible, a mirrored strategy for >1.

    Returns:
        ``{"gpus": n, "mixed_precision": bool, "strategy": tf.distribute.Strategy}``.
    """
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # pragma: no cover - already initialised
            pass
    if gpus:  # pragma: no cover - no GPU on CI
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        keras.mixed_precision.set_global_policy("float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return {"gpus": len(gpus), "mixed_precision": bool(gpus), "strategy": strategy}


def load_splits(data_root: str | Path) -> dict[str, Any]:
    import pandas as pd

    frame = pd.read_csv(require_file(Path(data_root) / "splits.csv", "split"), dtype=str, keep_default_na=False)
    return {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}


class EpochLogger:
    """Keras callback: one log line per epoch with its metrics and images per second."""

    def __new__(cls, n_images: int, phase: str) -> Any:
        import keras

        class _EpochLogger(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                dt = time.perf_counter() - self._t0
                metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
                logger.info("%s epoch %d: %s images/s=%.1f (%.1fs)", phase, epoch + 1, metrics,
                            n_images / dt if dt > 0 else 0.0, dt)

        return _EpochLogger()


def fit(model: Any, splits: dict[str, Any], data_root: str | Path, cfg: Config, epochs: int,
        phase: str, callbacks: list[Any] | None = None) -> dict[str, list[float]]:
    """Fit ``model`` on the train split with class weights, validating on the val split."""
    from covid_tasks.data import class_weights, label_index, make_dataset

    images = Path(data_root) / "raw" / "images"
    cache = Path(data_root) / "cache" / f"{cfg.img_size}"
    train_ds = make_dataset(splits["train"], images, cfg, training=True, cache_dir=cache)
    val_ds = make_dataset(splits["val"], images, cfg, training=False, cache_dir=cache)
    weights = class_weights(label_index(splits["train"]["label"]))
    logger.info("%s: %d epochs, %d train / %d val images, class weights %s", phase, epochs,
                len(splits["train"]), len(splits["val"]), weights)
    cbs = [EpochLogger(len(splits["train"]), phase), *(callbacks or [])]
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=weights,
                        callbacks=cbs, verbose=0)
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def save_model(model: Any, path: str | Path) -> str:
    """Save a ``.keras`` file atomically with ``class_indices.json`` beside it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        keras_tmp = tmp.with_suffix(".keras")
        model.save(keras_tmp)
        os.replace(keras_tmp, tmp)
    write_json(path.parent / "class_indices.json", class_indices())
    return str(path)


def plot_history(history: dict[str, list[float]], out_dir: str | Path, phase: str) -> list[str]:
    """One PNG per metric (train and validation curves per epoch); returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for metric in PLOT_METRICS:
        if metric not in history:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        epochs = range(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        ax.set(title=f"{phase}: {metric}", xlabel="epoch", ylabel=metric)
        ax.legend()
        fig.tight_layout()
        target = Path(out_dir) / f"{phase}_{metric}.png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        out.append(str(target))
    return out


def finish(phase: str, run_dir: Path, model_path: str, history: dict[str, list[float]],
           extra: dict[str, Any]) -> dict[str, Any]:
    """Write the phase's history and plots and build its small result dict."""
    write_json(run_dir / f"{phase}_history.json", history)
    plots = plot_history(history, run_dir, phase)
    best_val_auc = max(history.get("val_auc", [float("nan")]))
    result = {
        "model_path": model_path,
        "class_indices": str(run_dir / "class_indices.json"),
        "history": str(run_dir / f"{phase}_history.json"),
        "plots": plots,
        "epochs_run": len(history.get("loss", [])),
        "final_val_loss": history.get("val_loss", [None])[-1],
        "best_val_auc": best_val_auc,
        **extra,
    }
    logger.info("%s: done %s", phase, json.dumps(result))
    return result
