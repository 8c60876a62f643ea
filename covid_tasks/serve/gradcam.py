"""Grad-CAM on the backbone's last convolutional block, rendered as a transparent PNG heat map.

Grad-CAM (Selvaraju et al., 2017) weights each channel ``k`` of a convolutional feature map
``A`` by the mean gradient of the class score over the map, ``alpha_k = mean_ij dy/dA_ij^k``, and
keeps the positive part of ``sum_k alpha_k A^k``. Here ``A`` is the output of the model's nested
``backbone`` layer (the last convolutional block of every backbone we build) and ``y`` is the
logit of ``prob_covid`` for the predicted class (``+logit`` for covid, ``-logit`` for non_covid),
so the map shows where the evidence for the answer given lies. With our head (global average
pooling, dropout, one dense unit) Grad-CAM equals the class activation map ``ReLU(sum_k w_k A^k)``
up to a positive factor, which the tests use as an independent check.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from covid_tasks.model import BACKBONE_LAYER, OUTPUT_LAYER

#: Control points of the colour map (value, RGB): dark blue -> cyan -> yellow -> red ("jet"-like).
_STOPS = ((0.0, (0, 0, 128)), (0.25, (0, 128, 255)), (0.5, (0, 255, 160)), (0.75, (255, 220, 0)),
          (1.0, (220, 0, 0)))


class GradCamUnavailableError(ValueError):
    """The model lacks the ``backbone`` or ``prob_covid`` layer Grad-CAM needs."""


def layer_output(model: Any, layer_name: str) -> Any:
    """The symbolic output of ``layer_name`` *in this model's graph* (also for a nested sub-model).

    ``model.get_layer(name).output`` of a nested model is its own internal output, which is not
    connected to the outer inputs; this walks back from the model's output instead.

    Raises:
        GradCamUnavailableError: no layer of that name is on the path to the output.
    """
    seen: set[int] = set()
    stack = list(model.outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        operation, node_index, _ = tensor._keras_history
        if operation.name == layer_name:
            return tensor
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    raise GradCamUnavailableError(f"model {model.name!r} has no layer {layer_name!r} on the path to "
                                  "its output")


class GradCam:
    """Grad-CAM heat maps for a classifier built by :func:`covid_tasks.model.build_model`.

    Args:
        model: the Keras model (raw 0..255 RGB in, ``prob_covid`` out).
        layer_name: the feature-map layer (default ``backbone``).
        output_name: the final dense unit (default ``prob_covid``).

    Raises:
        GradCamUnavailableError: the model lacks either layer, or the map is not 2-D.
    """

    def __init__(self, model: Any, layer_name: str = BACKBONE_LAYER, output_name: str = OUTPUT_LAYER) -> None:
        import keras
        import tensorflow as tf

        features = layer_output(model, layer_name)
        if len(features.shape) != 4:
            raise GradCamUnavailableError(f"layer {layer_name!r} outputs {features.shape}, "
                                          "not a 2-D feature map")
        try:
            dense = model.get_layer(output_name)
        except ValueError as exc:
            raise GradCamUnavailableError(f"model {model.name!r} has no layer {output_name!r}") from exc
        head_input = dense._inbound_nodes[0].input_tensors[0]
        self._model = keras.Model(model.inputs, [features, head_input], name=f"{model.name}_gradcam")
        self._dense = dense
        self._sigmoid = getattr(dense.activation, "__name__", "") == "sigmoid"
        self.feature_shape = tuple(int(d) for d in features.shape[1:3])
        self._fn = tf.function(self._maps, reduce_retracing=True)

    def _maps(self, images: Any, signs: Any) -> Any:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(images)
            features, head_input = self._model([images], training=False)
            score = tf.matmul(head_input, self._dense.kernel) + self._dense.bias
            if not self._sigmoid:  # explain the output as it is
                score = self._dense.activation(score)
            target = tf.reshape(score, [-1]) * signs
        grads = tape.gradient(target, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(cam, peak)

    def __call__(self, images: Any, positive: Any) -> np.ndarray:
        """Heat maps in 0..1 at the feature map's resolution, one per image.

        Args:
            images: float32 ``(n, size, size, 3)`` raw 0..255 RGB, as the model takes them.
            positive: ``(n,)`` booleans: explain covid (True) or non_covid (False) per image.

        Returns:
            float32 ``(n, h, w)``; each map is scaled so its maximum is 1 (all zeros when no
            region supports the class).
        """
        import tensorflow as tf

        signs = np.where(np.asarray(positive, dtype=bool), 1.0, -1.0).astype("float32")
        return self._fn(tf.convert_to_tensor(images, tf.float32), tf.convert_to_tensor(signs)).numpy()


def colorize(cam: np.ndarray, size: int, max_alpha: float = 0.6) -> np.ndarray:
    """A ``(size, size, 4)`` uint8 RGBA image of one heat map: colour by value, transparent where cold.

    The map is resized bilinearly to ``size`` (the model's input, which is the whole image
    stretched to a square), so a page can stretch it over the original picture.
    """
    from PIL import Image

    up = Image.fromarray(np.asarray(cam, dtype="float32")).resize((size, size), Image.BILINEAR)
    values = np.clip(np.asarray(up), 0.0, 1.0)
    xs = [s[0] for s in _STOPS]
    rgb = np.stack([np.interp(values, xs, [s[1][c] for s in _STOPS]) for c in range(3)], axis=-1)
    alpha = np.clip(values, 0.0, 1.0) * max_alpha * 255.0
    return np.concatenate([rgb, alpha[..., None]], axis=-1).round().astype("uint8")


def png_base64(rgba: np.ndarray) -> str:
    """Base64 text of an RGBA array encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
