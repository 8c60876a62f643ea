"""What ``train`` and ``finetune`` share: seeding, device set-up, fitting, the probe head, saving."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from covid_tasks.config import Config, class_indices
from covid_tasks.layout import CLASS_INDICES, DataRoot, RunDir
from covid_tasks.plots import plot_history
from covid_tasks.storage import atomic_path, write_json

logger = logging.getLogger(__name__)

def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and the Keras/TensorFlow generators in one place.

    Args:
        seed: the run's seed (``cfg.seed``).
    """
    import keras
    import numpy as np

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def configure_devices() -> dict[str, Any]:
    """Set up the visible accelerators for a training stage.

    No GPU: float32 and the default strategy. One GPU or more: memory growth (TensorFlow does not
    take the whole card up front) and the ``mixed_float16`` policy (the model's output layer stays
    float32). More than one: a ``MirroredStrategy`` over all of them; callers multiply the batch
    size by ``replicas`` so each GPU gets ``cfg.batch_size`` images.

    Returns:
        ``{"gpus": n, "replicas": n_in_sync, "mixed_precision": bool, "strategy": strategy}``.
    """
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # pragma: no cover - no GPU on CI
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier call in this process
            pass
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    devices = {"gpus": len(gpus), "replicas": int(strategy.num_replicas_in_sync),
               "mixed_precision": bool(gpus), "strategy": strategy}
    logger.info("devices: %d GPU(s), %d replica(s), mixed precision %s, %s", len(gpus),
                devices["replicas"], devices["mixed_precision"], type(strategy).__name__)
    return devices


def global_batch(cfg: Config, devices: dict[str, Any]) -> Config:
    """``cfg`` with ``batch_size`` scaled to the global batch (per-replica batch x replicas)."""
    return cfg.replace(batch_size=cfg.batch_size * max(int(devices["replicas"]), 1))


def epoch_logger(n_images: int, phase: str) -> Any:
    """A Keras callback logging one line per epoch: its metrics and training images per second.

    Args:
        n_images: training images per epoch.
        phase: ``train`` or ``finetune``, the line's prefix.

    Returns:
        The callback. Images per second count the training part of the epoch only (up to the
        start of validation).
    """
    import keras

    class _EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = time.perf_counter()
            self._t_train: float | None = None

        def on_test_begin(self, logs: Any = None) -> None:
            if getattr(self, "_t_train", 0.0) is None:
                self._t_train = time.perf_counter() - self._t0

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            total = time.perf_counter() - self._t0
            train_s = self._t_train if self._t_train is not None else total
            metrics = " ".join(f"{k}={float(v):.4f}" for k, v in sorted((logs or {}).items()))
            logger.info("%s epoch %d: %s images/s=%.1f (%.1fs, %.1fs training)", phase, epoch + 1, metrics,
                        n_images / train_s if train_s > 0 else 0.0, total, train_s)

    return _EpochLogger()


def fit(model: Any, splits: dict[str, Any], root: DataRoot, cfg: Config, epochs: int,
        phase: str, callbacks: list[Any] | None = None) -> dict[str, list[float]]:
    """Fit ``model`` on the train split with balanced class weights, validating on the val split.

    Args:
        model: a compiled model.
        splits: ``{"train", "val", ...}`` frames from :func:`covid_tasks.layout.load_splits`.
        root: the data root (images under ``raw/images``, file caches under ``cache/``).
        cfg: configuration; ``batch_size`` is the global batch (already scaled by the GPU count).
        epochs: epochs to run.
        phase: ``train`` or ``finetune``, for the log lines.
        callbacks: extra Keras callbacks.

    Returns:
        Keras' history: ``loss``, ``accuracy``, ``precision``, ``recall``, ``auc`` and their
        ``val_`` versions, one float per epoch.
    """
    from covid_tasks.dataset import class_weights, label_index, make_dataset

    train_ds = make_dataset(splits["train"], root.images, cfg, training=True, cache_dir=root.cache)
    val_ds = make_dataset(splits["val"], root.images, cfg, training=False, cache_dir=root.cache)
    weights = class_weights(label_index(splits["train"]["label"]))
    logger.info("%s: %d epochs, %d train / %d val images, class weights %s", phase, epochs,
                len(splits["train"]), len(splits["val"]), weights)
    cbs = [epoch_logger(len(splits["train"]), phase), *(callbacks or [])]
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=weights,
                        callbacks=cbs, shuffle=False, verbose=0)  # the dataset shuffles itself
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


#: Inverse L2 strengths tried by the linear-probe head (``cfg.head == "probe"``).
PROBE_C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: C when a class has fewer than two patient groups in the train split (no inner CV possible).
PROBE_DEFAULT_C = 0.01


def fit_probe_head(model: Any, splits: dict[str, Any], root: DataRoot, cfg: Config
                   ) -> tuple[dict[str, list[float]], float]:
    """Set the ``prob_covid`` layer to an L2 logistic regression on the frozen pooled features.

    The features of the train split (no augmentation) are standardised and fitted with
    scikit-learn's class-balanced ``LogisticRegression``; its strength C is the one with the best
    ROC AUC in a 3-fold cross-validation on the train split grouped by patient (``split_group``;
    fewer folds when a class has fewer patient groups, ``PROBE_DEFAULT_C`` with fewer than two). The
    standardisation is folded into the layer's kernel and bias, so the
    model stays plain Keras.

    Returns:
        A one-epoch history (``loss``, ``auc`` on train; ``val_loss``, ``val_auc`` on val) and C.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    from covid_tasks.dataset import label_index, make_dataset
    from covid_tasks.model import feature_model, head_layer

    feats = feature_model(model)
    x = {s: feats.predict(make_dataset(splits[s], root.images, cfg, training=False), verbose=0)
         for s in ("train", "val")}
    y = {s: label_index(splits[s]["label"]).astype(int) for s in ("train", "val")}
    mu, sigma = x["train"].mean(axis=0), x["train"].std(axis=0) + 1e-6
    z = {s: (x[s] - mu) / sigma for s in x}
    groups = splits["train"].get("split_group", splits["train"]["patientid"]).to_numpy()
    if len(set(y["train"].tolist())) < 2:
        raise ValueError("the train split holds one class only: cannot fit the linear-probe head")
    n_inner = min(3, *(len(set(groups[y["train"] == k])) for k in (0, 1)))

    def clf(c: float) -> Any:
        return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)

    scores = {}
    if n_inner >= 2:
        folds = list(StratifiedGroupKFold(n_inner, shuffle=True, random_state=cfg.seed)
                     .split(z["train"], y["train"], groups))
        for c in PROBE_C_GRID:
            oof = np.zeros(len(y["train"]))
            for tr, te in folds:
                oof[te] = clf(c).fit(z["train"][tr], y["train"][tr]).predict_proba(z["train"][te])[:, 1]
            scores[c] = roc_auc_score(y["train"], oof)
    best = max(PROBE_C_GRID, key=lambda c: (scores[c], -c)) if scores else PROBE_DEFAULT_C
    fitted = clf(best).fit(z["train"], y["train"])
    w = fitted.coef_[0] / sigma
    head_layer(model).set_weights([w[:, None].astype("float32"),
                                   np.array([fitted.intercept_[0] - float(w @ mu)], dtype="float32")])
    logger.info("train: linear-probe head, C=%g (inner CV AUC %s)", best,
                {c: round(v, 3) for c, v in scores.items()})
    history = {}
    for split, prefix in (("train", ""), ("val", "val_")):
        p = fitted.predict_proba(z[split])[:, 1]
        history[f"{prefix}loss"] = [float(log_loss(y[split], p, labels=[0, 1]))]
        both = len(set(y[split])) == 2
        history[f"{prefix}auc"] = [float(roc_auc_score(y[split], p)) if both else float("nan")]
    return history, float(best)


def finetune_schedule(cfg: Config, n_train: int) -> Any:
    """The fine-tuning learning rate: constant, or one warm-up epoch then cosine decay (``cosine``)."""
    import math

    import keras

    if cfg.finetune_schedule == "constant":
        return cfg.finetune_learning_rate
    steps = max(math.ceil(n_train / cfg.batch_size), 1)
    warmup = steps
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(steps * cfg.finetune_epochs - warmup, 1),
        warmup_target=cfg.finetune_learning_rate, warmup_steps=warmup)


def save_model(model: Any, path: str | Path) -> str:
    """Save a float32 ``.keras`` file atomically with ``class_indices.json`` beside it.

    A model trained under mixed precision is saved with float32 layers (same weights), so a
    service on a CPU computes in float32.

    Args:
        model: the model to save.
        path: the ``.keras`` file to write.

    Returns:
        ``path`` as a string.
    """
    import keras

    from covid_tasks.model import compile_model, with_dtype_policy

    path = Path(path)
    float32 = with_dtype_policy(model, "float32")
    if float32 is not model:
        compile_model(float32, float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        model = float32
    with atomic_path(path) as tmp:
        keras_tmp = tmp.with_suffix(".keras")
        model.save(keras_tmp)
        os.replace(keras_tmp, tmp)
    write_json(path.parent / CLASS_INDICES, class_indices())
    return str(path)


def finish(phase: str, run_dir: RunDir, model_path: str, history: dict[str, list[float]],
           extra: dict[str, Any]) -> dict[str, Any]:
    """Write the phase's history and plots and build its small result dict.

    Args:
        phase: ``train`` or ``finetune``.
        run_dir: the run folder.
        model_path: the saved ``.keras`` file.
        history: Keras' history, written as ``<phase>_history.json`` (``register`` logs it to MLflow).
        extra: stage-specific keys added to the result.

    Returns:
        The JSON-able result dict the stage returns (and XCom stores).
    """
    write_json(run_dir.history(phase), history)
    plots = plot_history(history, run_dir, phase)
    best_val_auc = max(history.get("val_auc", [float("nan")]))
    result = {
        "model_path": model_path,
        "class_indices": str(run_dir.class_indices),
        "history": str(run_dir.history(phase)),
        "plots": plots,
        "epochs_run": len(history.get("loss", [])),
        "final_val_loss": history.get("val_loss", [None])[-1],
        "best_val_auc": best_val_auc,
        **extra,
    }
    logger.info("%s: done %s", phase, json.dumps(result))
    return result
