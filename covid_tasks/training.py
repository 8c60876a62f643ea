"""What ``train`` and ``finetune`` share: seeding, device set-up, fitting, the probe head, saving."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
#: Tried in turn, below the grid, while the best C is the smallest tried, its inner AUC is above
#: 0.5 and still rising towards it (:func:`search_probe_c`). On the full June 2020 set the default
#: recipe's inner CV AUC is best at C=0.001 (0.547, rising from 0.543 at 0.003): the grid's edge; one
#: step down (0.543 at 3e-4) shows it is interior. Below chance there is no optimum to chase (the
#: sample data's inner AUC is 0.13 at 0.001), so the edge is reported instead.
PROBE_C_EXTENSION = (3e-4, 1e-4, 3e-5, 1e-5)
#: C when a class has fewer than two patient groups in the train split (no inner CV possible).
PROBE_DEFAULT_C = 0.01
PROBE_SIGNAL_RULE = ("the probe carries signal when the lower end of the 95% stratified bootstrap interval "
                     "of its inner cross-validated ROC AUC (at the chosen C) is above 0.5")


@dataclass(frozen=True)
class ProbeFit:
    """How the linear-probe head was fitted, and whether it carries signal before fine-tuning.

    Attributes:
        c: the chosen inverse L2 strength.
        c_at_edge: ``"lower"`` or ``"upper"`` when C is the grid's smallest or largest value and
            its inner AUC is above its neighbour's (still rising: the best C may lie beyond the
            grid); ``None`` when interior, on a flat end (a tie), or without inner CV.
        inner_auc: the inner cross-validated ROC AUC at ``c`` (``None`` without inner CV).
        inner_auc_ci95: its 95% stratified bootstrap interval.
        inner_auc_by_c: the inner AUC of every C tried (the grid, and the extension below it when tried).
        signal: :data:`PROBE_SIGNAL_RULE` (``None`` without inner CV).
    """

    c: float
    c_at_edge: str | None
    inner_auc: float | None
    inner_auc_ci95: list[float] | None
    inner_auc_by_c: dict[str, float]
    signal: bool | None

    def as_dict(self) -> dict[str, Any]:
        """The fit as JSON-able ``probe_*`` entries (train's result and ``probe.json``)."""
        return {"probe_c": self.c, "probe_c_at_edge": self.c_at_edge, "probe_inner_auc": self.inner_auc,
                "probe_inner_auc_ci95": self.inner_auc_ci95, "probe_signal": self.signal,
                "probe_inner_auc_by_c": self.inner_auc_by_c,
                "probe_signal_rule": PROBE_SIGNAL_RULE}


def choose_probe_c(scores: dict[float, float], y: Any, oof: dict[float, Any], seed: int) -> ProbeFit:
    """The C with the best inner AUC (the smaller on a tie), whether it sits on the grid's edge, and
    whether that AUC shows signal (:data:`PROBE_SIGNAL_RULE`).

    Args:
        scores: inner cross-validated ROC AUC per C tried (:func:`search_probe_c`; empty: no inner CV).
        y: the train split's class indices.
        oof: the inner out-of-fold P(covid) per C.
        seed: bootstrap seed.

    Returns:
        The :class:`ProbeFit`.
    """
    from covid_tasks.metrics import bootstrap_auc_intervals

    if not scores:
        return ProbeFit(PROBE_DEFAULT_C, None, None, None, {}, None)
    best = max(scores, key=lambda c: (scores[c], -c))
    grid = sorted(scores)
    edge = None  # on an end of the grid and still rising towards it: the best C may lie beyond
    if len(grid) > 1 and best == grid[0] and scores[grid[0]] > scores[grid[1]]:
        edge = "lower"
    elif len(grid) > 1 and best == grid[-1] and scores[grid[-1]] > scores[grid[-2]]:
        edge = "upper"
    ci = bootstrap_auc_intervals(y, oof[best], seed=seed)["roc_auc_ci95"]
    return ProbeFit(float(best), edge, float(scores[best]), [float(v) for v in ci],
                    {f"{c:g}": round(float(v), 4) for c, v in scores.items()}, bool(ci[0] > 0.5))


def search_probe_c(score: Callable[[float], tuple[float, Any]]
                   ) -> tuple[dict[float, float], dict[float, Any]]:
    """Score :data:`PROBE_C_GRID`, then extend it downwards (:data:`PROBE_C_EXTENSION`) while the best
    C is the smallest tried, its inner AUC is above 0.5 and above the next larger C's.

    Args:
        score: C -> (inner cross-validated ROC AUC, inner out-of-fold P(covid)).

    Returns:
        ``(auc per C, out-of-fold scores per C)`` of every C tried.
    """
    scores: dict[float, float] = {}
    oofs: dict[float, Any] = {}
    for c in PROBE_C_GRID:
        scores[c], oofs[c] = score(c)
    for c in PROBE_C_EXTENSION:
        tried = sorted(scores)
        best = max(tried, key=lambda k: (scores[k], -k))
        if best != tried[0] or scores[best] <= 0.5 or scores[best] <= scores[tried[1]]:
            break
        scores[c], oofs[c] = score(c)
    return scores, oofs


def fit_probe_head(model: Any, splits: dict[str, Any], root: DataRoot, cfg: Config
                   ) -> tuple[dict[str, list[float]], ProbeFit]:
    """Set the ``prob_covid`` layer to an L2 logistic regression on the frozen pooled features.

    The features of the train split (no augmentation) are standardised and fitted with
    scikit-learn's class-balanced ``LogisticRegression``; its strength C is the one with the best
    ROC AUC in a 3-fold cross-validation on the train split grouped by patient (``split_group``;
    fewer folds when a class has fewer patient groups, ``PROBE_DEFAULT_C`` with fewer than two),
    searched by :func:`search_probe_c` (the grid, extended downwards while the best C is on its
    lower edge and above chance). The standardisation is folded into the layer's
    kernel and bias, so the model stays plain Keras. A C on the grid's edge, and a head whose inner
    AUC does not show signal (:data:`PROBE_SIGNAL_RULE`), are logged as warnings.

    Returns:
        A one-epoch history (``loss``, ``auc`` on train; ``val_loss``, ``val_auc`` on val) and the
        :class:`ProbeFit`.
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

    scores: dict[float, float] = {}
    oofs: dict[float, Any] = {}
    if n_inner >= 2:
        folds = list(StratifiedGroupKFold(n_inner, shuffle=True, random_state=cfg.seed)
                     .split(z["train"], y["train"], groups))

        def inner(c: float) -> tuple[float, Any]:
            oof = np.zeros(len(y["train"]))
            for tr, te in folds:
                oof[te] = clf(c).fit(z["train"][tr], y["train"][tr]).predict_proba(z["train"][te])[:, 1]
            return float(roc_auc_score(y["train"], oof)), oof

        scores, oofs = search_probe_c(inner)
    probe = choose_probe_c(scores, y["train"], oofs, cfg.seed)
    fitted = clf(probe.c).fit(z["train"], y["train"])
    w = fitted.coef_[0] / sigma
    head_layer(model).set_weights([w[:, None].astype("float32"),
                                   np.array([fitted.intercept_[0] - float(w @ mu)], dtype="float32")])
    _log_probe(probe)
    history = {}
    for split, prefix in (("train", ""), ("val", "val_")):
        p = fitted.predict_proba(z[split])[:, 1]
        history[f"{prefix}loss"] = [float(log_loss(y[split], p, labels=[0, 1]))]
        both = len(set(y[split])) == 2
        history[f"{prefix}auc"] = [float(roc_auc_score(y[split], p)) if both else float("nan")]
    return history, probe


def _log_probe(probe: ProbeFit) -> None:
    """One line for the fit; a warning for a C on the grid's edge and for a head without signal."""
    if probe.inner_auc is None:
        logger.info("train: linear-probe head, C=%g (too few patient groups for an inner CV)", probe.c)
        return
    logger.info("train: linear-probe head, C=%g, inner CV AUC %.3f [%.3f, %.3f] (by C: %s)", probe.c,
                probe.inner_auc, *probe.inner_auc_ci95, probe.inner_auc_by_c)
    if probe.c_at_edge:
        why = ("not searched further: its inner AUC is not above chance" if probe.inner_auc <= 0.5
               else "the best C may lie beyond")
        logger.warning("train: the probe's C=%g sits on the %s edge of the C values tried (%s), its inner "
                       "AUC still rising towards it; %s", probe.c, probe.c_at_edge,
                       ", ".join(probe.inner_auc_by_c), why)
    if not probe.signal:
        logger.warning("train: the probe head shows no signal before fine-tuning: inner CV AUC %.3f "
                       "(%+.3f from chance), 95%% interval [%.3f, %.3f] not above 0.5", probe.inner_auc,
                       probe.inner_auc - 0.5, *probe.inner_auc_ci95)


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
