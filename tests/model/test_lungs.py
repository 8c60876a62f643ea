"""The lung segmenter shipped with the package and the lung gate built from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from covid_tasks import lungs  # noqa: E402
from covid_tasks.images import load_image  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


def _constant_segmenter(value: float) -> keras.Model:
    """A stand-in segmenter of the real architecture whose output is ``value`` everywhere."""
    model = lungs.build_segmenter()
    out = model.get_layer("seg_mask")
    kernel, bias = out.get_weights()
    out.set_weights([np.zeros_like(kernel), np.full_like(bias, np.log(value / (1 - value)))])
    model.trainable = False
    return model


@pytest.mark.parametrize("value, expect_grey", [(1 - 1e-6, False), (1e-6, True)])
def test_gate_keeps_lungs_and_greys_out_the_rest(value: float, expect_grey: bool) -> None:
    size = 64
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, lungs.lung_gate(inputs, _constant_segmenter(value), size))
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    got = model.predict(x, verbose=0)
    want = np.full_like(x, lungs.MID_GREY) if expect_grey else x
    np.testing.assert_allclose(got, want, atol=1e-2)


@pytest.fixture(scope="module")
def shipped() -> keras.Model:
    if not lungs.ASSET.is_file():
        pytest.fail(f"{lungs.ASSET} is missing: the package must ship the trained segmenter")
    return lungs.load_segmenter()


def test_shipped_segmenter_finds_two_lungs_on_sample_images_of_both_classes(shipped: keras.Model) -> None:
    meta = pd.read_csv(SAMPLE / "metadata.csv", dtype=str, keep_default_na=False)
    xray = meta[meta["view"].isin(["PA", "AP"])]
    covid = xray["finding"] == "COVID-19"
    picks = pd.concat([xray[~covid].head(4), xray[covid].head(4)])
    x = np.stack([load_image(SAMPLE / "images" / f, lungs.SEG_SIZE) for f in picks["filename"]])
    masks = shipped.predict(x, verbose=0)[..., 0] > 0.5
    half = lungs.SEG_SIZE // 2
    for name, mask in zip(picks["filename"], masks, strict=True):
        area = mask.mean()
        assert 0.12 <= area <= 0.65, f"{name}: lung area {area:.2f} of the image"
        left, right = mask[:, :half].mean(), mask[:, half:].mean()
        assert min(left, right) > 0.25 * max(left, right), f"{name}: one-sided mask {left:.2f}/{right:.2f}"


def test_shipped_segmenter_misses_a_blank_image(shipped: keras.Model) -> None:
    blank = np.full((1, lungs.SEG_SIZE, lungs.SEG_SIZE, 3), 127.0, dtype="float32")
    assert (shipped.predict(blank, verbose=0) > 0.5).mean() < 0.05


def test_gated_classifier_roundtrips_with_plain_keras(tmp_path: Path) -> None:
    from covid_tasks.config import Config
    from covid_tasks.model import build_model, unfreeze

    cfg = Config(data_root=str(tmp_path), backbone="efficientnet_lite0", weights="none", img_size=64,
                 lung_gate=True)
    model = build_model(cfg)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # built-in layers only: no custom objects
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    unfreeze(loaded, 1e-5)
    assert not loaded.get_layer(lungs.SEGMENTER_LAYER).trainable
    assert not any(w.trainable for w in loaded.get_layer(lungs.SEGMENTER_LAYER).weights)
