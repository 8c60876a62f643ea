"""Images: read the size from the header, decode, and validate, with the decoder training uses.

One decoder for every stage: ``pull`` validates with it, the training and evaluation pipeline
(:mod:`covid_tasks.dataset`), ``predict`` and the inference service decode with it. JPEG and PNG
(grey, grey+alpha, RGB, RGBA, palette, 8 or 16 bits), DICOM films, BMP and GIF all become RGB,
resized to the model's input size and rounded to whole 0..255 values, so every caller sees the
same pixels. JPEGs decode exactly as libjpeg's default (and Pillow) does. DICOM is recognised by
content (``DICM`` at byte 128), never by file name, and decoded by :mod:`covid_tasks.dicom`
(modality LUT, VOI LUT or window, MONOCHROME1 inverted) to 0..255 grey before the same resize;
inside ``tf.data`` that one branch is a ``tf.numpy_function``, the others stay TensorFlow ops.

One pixel limit (``Config.max_image_pixels``, default :data:`~covid_tasks.config.MAX_IMAGE_PIXELS`,
50 Mpx) applies before any pixel is decoded: width and height are read from the file's header
(:func:`image_size`), and a larger image raises :class:`ImageTooLargeError` (a ``ValueError``).
"""

from __future__ import annotations

import io
import logging
import re
import struct
from pathlib import Path
from typing import Any

from covid_tasks.config import MAX_IMAGE_PIXELS
from covid_tasks.dicom import is_dicom
from covid_tasks.image_headers import header_size

logger = logging.getLogger(__name__)

#: Every format the decoder reads: its media type and file name extensions. The one list: the
#: inference service's accepted types and its page's file picker and text come from it.
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "JPEG": ("image/jpeg", (".jpg", ".jpeg")),
    "PNG": ("image/png", (".png",)),
    "DICOM": ("application/dicom", (".dcm", ".dicom")),
    "BMP": ("image/bmp", (".bmp",)),
    "GIF": ("image/gif", (".gif",)),
}
#: The formats' names, in :data:`FORMATS`' order.
IMAGE_FORMATS = tuple(FORMATS)
#: Those TensorFlow decodes with its own ops (and Pillow checks in :func:`validate_image`).
_PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF")
_DICOM_MAGIC_AT = 128
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the limit; refused before decoding.

    Attributes:
        path: the file (or a name for in-memory bytes).
        width: width declared in the header.
        height: height declared in the header.
        max_pixels: the limit it exceeds (width x height).
    """

    def __init__(self, path: str, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"{path} is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{max_pixels} pixels; refused before decoding")
        self.path, self.width, self.height, self.max_pixels = path, width, height, max_pixels


class UnusableImageError(ValueError):
    """A DICOM file the decoder refuses, with the reason ``pull`` quarantines it under.

    Attributes:
        reason: ``empty``, ``truncated``, ``undecodable``, ``unsupported`` or ``not_image``
            (docs/dicom.md); the message reads ``"<name> is not a decodable image: <reason>: ..."``.
    """

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"{name} is not a decodable image: {message}")
        self.reason = reason


def image_size(source: str | Path | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Width and height of a JPEG, PNG, DICOM, BMP or GIF, read from its header without decoding any pixel.

    A DICOM header is also checked for everything the decoder refuses (no pixel data, colour,
    several frames, an unsupported transfer syntax...), so a file this accepts is one it decodes
    unless its pixel data is corrupt.

    Args:
        source: a file path, or the file's bytes.
        max_pixels: refuse more than this many pixels (width x height); ``None`` for no limit.

    Returns:
        ``(width, height)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: width x height exceeds ``max_pixels``.
        UnusableImageError: a DICOM file the decoder refuses (a ``ValueError``).
        ValueError: not one of these formats, or the header is truncated or invalid.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if is_dicom(source):
        return _dicom_call(name, "dicom_size", source, max_pixels)
    try:
        if isinstance(source, (bytes, bytearray)):
            size = header_size(io.BytesIO(source))
        else:
            with open(source, "rb") as fh:
                size = header_size(fh)
        if size is None:
            raise ValueError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image")
        width, height = size
    except (struct.error, EOFError) as exc:
        raise ValueError(f"{name} is not a decodable image: its header is truncated ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{name} is not a decodable image: {exc}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} is not a decodable image: its header declares {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(name, width, height, max_pixels)
    return width, height


def _dicom_call(name: str, function: str, *args: Any) -> Any:
    """Call ``covid_tasks.dicom.<function>(*args)``; its refusals become this module's errors."""
    from covid_tasks import dicom

    try:
        return getattr(dicom, function)(*args)
    except dicom.DicomTooLargeError as exc:
        raise ImageTooLargeError(name, exc.width, exc.height, exc.max_pixels) from None
    except dicom.DicomError as exc:
        raise UnusableImageError(name, exc.reason, str(exc)) from None


def _dicom_rgb(contents: Any) -> Any:
    """``tf.numpy_function`` body: DICOM bytes -> uint8 ``(rows, columns, 3)`` (limit checked before)."""
    from covid_tasks.dicom import decode_dicom

    return decode_dicom(bytes(contents), None)


def decode_full(contents: Any) -> Any:
    """Decode an image at its own size with the training pipeline's decoder (no resize).

    JPEG and PNG are tested first and stay pure TensorFlow ops; DICOM (``DICM`` at byte 128) goes
    through :func:`covid_tasks.dicom.decode_dicom` in a ``tf.numpy_function``, without a pixel
    limit of its own: callers check the header first (:func:`image_size`).

    Args:
        contents: the encoded file's bytes (a string tensor or ``bytes``).

    Returns:
        A float32 ``(height, width, 3)`` RGB tensor in 0..255 (16-bit PNGs scaled, not rounded).

    Raises:
        tensorflow.errors.InvalidArgumentError: the decoder cannot read the bytes (a DICOM
            refusal included: its message holds the reason).
    """
    import tensorflow as tf

    def png() -> Any:
        return tf.cast(_png(contents), tf.float32) * (255.0 / 65535.0)

    def dicom() -> Any:
        rgb = tf.numpy_function(_dicom_rgb, [contents], tf.uint8, stateful=False, name="decode_dicom")
        rgb.set_shape((None, None, 3))
        return tf.cast(rgb, tf.float32)

    def dicom_or_other() -> Any:
        long_enough = tf.strings.length(contents) >= _DICOM_MAGIC_AT + 4
        magic = tf.cond(long_enough, lambda: tf.strings.substr(contents, _DICOM_MAGIC_AT, 4) == b"DICM",
                        lambda: tf.constant(False))
        return tf.cond(magic, dicom, lambda: tf.cast(_other(contents), tf.float32))

    is_png = tf.equal(tf.strings.substr(contents, 0, 8), _PNG_SIGNATURE)
    return tf.cond(tf.io.is_jpeg(contents), lambda: tf.cast(_jpeg(contents), tf.float32),
                   lambda: tf.cond(is_png, png, dicom_or_other))


def decode_native(contents: bytes) -> Any:
    """Decode eagerly with the same TensorFlow ops as training, in the file's own bit depth.

    ``pull`` validates every image with this (what it accepts, training can read); it needs
    less memory than :func:`decode_full` (no float copy).

    Args:
        contents: the encoded file.

    Returns:
        A ``(height, width, 3)`` uint8 tensor (uint16 for PNG).

    Raises:
        tensorflow.errors.InvalidArgumentError: the decoder cannot read the bytes.
    """
    if contents[:3] == b"\xff\xd8\xff":  # what tf.io.is_jpeg tests
        return _jpeg(contents)
    return _png(contents) if contents[:8] == _PNG_SIGNATURE else _other(contents)


def _jpeg(contents: Any) -> Any:
    import tensorflow as tf

    # The accurate integer DCT decodes exactly like libjpeg's default (and Pillow); TensorFlow's
    # default (fast DCT) is off by up to a few levels.
    return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")


def _png(contents: Any) -> Any:
    import tensorflow as tf

    # channels=3 turns grey, grey+alpha, palette and RGBA into RGB; uint16 keeps 16-bit precision.
    return tf.io.decode_png(contents, channels=3, dtype=tf.uint16)


def _other(contents: Any) -> Any:  # BMP, GIF: 8 bits only
    import tensorflow as tf

    return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)


def decode_uint8(contents: Any, img_size: int) -> Any:
    """Decode and resize to ``(img_size, img_size, 3)`` uint8 (bilinear, antialiased, rounded)."""
    return _resized(decode_full(contents), img_size)


def _resized(img: Any, img_size: int) -> Any:
    """A float32 0..255 image resized to ``(img_size, img_size, 3)`` uint8: bilinear, antialiased, rounded."""
    import tensorflow as tf

    img = tf.image.resize(img, (img_size, img_size), method="bilinear", antialias=True)
    img = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)
    img.set_shape((img_size, img_size, 3))
    return img


def decode_image(contents: Any, img_size: int) -> Any:
    """Decode image bytes to a float32 ``(img_size, img_size, 3)`` RGB tensor of whole 0..255 values.

    Args:
        contents: the encoded file's bytes (a string tensor).
        img_size: output height and width; the image is resized (bilinear, antialiased).

    Returns:
        The image tensor the model takes.
    """
    import tensorflow as tf

    return tf.cast(decode_uint8(contents, img_size), tf.float32)


def load_image(path: str | Path, img_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Any:
    """Read and decode one image file as a numpy array, with the training pipeline's code.

    The header is checked against ``max_pixels`` first, so a decompression bomb (a small file
    declaring a huge image) is refused before any memory is allocated for its pixels.

    Args:
        path: a JPEG, PNG, DICOM, BMP or GIF file.
        img_size: output height and width.
        max_pixels: the most pixels (width x height) accepted; ``None`` for no limit.

    Returns:
        A float32 ``(img_size, img_size, 3)`` array of 0..255 RGB values.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: the image has more than ``max_pixels`` pixels (a ``ValueError``).
        UnusableImageError: a DICOM file the decoder refuses, with its reason (a ``ValueError``).
        ValueError: the file is not a decodable image.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    image_size(p, max_pixels)
    return load_image_bytes(p.read_bytes(), img_size, max_pixels, name=str(p))


def load_image_bytes(contents: bytes, img_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS,
                     name: str = "<bytes>") -> Any:
    """:func:`load_image` for an image already in memory (an upload, an object store body).

    Args:
        contents: the encoded image.
        img_size: output height and width.
        max_pixels: the most pixels (width x height) accepted; ``None`` for no limit.
        name: how error messages name the image.

    Returns:
        A float32 ``(img_size, img_size, 3)`` array of 0..255 RGB values.

    Raises:
        ImageTooLargeError: the image has more than ``max_pixels`` pixels (a ``ValueError``).
        UnusableImageError: a DICOM file the decoder refuses, with its reason (a ``ValueError``).
        ValueError: the bytes are not a decodable image.
    """
    import tensorflow as tf

    if is_dicom(contents):
        # decoded here rather than in the graph, for the refusal's own error; then the same resize
        rgb = _dicom_call(name, "decode_dicom", contents, max_pixels)
        return tf.cast(_resized(tf.constant(rgb, tf.float32), img_size), tf.float32).numpy()
    try:
        image_size(contents, max_pixels)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(name, exc.width, exc.height, exc.max_pixels) from None
    except ValueError as exc:
        raise ValueError(str(exc).replace("<bytes>", name, 1)) from None
    try:
        return decode_image(tf.constant(contents), img_size).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(f"{name} is not a decodable image: {decoder_message(exc)}") from exc


def decode_failure(contents: bytes) -> str | None:
    """Why the training pipeline's decoder cannot decode ``contents``, or ``None`` when it can.

    Decodes eagerly, outside ``tf.data``, to name a file the pipeline lost (:mod:`covid_tasks.dataset`).

    Args:
        contents: the encoded file.

    Returns:
        The decoder's message (a DICOM refusal as ``"<reason>: ..."``), or ``None``.
    """
    import tensorflow as tf

    if is_dicom(contents):
        from covid_tasks.dicom import DicomError, decode_dicom

        try:
            decode_dicom(contents, None)
        except DicomError as exc:
            return str(exc)
        return None
    try:
        decode_full(tf.constant(contents))
    except (tf.errors.OpError, ValueError) as exc:
        return decoder_message(exc)
    return None


def decoder_message(exc: BaseException) -> str:
    """The first line of a TensorFlow decoding error, without its ``{{function_node ...}}`` prefix."""
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()[0] if str(exc).strip() else ""
    return re.sub(r"^\{\{[^}]*\}\}\s*", "", text) or type(exc).__name__


# ----------------------------------------------------------------------------------- validation
def validate_image(path: str | Path, min_side: int, max_pixels: int) -> str | None:
    """Check one image file without trusting it.

    Reads the header first (the same reader as training), so a decompression bomb is refused
    before any pixel is decoded; then verifies the file's structure and decodes it fully with
    Pillow (which catches truncation), and once more with TensorFlow, the decoder training uses:
    a file only Pillow reads (an RLE-compressed BMP), or a BMP/GIF whose pixels TensorFlow reads
    differently (a colour palette read as grey levels), is refused.

    A DICOM file (by content) is checked on its header and decoded with :mod:`covid_tasks.dicom`,
    the decoder training uses for it; its refusals keep their reasons.

    Args:
        path: the file to check.
        min_side: the smallest accepted width and height, in pixels.
        max_pixels: the largest accepted width times height.

    Returns:
        ``None`` when the image is usable, else a short reason: ``empty``, ``undecodable``,
        ``truncated``, ``too_small`` or ``pixel_limit`` (and for DICOM ``unsupported`` or
        ``not_image``), followed by details.
    """
    from PIL import Image

    p = Path(path)
    if p.stat().st_size == 0:
        return "empty: 0 bytes"
    if is_dicom(p):
        return _dicom_reason(p, min_side, max_pixels)
    try:
        width, height = image_size(p, max_pixels)
    except ImageTooLargeError as exc:
        return f"pixel_limit: {exc.width}x{exc.height} exceeds {max_pixels} pixels"
    except ValueError as exc:
        text = str(exc).removeprefix(f"{p} is not a decodable image: ")
        return f"{'truncated' if 'truncated' in text else 'undecodable'}: {text[:160]}"
    if min(width, height) < min_side:
        return f"too_small: {width}x{height}, smaller side under {min_side} px"
    try:
        with Image.open(p, formats=_PILLOW_FORMATS) as im:
            fmt = im.format or "image"
            if im.size != (width, height):
                return f"undecodable: header sizes disagree ({im.size[0]}x{im.size[1]} vs {width}x{height})"
            im.verify()
        with Image.open(p, formats=_PILLOW_FORMATS) as im:
            im.load()
    except Image.DecompressionBombError as exc:
        return f"pixel_limit: {exc}"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for hostile input
        text = str(exc) or type(exc).__name__
        kind = "truncated" if "truncat" in text.lower() or isinstance(exc, EOFError) else "undecodable"
        return f"{kind}: {text[:160]}"
    reason = _training_decoder_reason(p, fmt)
    if reason is None:
        logger.debug("pull: %s is a valid %s %dx%d", p.name, fmt, width, height)
    return reason


def _dicom_reason(path: Path, min_side: int, max_pixels: int) -> str | None:
    """:func:`validate_image` for a DICOM file: the header's refusals, the size, then a full decode."""
    from covid_tasks.dicom import DicomError, decode_dicom, dicom_size

    try:
        width, height = dicom_size(path, max_pixels)
        if min(width, height) < min_side:
            return f"too_small: {width}x{height}, smaller side under {min_side} px"
        decode_dicom(path.read_bytes(), max_pixels)
    except DicomError as exc:
        return str(exc)[:200]
    logger.debug("pull: %s is a valid DICOM film %dx%d", path.name, width, height)
    return None


def _training_decoder_reason(path: Path, fmt: str) -> str | None:
    """Why TensorFlow (training's decoder) cannot use ``path``, or ``None`` when it can."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    try:
        pixels = decode_native(path.read_bytes())
    except (tf.errors.OpError, ValueError) as exc:
        return f"undecodable: TensorFlow, the decoder training uses, cannot read this {fmt}: " \
               f"{decoder_message(exc)[:160]}"
    if fmt in ("BMP", "GIF"):  # 8-bit: both decoders must give the same RGB pixels
        with Image.open(path, formats=_PILLOW_FORMATS) as im:
            expected = np.asarray(im.convert("RGB"))
        if pixels.shape != expected.shape or not np.array_equal(pixels.numpy(), expected):
            return (f"undecodable: TensorFlow, the decoder training uses, reads this {fmt} "
                    f"({im.mode} mode) with other pixel values than its own colours")
    return None


