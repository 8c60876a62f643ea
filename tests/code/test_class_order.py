"""Regression: the class order (0 = non_covid, 1 = covid) holds in training, evaluation and predict.

The source project once swapped the classes and reported the other class's recall as the
sensitivity. Each test here fails if any stage reads the order from data, folders or defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_tasks.config import CLASS_NAMES, POSITIVE_INDEX


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(np.full((40, 40, 3), 20 * i, dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_positive_class_is_covid():
    assert CLASS_NAMES[POSITIVE_INDEX] == "covid" and POSITIVE_INDEX == 1


@pytest.mark.parametrize("order", [["covid", "non_covid", "covid", "non_covid"],
                                   ["non_covid", "non_covid", "covid", "covid"]])
def test_training_labels_follow_the_class_list_not_row_order(tmp_path, order):
    from covid_tasks.config import Config
    from covid_tasks.dataset import label_index, make_dataset

    names = _write_images(tmp_path, len(order))
    frame = pd.DataFrame({"filename": names, "label": order})
    expected = [1.0 if lab == "covid" else 0.0 for lab in order]
    assert label_index(order).tolist() == expected
    ds = make_dataset(frame, tmp_path, Config(img_size=32, batch_size=8), training=False)
    labels = np.concatenate([y.numpy() for _, y in ds]).tolist()
    assert labels == expected
    with pytest.raises(ValueError, match="unknown label"):
        label_index(["COVID"])


def test_sensitivity_is_covid_recall():
    from covid_tasks.metrics import binary_metrics

    # 4 covid (3 caught), 6 non_covid (5 correctly cleared)
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    prob = [0.9, 0.8, 0.7, 0.1, 0.2, 0.1, 0.3, 0.05, 0.6, 0.0]
    m = binary_metrics(y, prob, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 5, 1)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)


def _constant_model(path: Path, prob: float) -> None:
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    logit = float(np.log(prob / (1 - prob)))
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="zeros",
                             bias_initializer=keras.initializers.Constant(logit))(x)
    keras.Model(inputs, out).save(path)


def test_predict_reports_covid_for_a_high_covid_probability(tmp_path):
    from covid_tasks.predict import predict

    _constant_model(tmp_path / "m.keras", 0.9)
    (tmp_path / "class_indices.json").write_text(json.dumps({"non_covid": 0, "covid": 1}))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 50), dtype=np.uint8)).save(image)
    out = predict([image], str(tmp_path / "m.keras"), threshold=0.5)["predictions"][0]
    assert out["class"] == "covid"
    assert out["confidence"] == pytest.approx(0.9, abs=1e-4)
    low = tmp_path / "low"
    low.mkdir()
    _constant_model(low / "m.keras", 0.2)
    out = predict([image], str(low / "m.keras"), threshold=0.5)["predictions"][0]
    assert out["class"] == "non_covid" and out["confidence"] == pytest.approx(0.8, abs=1e-4)


def test_a_swapped_class_mapping_is_refused(tmp_path):
    from covid_tasks.predict import predict

    _constant_model(tmp_path / "m.keras", 0.9)
    (tmp_path / "class_indices.json").write_text(json.dumps({"covid": 0, "non_covid": 1}))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 50), dtype=np.uint8)).save(image)
    with pytest.raises(ValueError, match="class_indices"):
        predict([image], str(tmp_path / "m.keras"))


def test_cli_predict_prints_class_and_confidence(tmp_path):
    _constant_model(tmp_path / "m.keras", 0.923)
    (tmp_path / "class_indices.json").write_text(json.dumps({"non_covid": 0, "covid": 1}))
    image = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((50, 50, 3), dtype=np.uint8)).save(image)
    out = subprocess.run([sys.executable, "-m", "covid_tasks", "predict", str(image), "--model",
                          str(tmp_path / "m.keras"), "--threshold", "0.5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Class : covid" in out.stdout
    assert "Confidence : 92.3%" in out.stdout
