"""The fixed occlusions of the shortcut audit and the quality benchmark.

A chest X-ray's lung fields lie, on a PA or AP film squashed to a square, mostly inside the
central box that spans ``LUNG_BOX_FRACTION`` (70%) of each side, i.e. from 15% to 85% of the
width and of the height. Two views hide one part of the image:

* ``lungs_hidden``: the central box is filled with the image's own mean (per channel), so the
  lungs are gone and borders, devices, burnt-in text and the patient's outline remain;
* ``outside_hidden``: everything outside the box is filled with the image's mean, so only the
  lung fields (and the heart and mediastinum between them) remain.

A model that reads the lungs should do much worse on ``lungs_hidden`` than on the full image.
The box is deliberately simple and the same for every image: it does not follow each patient's
anatomy, so it also hides some mediastinum and keeps some lung apex and costophrenic angle.
"""

from __future__ import annotations

from typing import Any

#: The side fraction of the centred box taken as the lung region.
LUNG_BOX_FRACTION = 0.70
VIEWS = ("full", "lungs_hidden", "outside_hidden")
REGION = (f"central box of {LUNG_BOX_FRACTION:.0%} of each side "
          f"({(1 - LUNG_BOX_FRACTION) / 2:.0%}..{(1 + LUNG_BOX_FRACTION) / 2:.0%}), "
          "filled with the image's per-channel mean")


def box(height: int, width: int, fraction: float = LUNG_BOX_FRACTION) -> tuple[int, int, int, int]:
    """The ``(top, bottom, left, right)`` pixel bounds (end exclusive) of the centred box."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be within (0, 1), got {fraction}")
    top = int(round(height * (1 - fraction) / 2))
    left = int(round(width * (1 - fraction) / 2))
    return top, height - top, left, width - left


def occlude(images: Any, view: str, fraction: float = LUNG_BOX_FRACTION) -> Any:
    """Return a copy of ``images`` with one region filled with each image's mean.

    Args:
        images: ``(n, h, w, c)`` or ``(h, w, c)`` array of pixel values (any dtype; float32 out).
        view: ``full`` (unchanged copy), ``lungs_hidden`` or ``outside_hidden``.
        fraction: the side fraction of the centred lung box.

    Returns:
        A float32 array of the same shape.

    Raises:
        ValueError: an unknown view or a bad shape.
    """
    import numpy as np

    arr = np.array(images, dtype="float32", copy=True)
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected (n, h, w, c) images, got shape {np.shape(images)}")
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if view != "full":
        mean = arr.mean(axis=(1, 2), keepdims=True)
        top, bottom, left, right = box(arr.shape[1], arr.shape[2], fraction)
        inside = np.zeros(arr.shape[1:3], dtype=bool)
        inside[top:bottom, left:right] = True
        hide = inside if view == "lungs_hidden" else ~inside
        arr = np.where(hide[None, :, :, None], mean, arr).astype("float32")
    return arr[0] if single else arr
