"""Model construction shared by ``train`` and ``finetune``.

The model takes raw 0..255 RGB images of shape ``(img_size, img_size, 3)`` and returns one
sigmoid probability: P(class index 1 = ``covid``). Each backbone's own preprocessing is a
built-in layer inside the model, so a downstream service feeds decoded pixels and nothing else,
and loading the model needs no code from this package.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from covid_tasks.config import Config

logger = logging.getLogger(__name__)

# ImageNet "caffe" preprocessing used by ResNet50: RGB -> BGR, then subtract these BGR means.
RESNET50_BGR_MEAN = (103.939, 116.779, 123.68)
BACKBONE_LAYER = "backbone"
PREPROCESS_LAYER = "preprocess"
OUTPUT_LAYER = "prob_covid"


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be had (offline, no cached file)."""


def build_model(cfg: Config, weights: str | None = None) -> Any:
    """Build and compile the frozen-backbone classifier.

    Args:
        cfg: configuration (``backbone``, ``img_size``, ``dropout``, ``learning_rate``,
            ``lung_gate`` and ``lung_segmenter``: with the gate, a frozen lung segmenter inside the
            model replaces everything outside the lungs by mid-grey before the backbone).
        weights: ``imagenet``, ``bundled``, ``none`` or a path to a weights file; defaults to
            ``cfg.weights``.

    Returns:
        A compiled ``keras.Model`` whose backbone (layer ``backbone``) is frozen.

    Raises:
        WeightsUnavailableError: ``imagenet`` weights cannot be downloaded or found in the cache.
        FileNotFoundError: a weights path does not exist.
        ValueError: an unknown backbone or weights value.
    """
    import keras

    weights = cfg.weights if weights is None else weights
    size = cfg.img_size
    inputs = keras.Input(shape=(size, size, 3), name="image", dtype="float32")
    preprocess, base = _backbone(cfg.backbone, size, weights, cfg.multiscale)
    x = inputs
    if cfg.lung_gate:
        from covid_tasks.lungs import load_segmenter, lung_gate

        x = lung_gate(x, load_segmenter(cfg.lung_segmenter or None), size)
    x = preprocess(x) if preprocess is not None else x
    base.trainable = False
    x = base(x, training=False)  # BatchNorm stays in inference mode, also when fine-tuning
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER, dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"covid_{cfg.backbone}")
    compile_model(model, cfg.learning_rate)
    return model


def compile_model(model: Any, learning_rate: Any) -> None:
    """Compile with Adam, binary cross-entropy and the metrics plotted per epoch (positive = covid).

    XLA compilation is left to Keras ("auto") where a GPU is visible and turned off on CPUs,
    where compiling ResNet50's training step costs more than it saves on a short run.

    Args:
        model: the model to compile (in place).
        learning_rate: Adam's learning rate (a float or a ``keras.optimizers.schedules`` schedule).
    """
    import keras

    model.compile(
        jit_compile="auto" if keras.distribution.list_devices("gpu") else False,
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
    )


def unfreeze(model: Any, learning_rate: Any, top_blocks: int = 0) -> int:
    """Make backbone layers trainable except BatchNormalization, then recompile.

    BatchNorm layers keep their ImageNet statistics frozen (and the backbone is called with
    ``training=False``), which is what keeps fine-tuning on a small data set stable.

    Args:
        model: a model from :func:`build_model` (or loaded from its ``.keras`` file).
        learning_rate: the fine-tuning learning rate (a float or a Keras schedule).
        top_blocks: 0 unfreezes the whole backbone; ``n > 0`` only the last ``n`` MBConv blocks
            and the head conv of an EfficientNet-Lite backbone.

    Returns:
        The number of trainable weight tensors after unfreezing.

    Raises:
        ValueError: the model has no ``backbone`` layer, or ``top_blocks`` is set for a backbone
            without numbered blocks.
    """
    import keras

    try:
        base = model.get_layer(BACKBONE_LAYER)
    except ValueError as exc:
        raise ValueError(f"model has no '{BACKBONE_LAYER}' layer to unfreeze") from exc
    base.trainable = True
    if top_blocks > 0:
        numbered = (re.match(r"block(\d\d)_", layer.name) for layer in base.layers)
        blocks = sorted({int(m.group(1)) for m in numbered if m})
        if not blocks:
            raise ValueError(f"top_blocks={top_blocks} needs an EfficientNet-Lite backbone (numbered blocks)")
        first = blocks[-1] - top_blocks + 1
        for layer in base.layers:
            m = re.match(r"block(\d\d)_", layer.name)
            layer.trainable = (int(m.group(1)) >= first) if m else layer.name.startswith("top_")
    for layer in _all_layers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    if PREPROCESS_LAYER in [layer.name for layer in model.layers]:
        model.get_layer(PREPROCESS_LAYER).trainable = False
    compile_model(model, learning_rate)
    return len(model.trainable_weights)


def head_layer(model: Any) -> Any:
    """The output ``Dense`` layer ``prob_covid`` (its input is the pooled backbone feature vector)."""
    return model.get_layer(OUTPUT_LAYER)


def feature_model(model: Any) -> Any:
    """A model from the classifier's input to the vector its ``prob_covid`` layer reads (same weights)."""
    import keras

    return keras.Model(model.inputs, head_layer(model).input)


def with_dtype_policy(model: Any, policy: str) -> Any:
    """Return ``model`` with its layers on dtype ``policy``; ``preprocess`` and ``prob_covid`` keep theirs.

    A model trained under ``mixed_float16`` on a GPU is saved as ``float32`` (so CPU services
    compute in float32), and a saved float32 model is switched to ``mixed_float16`` before
    fine-tuning on a GPU. Weights are float32 under both policies and are copied unchanged.

    Args:
        model: a functional model from :func:`build_model` or loaded from its ``.keras`` file.
        policy: a Keras dtype policy name (``float32``, ``mixed_float16``, ``mixed_bfloat16``).

    Returns:
        ``model`` itself when nothing changes, else an uncompiled copy with the same weights.
    """
    import keras

    config = model.get_config()
    changed = _set_policy(config, policy)
    if not changed:
        return model
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    logger.info("model %s: %d layers switched to dtype policy %s", model.name, changed, policy)
    return clone


def _set_policy(node: Any, policy: str) -> int:
    """Rewrite the ``DTypePolicy`` of every layer config under ``node`` in place; count changes."""
    changed = 0
    if isinstance(node, list):
        return sum(_set_policy(item, policy) for item in node)
    if not isinstance(node, dict):
        return 0
    cfg = node.get("config")
    if isinstance(cfg, dict) and cfg.get("name") not in (PREPROCESS_LAYER, OUTPUT_LAYER):
        dtype = cfg.get("dtype")
        if (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicy"
                and dtype["config"].get("name") != policy):
            dtype["config"]["name"] = policy
            changed += 1
    return changed + sum(_set_policy(value, policy) for value in node.values())


def _all_layers(layer: Any) -> list[Any]:
    out = []
    for sub in getattr(layer, "layers", []):
        out.append(sub)
        out.extend(_all_layers(sub))
    return out


def _backbone(name: str, size: int, weights: str, multiscale: bool = False) -> tuple[Any, Any]:
    """Return (preprocessing layer or None, backbone model named ``backbone``)."""
    import keras

    if name.startswith("efficientnet_lite"):
        from covid_tasks.efficientnet_lite import build_backbone

        return build_backbone(size, weights, name, multiscale)
    if multiscale:
        logger.info("multiscale applies to the efficientnet_lite backbones only; %s uses its top features",
                    name)
    apps = {
        "resnet50": (keras.applications.ResNet50, {}),
        "mobilenet_v3_small": (keras.applications.MobileNetV3Small,
                               {"include_preprocessing": True, "minimalistic": False}),
    }
    if name not in apps:
        raise ValueError(f"unknown backbone {name!r}")
    if weights == "bundled":
        raise ValueError(f"weights 'bundled' exist only for the efficientnet_lite backbones, not {name}")
    ctor, extra = apps[name]
    keras_weights = _keras_weights(name, weights)
    try:
        base = ctor(include_top=False, weights=keras_weights, input_shape=(size, size, 3), **extra)
    except Exception as exc:  # network errors surface as many types (URLError, socket errors, ...)
        if keras_weights == "imagenet":
            raise WeightsUnavailableError(_imagenet_help(name, exc)) from exc
        raise
    base.name = BACKBONE_LAYER
    preprocess = _resnet50_preprocess() if name == "resnet50" else None
    return preprocess, base


def _keras_weights(name: str, weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for {name} not found "
                                "(use 'imagenet', 'none' or a path)")
    return str(path)


def _imagenet_help(name: str, exc: BaseException) -> str:
    files = {
        "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    }
    return (
        f"ImageNet weights for {name} could not be downloaded or found in the Keras cache "
        f"(~/.keras/models/{files.get(name, '')}): {type(exc).__name__}: {exc}. "
        "Provide them: download that file where you are online and copy it into ~/.keras/models/ "
        "(the project's Docker image does this at build time), or pass weights=<path to the .h5 file>, "
        "or weights=none to train from random initialisation on purpose."
    )


def _resnet50_preprocess() -> Any:
    """ResNet50's ``preprocess_input`` as a frozen built-in 1x1 convolution.

    The kernel is a permutation matrix (RGB -> BGR) and the bias subtracts the BGR means, so
    the layer is exactly ``keras.applications.resnet50.preprocess_input`` for 0..255 input.
    """
    import keras
    import numpy as np

    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_ch, in_ch in enumerate((2, 1, 0)):
        kernel[0, 0, in_ch, out_ch] = 1.0
    bias = -np.asarray(RESNET50_BGR_MEAN, dtype="float32")
    layer = keras.layers.Conv2D(
        3, 1, name=PREPROCESS_LAYER, trainable=False, dtype="float32",
        kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant(bias),
    )
    return layer
