"""The model contract: raw 0..255 RGB in, P(covid) out, preprocessing and freezing inside the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import keras
import numpy as np
import pytest
from PIL import Image

from covid_tasks import model as mdl
from covid_tasks.config import Config
from covid_tasks.images import load_image
from covid_tasks.training import configure_devices, global_batch, save_model

SIZE = 32


def _cfg(backbone: str = "resnet50", **kw: Any) -> Config:
    """The plain architecture (no lung gate, top features only): these tests are about its layers."""
    plain = {"weights": "none", "lung_gate": False, "multiscale": False}
    return Config(data_root="/nonexistent", backbone=backbone, img_size=SIZE, **{**plain, **kw})


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(n, SIZE, SIZE, 3)).astype("float32")


def _calibrate_head(model: Any, images: np.ndarray) -> None:
    """Scale the random head so probabilities spread around 0.5 instead of saturating at 0 or 1."""
    feats = keras.Model(model.input, model.get_layer("pool").output).predict(images, verbose=0)
    kernel, _ = model.get_layer(mdl.OUTPUT_LAYER).get_weights()
    logits = feats @ kernel[:, 0]
    scale = logits.std() + 1e-12
    model.get_layer(mdl.OUTPUT_LAYER).set_weights([kernel / scale, np.asarray([-logits.mean() / scale])])


@pytest.fixture(scope="module")
def resnet() -> Any:
    keras.utils.set_random_seed(7)
    model = mdl.build_model(_cfg())
    _calibrate_head(model, _images(4, seed=1))  # batches of 4 throughout: one predict trace
    return model


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    return model.predict(x, verbose=0).reshape(-1)


# ----------------------------------------------------------------------------- contract
def test_resnet50_preprocessing_inside_the_model_equals_preprocess_input(resnet: Any) -> None:
    x = _images(3, seed=2)
    inside = keras.Model(resnet.input, resnet.get_layer(mdl.PREPROCESS_LAYER).output).predict(x, verbose=0)
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(inside, expected, rtol=0, atol=1e-4)
    assert not resnet.get_layer(mdl.PREPROCESS_LAYER).trainable_weights


def test_same_probability_from_png_jpeg_and_raw_pixels(resnet: Any, tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=85)
    jpeg_pixels = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB")).astype("float32")  # lossy

    batch = np.stack([pixels.astype("float32"), load_image(tmp_path / "x.png", SIZE),
                      jpeg_pixels, load_image(tmp_path / "x.jpg", SIZE)])
    prob = _predict(resnet, batch)
    assert 0.01 < prob[0] < 0.99  # not saturated, so equality below means something
    np.testing.assert_allclose(prob[1], prob[0], rtol=0, atol=1e-5)  # PNG path == raw 0..255 array
    np.testing.assert_allclose(prob[3], prob[2], rtol=0, atol=1e-5)  # JPEG path == decoded JPEG pixels
    assert abs(prob[2] - prob[0]) > 1e-4  # and the model does see pixel differences


def test_frozen_model_trains_only_its_head_and_unfreeze_keeps_batchnorm_frozen(resnet: Any) -> None:
    # Fitting ResNet50 is too slow for a unit test; the train/finetune stage tests fit MobileNetV3
    # and check that frozen weights and BatchNorm statistics do not move.
    base = resnet.get_layer(mdl.BACKBONE_LAYER)
    assert base.trainable_weights == [] and not base.trainable
    assert [w.path for w in resnet.trainable_weights] == ["prob_covid/kernel", "prob_covid/bias"]

    clone = keras.models.clone_model(resnet)
    n = mdl.unfreeze(clone, 1e-5)
    layers = clone.get_layer(mdl.BACKBONE_LAYER).layers
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(bns) == len(convs) == 53
    assert not any(layer.trainable for layer in bns) and all(layer.trainable for layer in convs)
    assert not clone.get_layer(mdl.PREPROCESS_LAYER).trainable
    assert n == len(clone.trainable_weights) == 2 * len(convs) + 2  # conv kernels and biases + head
    assert clone.optimizer.learning_rate.numpy() == pytest.approx(1e-5)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_saved_keras_file_loads_without_project_code_and_predicts(resnet: Any, tmp_path: Path) -> None:
    path = Path(save_model(resnet, tmp_path / "m.keras"))
    assert json.loads((tmp_path / "class_indices.json").read_text()) == {"non_covid": 0, "covid": 1}
    loaded = keras.saving.load_model(path)
    x = _images(4, seed=5)
    np.testing.assert_allclose(_predict(loaded, x), _predict(resnet, x), rtol=0, atol=1e-6)
    assert loaded.get_layer(mdl.BACKBONE_LAYER).trainable_weights == []


# ----------------------------------------------------------------------------- weights
def test_weights_from_a_file_path(tmp_path: Path) -> None:
    keras.utils.set_random_seed(11)
    source = mdl.build_model(_cfg("mobilenet_v3_small"))
    path = tmp_path / "backbone.weights.h5"
    source.get_layer(mdl.BACKBONE_LAYER).save_weights(path)
    keras.utils.set_random_seed(12)
    loaded = mdl.build_model(_cfg("mobilenet_v3_small", weights=str(path)))
    fresh = mdl.build_model(_cfg("mobilenet_v3_small"))
    src, got = (m.get_layer(mdl.BACKBONE_LAYER).get_weights() for m in (source, loaded))
    other = fresh.get_layer(mdl.BACKBONE_LAYER).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(src, got, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(src, other, strict=True))
    with pytest.raises(FileNotFoundError, match="not found"):
        mdl.build_model(_cfg("mobilenet_v3_small"), weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="bundled"):
        mdl.build_model(_cfg("mobilenet_v3_small"), weights="bundled")


@pytest.mark.filterwarnings("ignore:.input_shape. is undefined")
def test_imagenet_weights_offline_fail_with_instructions() -> None:
    name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    homes = [Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")), Path("/tmp/.keras")]
    if any((home / "models" / name).exists() for home in homes):
        pytest.skip("ImageNet weights are in the Keras cache")
    try:
        mdl.build_model(_cfg("mobilenet_v3_small"), weights="imagenet")
    except mdl.WeightsUnavailableError as exc:
        message = str(exc)
    else:  # pragma: no cover - only where the download works
        pytest.skip("online: the ImageNet weights were downloaded")
    assert "~/.keras/models/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in message
    assert "weights=<path" in message and "weights=none" in message


# ----------------------------------------------------------------------------- devices
@pytest.fixture
def mixed_policy() -> Iterator[None]:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_mixed_precision_model_is_saved_as_float32(mixed_policy: None, tmp_path: Path) -> None:
    model = mdl.build_model(_cfg("mobilenet_v3_small"))

    def dtypes(m: Any) -> set[str]:
        return {layer.compute_dtype for layer in m.get_layer(mdl.BACKBONE_LAYER).layers[1:]}

    assert dtypes(model) == {"float16"} and model.get_layer(mdl.OUTPUT_LAYER).compute_dtype == "float32"
    keras.mixed_precision.set_global_policy("float32")  # a CPU service loading the file
    loaded = keras.saving.load_model(save_model(model, tmp_path / "m.keras"))
    assert dtypes(loaded) == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True))
    assert np.all(np.isfinite(_predict(loaded, _images(2))))
    back = mdl.with_dtype_policy(loaded, "mixed_float16")  # what finetune does on a GPU
    assert dtypes(back) == {"float16"} and back.get_layer(mdl.OUTPUT_LAYER).compute_dtype == "float32"
    assert mdl.with_dtype_policy(loaded, "float32") is loaded


def test_configure_devices_on_cpu() -> None:
    devices = configure_devices()
    assert devices["gpus"] == 0 and devices["replicas"] == 1 and devices["mixed_precision"] is False
    assert keras.mixed_precision.global_policy().name == "float32"
    assert global_batch(_cfg(batch_size=16), devices).batch_size == 16
    assert global_batch(_cfg(batch_size=16), {**devices, "replicas": 4}).batch_size == 64


def test_unknown_backbone_or_missing_backbone_layer() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        mdl._backbone("vgg16", SIZE, "none")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no 'backbone' layer"):
        mdl.unfreeze(plain, 1e-5)
