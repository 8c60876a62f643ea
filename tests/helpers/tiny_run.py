"""Tiny, fully controlled evaluate/register inputs, and an independent recomputation of the metrics.

* ``make_data_root`` writes 36x36 PNG "X-rays" and ``splits.csv``. Each image is one colour plus
  pixel noise: the red channel carries a strong covid signal, the green channel a weak one.
* ``channel_model`` is a real Keras model (global average pool, then a fixed sigmoid unit) that
  reads chosen channels, so a test picks a good, a worse or a failing model without training.
* ``recompute_from_predictions`` re-derives every metric from ``predictions.csv`` and the
  threshold in ``metrics.json`` with scikit-learn (and scipy's Wilson interval), independent of
  ``covid_tasks.evaluate``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from covid_tasks.layout import DataRoot

#: (covid, non_covid) images per split.
SPLIT_SIZES = {"train": (4, 4), "val": (12, 12), "test": (15, 20)}
IMAGE_SIDE = 36
#: Channel means (R, G, B) for covid / non_covid and their spread.
COVID_MEAN, NON_COVID_MEAN = (185.0, 150.0, 128.0), (85.0, 100.0, 128.0)
SPREAD = (30.0, 40.0, 0.0)
CENTER = (135.0, 125.0, 128.0)

GOOD = (1.0, 0.0, 0.0)  # reads red: strong signal
WORSE = (0.25, 1.0, 0.0)  # mostly green: weak signal
FAILING = (-1.0, 0.0, 0.0)  # anti-correlated: no threshold gives useful specificity


def make_data_root(root: str | Path, seed: int = 1) -> Path:
    """Write ``raw/images/*.png`` and ``splits.csv`` (filename, patientid, label, split) under ``root``.

    Channel values follow normal quantiles, so every split has the same class-conditional
    distribution and the metrics do not hinge on a lucky draw: red is ``mean + spread * z_i``,
    green uses a seeded permutation of the same ``z`` (weakly tied to red), blue is constant.
    """
    import pandas as pd
    from PIL import Image

    root = Path(root)
    images = root / "raw" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split, (n_covid, n_non) in SPLIT_SIZES.items():
        for label, n, mean in (("covid", n_covid, COVID_MEAN), ("non_covid", n_non, NON_COVID_MEAN)):
            z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
            zs = np.stack([z, rng.permutation(z), np.zeros(n)], axis=1)
            for i in range(n):
                colour = np.clip(np.asarray(mean) + np.asarray(SPREAD) * zs[i], 5, 250)
                pixels = colour + rng.normal(0, 3, (IMAGE_SIDE, IMAGE_SIDE, 3))
                name = f"{split}_{label}_{i:02d}.png"
                Image.fromarray(np.clip(pixels, 0, 255).round().astype("uint8"), "RGB").save(images / name)
                rows.append({"filename": name, "patientid": f"p_{split}_{label}_{i}", "label": label,
                             "split": split, "view": "PA"})
    pd.DataFrame(rows).to_csv(root / "splits.csv", index=False)
    return root


def channel_model(direction: Sequence[float], img_size: int = 32, gain: float = 10.0) -> Any:
    """``sigmoid(gain * direction . (mean_rgb - CENTER) / 255)``: a loadable plain Keras model."""
    import keras

    inputs = keras.Input(shape=(img_size, img_size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="prob_covid")(x)
    model = keras.Model(inputs, outputs, name="tiny_channel_model")
    d = np.asarray(direction, dtype="float32")
    kernel = (d * gain / 255.0).reshape(3, 1)
    bias = np.array([-gain * float(d @ np.asarray(CENTER)) / 255.0], dtype="float32")
    model.get_layer("prob_covid").set_weights([kernel.astype("float32"), bias])
    return model


def write_model_run(cfg: Any, run_key: str, model: Any) -> Path:
    """Put ``model`` where evaluate expects it (``finetune.keras`` + ``class_indices.json``)."""
    from covid_tasks.storage import write_json
    from covid_tasks.training import save_model

    run_dir = DataRoot.of(cfg).run(run_key).path
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, run_dir / "finetune.keras")
    write_json(run_dir / "finetune_history.json", {"loss": [0.7, 0.5], "val_auc": [0.8, 0.9]})
    return run_dir


def recompute_from_predictions(predictions_csv: str | Path, threshold: float) -> dict[str, Any]:
    """Every metric of ``metrics.json`` again, from a predictions file, with scikit-learn and scipy."""
    import pandas as pd
    from scipy.stats import binomtest
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    frame = pd.read_csv(predictions_csv)
    y = (frame["label"] == "covid").astype(int).to_numpy()
    prob = frame["prob_covid"].to_numpy(dtype=float)
    pred = (prob >= threshold).astype(int)
    assert list(frame["predicted"]) == ["covid" if v else "non_covid" for v in pred]
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel().tolist()
    nan = float("nan")
    out = {
        "tp": tp, "fn": fn, "tn": tn, "fp": fp, "n_test": len(y),
        "sensitivity": recall_score(y, pred, pos_label=1, zero_division=nan),
        "specificity": recall_score(y, pred, pos_label=0, zero_division=nan),
        "ppv": precision_score(y, pred, pos_label=1, zero_division=nan),
        "npv": precision_score(y, pred, pos_label=0, zero_division=nan),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "f1_covid": f1_score(y, pred, pos_label=1, zero_division=nan),
        "f1_non_covid": f1_score(y, pred, pos_label=0, zero_division=nan),
        "roc_auc": roc_auc_score(y, prob),
        "pr_auc": average_precision_score(y, prob, pos_label=1),
    }
    for name, (k, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp),
                         "npv": (tn, tn + fn), "accuracy": (tp + tn, len(y))}.items():
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson") if n else None
        out[f"{name}_ci95"] = [ci.low, ci.high] if ci else [nan, nan]
    return out


def assert_metrics_match(metrics: dict[str, Any], predictions_csv: str | Path) -> None:
    """Every recomputed value equals the one in ``metrics`` (NaN written as null matches NaN)."""
    expected = recompute_from_predictions(predictions_csv, metrics["threshold"])
    n_key = "n_test" if "n_test" in metrics else "n"
    for key, want in expected.items():
        got = metrics[n_key] if key == "n_test" else metrics[key]
        if isinstance(want, list):
            for g, w in zip(got, want, strict=True):
                _close(key, g, w, tol=1e-6)  # scipy's z differs from ours in the 7th digit
        else:
            _close(key, got, want, tol=1e-12)


def _close(key: str, got: Any, want: Any, tol: float) -> None:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        assert got is None or math.isnan(got), f"{key}: {got} != NaN"
    else:
        assert got is not None and abs(float(got) - float(want)) <= tol, f"{key}: {got} != {want}"


def load_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


#: Synthetic "X-rays" for the shortcut audit: (covid, non_covid) images per split, one per patient.
AUDIT_SPLIT_SIZES = {"train": (60, 60), "val": (20, 20), "test": (40, 40)}
AUDIT_SIDE = 32


def make_audit_data_root(root: str | Path, signal: str, seed: int = 3) -> Path:
    """Noise images whose covid class carries ``signal`` in one place, and ``splits.csv``.

    * ``corner_marker``: a bright 5 x 5 square in the top-left corner, outside the audit's central
      lung box (a burnt-in label, in the manner of a hospital's marker);
    * ``central_texture``: vertical stripes (+-70 around the local value, same mean) inside the
      lung box, so hiding the box with the image mean removes the signal and its brightness.
    """
    import pandas as pd
    from PIL import Image

    if signal not in ("corner_marker", "central_texture"):
        raise ValueError(f"unknown signal {signal!r}")
    root = Path(root)
    images = root / "raw" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split, (n_covid, n_non) in AUDIT_SPLIT_SIZES.items():
        for label, n in (("covid", n_covid), ("non_covid", n_non)):
            for i in range(n):
                pixels = rng.normal(120.0, 25.0, (AUDIT_SIDE, AUDIT_SIDE, 1)).repeat(3, axis=2)
                if label == "covid" and signal == "corner_marker":
                    pixels[:5, :5] = 255.0
                elif label == "covid":
                    pixels[10:22, 10:22:2] += 70.0
                    pixels[10:22, 11:22:2] -= 70.0
                name = f"{split}_{label}_{i:02d}.png"
                Image.fromarray(np.clip(pixels, 0, 255).round().astype("uint8"), "RGB").save(images / name)
                rows.append({"filename": name, "patientid": f"{split}_{label}_{i}", "label": label,
                             "split": split, "view": "PA"})
    pd.DataFrame(rows).to_csv(root / "splits.csv", index=False)
    return root


def train_small_cnn(data_root: Path, cfg: Any, epochs: int = 12) -> Any:
    """Really train a two-layer CNN ending in the pipeline's ``Dense(1, sigmoid)`` head on the train split."""
    import keras

    from covid_tasks.dataset import make_dataset
    from covid_tasks.layout import load_splits

    keras.utils.set_random_seed(cfg.seed)
    train = load_splits(DataRoot(Path(data_root)))["train"]
    batches = list(make_dataset(train, Path(data_root) / "raw" / "images", cfg, training=False))
    x = np.concatenate([np.asarray(b[0]) for b in batches])
    y = np.concatenate([np.asarray(b[1]) for b in batches])
    inputs = keras.Input(shape=(cfg.img_size, cfg.img_size, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalMaxPooling2D(name="pool")(h)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="prob_covid")(h)
    model = keras.Model(inputs, outputs, name="small_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model


def make_paired_data_root(root: str | Path, test_rows: Sequence[tuple[str, Sequence[bool]]]) -> Path:
    """Uniform-colour images where each RGB channel is the evidence one channel model reads.

    Validation (12 per class) and train (4 per class) images are right on every channel: covid
    200, non-covid 60, so every channel model's threshold lands between them. Each test row is
    ``(label, (red_right, green_right, blue_right))``: a channel that is right carries its class's
    value, a wrong one the other class's. One image per patient.
    """
    import pandas as pd
    from PIL import Image

    root = Path(root)
    images = root / "raw" / "images"
    images.mkdir(parents=True, exist_ok=True)
    value = {("covid", True): 200, ("covid", False): 60, ("non_covid", True): 60, ("non_covid", False): 200}
    rows = []
    fixed = [(split, label, (True, True, True)) for split, n in (("train", 4), ("val", 12))
             for label in ("covid", "non_covid") for _ in range(n)]
    cases = fixed + [("test", label, right) for label, right in test_rows]
    for i, (split, label, right) in enumerate(cases):
        colour = [value[(label, bool(ok))] for ok in right]
        pixels = np.tile(np.asarray(colour, dtype="uint8"), (32, 32, 1))
        name = f"{split}_{label}_{i:03d}.png"
        Image.fromarray(pixels, "RGB").save(images / name)
        rows.append({"filename": name, "patientid": f"p{i}", "label": label, "split": split, "view": "PA"})
    pd.DataFrame(rows).to_csv(root / "splits.csv", index=False)
    return root
