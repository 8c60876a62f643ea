"""Grad-CAM (covid_tasks/serve/gradcam.py) on models built by ``build_model`` and reloaded from ``.keras``.

* With our head (global average pooling, dropout, one dense unit), Grad-CAM on the backbone
  equals the class activation map ``ReLU(+-sum_k w_k A_k)`` computed independently here from the
  backbone's feature map and the dense kernel, for both classes.
* A bright patch that the head is set to look for is where the heat is, in the top-right or the
  bottom-left quadrant as the patch moves: the PNG is neither transposed nor flipped.
* A model without a ``backbone`` layer is refused with a clear error.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covid_tasks.config import Config

SIZE = 96  # a 3 x 3 feature map for both backbones


def _reloaded(model: Any, tmp_path: Path) -> Any:
    import keras

    path = tmp_path / "model.keras"
    model.save(path)
    return keras.saving.load_model(path)


@pytest.fixture(scope="module")
def lite0() -> Any:
    from covid_tasks.model import build_model

    return build_model(Config(backbone="efficientnet_lite0", weights="bundled", img_size=SIZE))


@pytest.fixture(scope="module")
def resnet50() -> Any:
    from covid_tasks.model import build_model
    from covid_tasks.training import set_seeds

    set_seeds(1234)  # random initial weights, the same every run
    return build_model(Config(backbone="resnet50", weights="none", img_size=SIZE))


def _random_head(model: Any, seed: int) -> None:
    kernel, _ = model.get_layer("prob_covid").get_weights()
    head = np.random.default_rng(seed).normal(0, 0.05, kernel.shape).astype("float32")
    model.get_layer("prob_covid").set_weights([head, np.zeros(1, "float32")])


def _xrays(n: int) -> np.ndarray:
    from covid_tasks.images import load_image

    files = sorted((Path(__file__).resolve().parents[2] / "sample_data" / "images").glob("*.jpg"))[:n]
    return np.stack([load_image(f, SIZE) for f in files])


@pytest.mark.parametrize("which", ["lite0", "resnet50"])
def test_grad_cam_equals_the_class_activation_map_for_both_classes(which: str, request: Any,
                                                                   tmp_path: Path) -> None:
    import keras

    from covid_tasks.serve.gradcam import GradCam, layer_output

    model = request.getfixturevalue(which)
    _random_head(model, seed=3)
    if which == "lite0":  # as the service gets it: from the registered .keras file (ResNet50's is 100 MB)
        model = _reloaded(model, tmp_path)
    images = _xrays(4)
    positive = [True, False, True, False]
    cams = GradCam(model)(images, positive)
    features = keras.Model(model.inputs, layer_output(model, "backbone")).predict(images, verbose=0)
    weights = model.get_layer("prob_covid").get_weights()[0][:, 0]
    assert cams.shape == (4, 3, 3) and features.shape[1:3] == (3, 3)
    informative = 0
    for cam, feature, pos in zip(cams, features, positive, strict=True):
        reference = np.maximum((feature @ weights) * (1.0 if pos else -1.0), 0.0)
        informative += int(reference.max() > 0)
        np.testing.assert_allclose(cam, reference / max(reference.max(), 1e-12), atol=2e-4)
    assert informative >= 2, "degenerate inputs: too few maps with any positive evidence"


@pytest.mark.parametrize("corner", ["top_right", "bottom_left"])  # off the diagonal: catches transposes
def test_heat_lies_where_the_evidence_is(lite0: Any, corner: str) -> None:
    import keras
    from PIL import Image

    from covid_tasks.serve.gradcam import GradCam, colorize, layer_output, png_base64

    half = SIZE // 2
    patch = np.full((1, SIZE, SIZE, 3), 40.0, dtype="float32")
    quadrants = {"top_left": (slice(0, half), slice(0, half)),
                 "top_right": (slice(0, half), slice(half, None)),
                 "bottom_left": (slice(half, None), slice(0, half)),
                 "bottom_right": (slice(half, None), slice(half, None))}
    rows, cols = quadrants[corner]
    plain = patch.copy()
    patch[:, rows, cols, :] = 230.0
    # The head looks for what the bright patch adds to the pooled features.
    features = keras.Model(lite0.inputs, layer_output(lite0, "backbone")).predict(
        np.concatenate([patch, plain]), verbose=0)
    direction = features[0].mean(axis=(0, 1)) - features[1].mean(axis=(0, 1))
    lite0.get_layer("prob_covid").set_weights([direction[:, None].astype("float32"), np.zeros(1, "float32")])
    cam = GradCam(lite0)(patch, [True])[0]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64(colorize(cam, SIZE))))))
    alpha = heat[..., 3].astype(float)
    assert heat.shape == (SIZE, SIZE, 4)
    q = {name: alpha[r, c].mean() for name, (r, c) in quadrants.items()}
    opposite = {"top_right": "bottom_left", "bottom_left": "top_right"}[corner]
    assert max(q, key=q.get) == corner and min(q, key=q.get) == opposite, q
    assert q[opposite] < 0.7 * q[corner], q


def test_a_model_without_backbone_is_refused() -> None:
    from covid_tasks.serve.gradcam import GradCam, GradCamUnavailableError
    from tests.helpers.tiny_run import channel_model

    with pytest.raises(GradCamUnavailableError, match="no layer 'backbone'"):
        GradCam(channel_model((1.0, 0.0, 0.0), img_size=32))
