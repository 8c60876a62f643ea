"""The shortcut audit's fixed occlusions."""

from __future__ import annotations

import numpy as np
import pytest

from covid_tasks.occlusion import box, occlude


def test_box_is_centred_70_percent():
    assert box(100, 200) == (15, 85, 30, 170)


def test_lungs_hidden_fills_the_centre_with_the_image_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 20, 20, 3)).astype("float32")
    out = occlude(img, "lungs_hidden")
    top, bottom, left, right = box(20, 20)
    mean = img.mean(axis=(1, 2))
    np.testing.assert_allclose(out[:, top:bottom, left:right, :], np.broadcast_to(
        mean[:, None, None, :], out[:, top:bottom, left:right, :].shape), rtol=1e-6)
    np.testing.assert_array_equal(out[:, :top], img[:, :top])  # the border is kept
    np.testing.assert_array_equal(img, img.copy())  # input untouched


def test_outside_hidden_keeps_only_the_centre():
    img = np.arange(10 * 10 * 3, dtype="float32").reshape(10, 10, 3)
    out = occlude(img, "outside_hidden")
    top, bottom, left, right = box(10, 10)
    np.testing.assert_array_equal(out[top:bottom, left:right], img[top:bottom, left:right])
    np.testing.assert_allclose(out[0, 0], img.mean(axis=(0, 1)))
    assert occlude(img, "full").tolist() == img.tolist()


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="unknown view"):
        occlude(np.zeros((4, 4, 3)), "lungs")
