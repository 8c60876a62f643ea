"""Calibration: make the model's own output a calibrated P(covid), with built-in Keras layers only.

The network is trained with balanced class weights, so its sigmoid answers "covid or not" as if
both classes were equally common, and it is over-confident where it has seen few images. Its
output ``sigmoid(z)``, with ``z = w . x + c`` the logit of the last layer (``Dense(1, sigmoid)``
named ``prob_covid``, see ``covid_tasks.model``), is rescaled on the **validation** split:

* ``platt`` (default): ``sigmoid(a * z + b)``, ``a`` and ``b`` fitted by maximum likelihood
  against Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, which keeps the
  fit finite when the validation images are separable;
* ``temperature``: the same with ``b = 0`` (one parameter, fixes over-confidence only);
* ``none``: ``a = 1, b = 0``.

``a`` is kept within ``SLOPE_BOUNDS`` (positive), so the map is increasing and every decision at
the mapped threshold is unchanged. It is folded exactly into the last layer, ``w' = a * w`` and
``c' = a * c + b``, so the saved model is still plain Keras and its output *is* the calibrated
probability. Isotonic regression is not offered: it cannot be folded into a layer, and a
validation split of tens of images cannot support it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from covid_tasks.config import CALIBRATION_METHODS as METHODS
from covid_tasks.config import POSITIVE_INDEX

logger = logging.getLogger(__name__)

SLOPE_BOUNDS = (1e-2, 1e2)
INTERCEPT_BOUNDS = (-50.0, 50.0)


def output_layer(model: Any) -> Any:
    """The model's final ``Dense(1, sigmoid)`` layer named ``prob_covid``.

    Raises:
        ValueError: the model's output is not produced by such a layer (calibration cannot be
            folded into it).
    """
    import keras

    from covid_tasks.model import OUTPUT_LAYER

    names = [layer.name for layer in model.layers]
    if OUTPUT_LAYER not in names:
        raise ValueError(f"model {model.name!r} has no '{OUTPUT_LAYER}' layer (its last layer is "
                         f"{names[-1]!r}): calibration needs the output to be Dense(1, sigmoid) named "
                         f"'{OUTPUT_LAYER}' on a feature vector (covid_tasks.model)")
    layer = model.get_layer(OUTPUT_LAYER)
    cfg = layer.get_config()
    problems = []
    if not isinstance(layer, keras.layers.Dense):
        problems.append(f"it is a {type(layer).__name__}, not Dense")
    else:
        if cfg.get("units") != 1:
            problems.append(f"it has {cfg.get('units')} units, not 1")
        if cfg.get("activation") != "sigmoid":
            problems.append(f"its activation is {cfg.get('activation')!r}, not 'sigmoid'")
        if not cfg.get("use_bias", True):
            problems.append("it has no bias")
    if len(model.outputs) != 1 or model.outputs[0] is not layer.output:
        problems.append("it is not the model's single output")
    if problems:
        raise ValueError(f"cannot calibrate model {model.name!r}: its '{OUTPUT_LAYER}' layer must be the "
                         f"final Dense(1, sigmoid) on a feature vector, but " + "; ".join(problems))
    return layer


def features_and_output(model: Any) -> Any:
    """A model returning ``[features into prob_covid, prob_covid]`` in one pass (same weights)."""
    import keras

    layer = output_layer(model)
    return keras.Model(model.inputs, [layer.input, model.outputs[0]], name=f"{model.name}_audit")


def head_weights(model: Any) -> tuple[Any, float]:
    """The output layer's kernel (1-D) and bias as float64, to compute logits from features."""
    import numpy as np

    kernel, bias = output_layer(model).get_weights()
    return np.asarray(kernel, dtype="float64").reshape(-1), float(np.asarray(bias).reshape(-1)[0])


def fit(y_true: Any, logits: Any, method: str = "platt") -> dict[str, Any]:
    """Fit ``sigmoid(a * z + b)`` on validation logits ``z`` (see the module docstring).

    Args:
        y_true: validation class indices.
        logits: validation logits of the uncalibrated model.
        method: ``platt``, ``temperature`` or ``none``.

    Returns:
        ``{"method", "params": {"a", "b"}, "fitted_on": "val", "n_fit", "slope_at_bound"}``.

    Raises:
        ValueError: an unknown method, or a validation split without both classes.
    """
    import numpy as np
    from scipy.optimize import minimize

    if method not in METHODS:
        raise ValueError(f"calibration must be one of {METHODS}, got {method!r}")
    y = (np.asarray(y_true) == POSITIVE_INDEX).astype(float)
    z = np.asarray(logits, dtype=float)
    out: dict[str, Any] = {"method": method, "params": {"a": 1.0, "b": 0.0}, "fitted_on": "val",
                           "n_fit": int(len(z)), "slope_at_bound": False}
    if method == "none":
        return out
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"calibration needs both classes in the validation split "
                         f"({n_pos} covid, {n_neg} non_covid); use calibration=none")
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    with_b = method == "platt"

    def loss(v: Any) -> tuple[float, Any]:
        s = v[0] * z + (v[1] if with_b else 0.0)
        p = np.exp(-np.logaddexp(0.0, -s))
        grad = p - target
        return float(np.sum(np.logaddexp(0.0, s) - target * s)), np.array(
            [np.sum(grad * z), np.sum(grad) if with_b else 0.0])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[SLOPE_BOUNDS, INTERCEPT_BOUNDS if with_b else (0.0, 0.0)])
    a, b = float(res.x[0]), float(res.x[1]) if with_b else 0.0
    out["params"] = {"a": a, "b": b}
    out["slope_at_bound"] = bool(min(abs(a - bound) for bound in SLOPE_BOUNDS) < 1e-9 * max(1.0, a))
    if out["slope_at_bound"]:
        logger.warning("calibration: slope a=%.4g is at its bound %s: on the validation split the scores "
                       "barely rank the classes, so calibrated probabilities are nearly constant", a,
                       SLOPE_BOUNDS)
    return out


def apply(logits: Any, params: dict[str, float]) -> Any:
    """Calibrated logits ``a * z + b``."""
    import numpy as np

    return params["a"] * np.asarray(logits, dtype=float) + params["b"]


def fold_into_model(model: Any, params: dict[str, float]) -> None:
    """Rescale the output layer in place so the model outputs ``sigmoid(a * z + b)``.

    Raises:
        ValueError: the model's output layer is not a final ``Dense(1, sigmoid)``.
    """
    import numpy as np

    layer = output_layer(model)
    kernel, bias = layer.get_weights()
    a, b = float(params["a"]), float(params["b"])
    layer.set_weights([(a * np.asarray(kernel, dtype="float64")).astype(kernel.dtype),
                       (a * np.asarray(bias, dtype="float64") + b).astype(bias.dtype)])


def reliability_plot(target: Path, y_true: Any, before: Any, after: Any, ece: tuple[float, float],
                     bins: int = 10, title: str = "Reliability on the test split",
                     labels: tuple[str, str] = ("uncalibrated", "calibrated")) -> str:
    """``reliability.png``: observed covid fraction against mean P(covid) per bin, before and after.

    ``before=None`` draws the ``after`` curve alone (a registered model scored on new films).
    """
    import numpy as np

    from covid_tasks.plots import pyplot, save_figure

    plt = pyplot()
    y = (np.asarray(y_true) == POSITIVE_INDEX).astype(float)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    curves = [(labels[0], before, ece[0], "C1"), (labels[1], after, ece[1], "C0")]
    for label, p, value, colour in (c for c in curves if c[1] is not None):
        p = np.asarray(p, dtype=float)
        idx = np.minimum((p * bins).astype(int), bins - 1)
        used = [b for b in range(bins) if (idx == b).any()]
        ax.plot([p[idx == b].mean() for b in used], [y[idx == b].mean() for b in used], "o-", color=colour,
                label=f"{label} (ECE {value:.3f})")
        hist.hist(p, bins=bins, range=(0, 1), histtype="step", color=colour)
    ax.set(ylabel="observed covid fraction", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="P(covid)", ylabel="images")
    fig.tight_layout()
    return save_figure(fig, target)
