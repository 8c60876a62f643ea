"""Calibration: Platt/temperature fits, exact folding into the last Dense layer, the model contract,
and evaluate lowering the ECE of a miscalibrated model without changing a decision."""

from __future__ import annotations

import numpy as np
import pytest

from covid_tasks import calibration
from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from covid_tasks.stats import sigmoid
from tests.helpers import tiny_run


def _labels(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(len(logits)) < sigmoid(logits)).astype(int)


def test_platt_undoes_overconfidence_and_a_shift() -> None:
    true = np.random.default_rng(1).normal(0.0, 1.5, 4000)
    y = _labels(true)
    fit = calibration.fit(y, 4.0 * true - 2.0, "platt")  # over-confident and shifted
    assert fit["params"]["a"] == pytest.approx(0.25, rel=0.1)
    assert fit["params"]["b"] == pytest.approx(0.5, abs=0.15)
    assert fit["fitted_on"] == "val" and fit["n_fit"] == 4000 and not fit["slope_at_bound"]
    temp = calibration.fit(y, 4.0 * true, "temperature")
    assert temp["params"]["b"] == 0.0 and temp["params"]["a"] == pytest.approx(0.25, rel=0.1)
    assert calibration.fit(y, true, "none")["params"] == {"a": 1.0, "b": 0.0}


def test_separable_or_useless_scores_keep_a_finite_increasing_map() -> None:
    y = np.array([1] * 10 + [0] * 10)
    separable = calibration.fit(y, np.where(y == 1, 5.0, -5.0), "platt")
    p = sigmoid(calibration.apply(np.array([5.0, -5.0]), separable["params"]))
    # Platt's smoothed targets, not 1 and 0: ten images per class cannot show certainty.
    assert p[0] == pytest.approx(11 / 12, abs=0.01) and p[1] == pytest.approx(1 / 12, abs=0.01)
    useless = calibration.fit(y, np.where(y == 1, -1.0, 1.0), "platt")  # anti-correlated on val
    assert useless["params"]["a"] == calibration.SLOPE_BOUNDS[0] and useless["slope_at_bound"]
    with pytest.raises(ValueError, match="both classes"):
        calibration.fit([1, 1], [0.1, 0.2], "platt")
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibration.fit(y, y, "isotonic")


def test_folding_into_the_last_layer_is_exact() -> None:
    model = tiny_run.channel_model(tiny_run.GOOD)
    x = np.random.default_rng(2).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    kernel, bias = calibration.head_weights(model)
    feats, prob = calibration.features_and_output(model).predict(x, verbose=0)
    z = np.asarray(feats, dtype=float) @ kernel + bias
    assert sigmoid(z) == pytest.approx(prob.reshape(-1), abs=1e-6)
    params = {"a": 0.4, "b": -0.7}
    calibration.fold_into_model(model, params)
    assert model.predict(x, verbose=0).reshape(-1) == pytest.approx(sigmoid(0.4 * z - 0.7), abs=1e-6)


@pytest.mark.parametrize("variant,message", [
    ("softmax", "activation is 'softmax'"),
    ("two_units", "2 units"),
    ("not_last", "not the model's single output"),
    ("renamed", "no 'prob_covid' layer"),
])
def test_a_model_without_the_dense_sigmoid_head_is_refused(variant: str, message: str) -> None:
    import keras

    inputs = keras.Input(shape=(8,))
    if variant == "softmax":
        outputs = keras.layers.Dense(1, activation="softmax", name="prob_covid")(inputs)
    elif variant == "two_units":
        outputs = keras.layers.Dense(2, activation="sigmoid", name="prob_covid")(inputs)
    elif variant == "not_last":
        head = keras.layers.Dense(1, activation="sigmoid", name="prob_covid")
        outputs = keras.layers.Rescaling(0.5)(head(inputs))
    else:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(inputs)
    with pytest.raises(ValueError, match=message):
        calibration.output_layer(keras.Model(inputs, outputs))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_run.make_data_root(tmp_path_factory.mktemp("calibration_data"))


def _shifted_model(shift: float, gain: float = 10.0):
    """The good channel model with its logit shifted: it calls almost everything covid with confidence."""
    model = tiny_run.channel_model(tiny_run.GOOD, 32, gain)
    kernel, bias = model.get_layer("prob_covid").get_weights()
    model.get_layer("prob_covid").set_weights([kernel, bias + np.float32(shift)])
    return model


def test_evaluate_lowers_the_ece_of_a_miscalibrated_model(data_root, tmp_path) -> None:
    import pandas as pd

    from covid_tasks.stages.evaluate import evaluate

    cfg = Config(data_root=str(data_root), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}",
                 img_size=32, batch_size=8)
    tiny_run.write_model_run(cfg, "shifted", _shifted_model(3.0))
    result = evaluate(cfg, "shifted")
    cal = result["calibration"]
    assert {"method", "params", "ece_before", "ece_after", "brier_before", "brier_after"} <= set(cal)
    assert cal["method"] == "platt" and cal["params"]["b"] < -1.0
    assert cal["ece_after"] < 0.5 * cal["ece_before"] and cal["brier_after"] < cal["brier_before"]
    rows = pd.read_csv(DataRoot.of(cfg).run("shifted").path / "predictions.csv")
    raw = sigmoid(rows["logit_uncalibrated"].to_numpy())
    assert (rows["predicted"] == "covid").tolist() == (raw >= result["threshold_uncalibrated"]).tolist()
    assert (DataRoot.of(cfg).run("shifted").path / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    none = evaluate(cfg.replace(calibration="none"), "shifted")
    assert none["calibration"]["ece_after"] == pytest.approx(none["calibration"]["ece_before"])
    assert none["threshold"] == pytest.approx(none["threshold_uncalibrated"])
    assert none["tp"] == result["tp"] and none["fp"] == result["fp"]  # same decisions either way


def test_evaluate_refuses_a_model_it_cannot_calibrate(data_root, tmp_path) -> None:
    import keras

    from covid_tasks.stages.evaluate import evaluate

    inputs = keras.Input(shape=(32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    cfg = Config(data_root=str(data_root), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}",
                 img_size=32, batch_size=8)
    tiny_run.write_model_run(cfg, "softmax", keras.Model(inputs, outputs))
    with pytest.raises(ValueError, match="Dense\\(1, sigmoid\\)"):
        evaluate(cfg, "softmax")
    assert not (DataRoot.of(cfg).run("softmax").path / "metrics.json").exists()
