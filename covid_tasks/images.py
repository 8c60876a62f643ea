"""Images: read the size from the header, decode, and validate, with the decoder training uses.

One decoder for every stage: ``pull`` validates with it, the training and evaluation pipeline
(:mod:`covid_tasks.dataset`), ``predict`` and the inference service decode with it. JPEG and PNG
(grey, grey+alpha, RGB, RGBA, palette, 8 or 16 bits), BMP and GIF all become RGB, resized to the
model's input size and rounded to whole 0..255 values, so every caller sees the same pixels.
JPEGs decode exactly as libjpeg's default (and Pillow) does.

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
from typing import Any, BinaryIO

from covid_tasks.config import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

#: The formats the decoder reads (``tf.io.decode_jpeg``, ``decode_png``, ``decode_image``).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


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


def image_size(source: str | Path | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Width and height of a JPEG, PNG, BMP or GIF, read from its header without decoding any pixel.

    Args:
        source: a file path, or the file's bytes.
        max_pixels: refuse more than this many pixels (width x height); ``None`` for no limit.

    Returns:
        ``(width, height)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: width x height exceeds ``max_pixels``.
        ValueError: not one of these formats, or the header is truncated or invalid.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            width, height = _header_size(io.BytesIO(source))
        else:
            with open(source, "rb") as fh:
                width, height = _header_size(fh)
    except (struct.error, EOFError) as exc:
        raise ValueError(f"{name} is not a decodable image: its header is truncated ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{name} is not a decodable image: {exc}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} is not a decodable image: its header declares {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(name, width, height, max_pixels)
    return width, height


def _header_size(fh: BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from the header at the start of ``fh``; ValueError for other formats."""
    def read(n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError("unexpected end of file")
        return data

    head = fh.read(8)
    if not head:
        raise ValueError("the file is empty")
    if head.startswith(_PNG_SIGNATURE):
        length, kind = struct.unpack(">I4s", read(8))
        if kind != b"IHDR" or length < 8:
            raise ValueError("PNG without an IHDR chunk first")
        return struct.unpack(">II", read(8))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:8] + read(2))
    if head[:2] == b"BM":
        fh.seek(14)
        (dib,) = struct.unpack("<I", read(4))
        if dib == 12:  # BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack("<HH", read(4))
        width, height = struct.unpack("<ii", read(8))
        return width, abs(height)  # a negative height means top-down rows
    if head[:2] == b"\xff\xd8":
        fh.seek(2)
        while True:
            byte = read(1)
            while byte != b"\xff":  # libjpeg skips stray bytes between segments
                byte = read(1)
            while byte == b"\xff":  # fill bytes
                byte = read(1)
            marker = byte[0]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue  # standalone markers: no length
            if marker in (0xD9, 0xDA):
                raise ValueError("JPEG without a frame header before its image data")
            (length,) = struct.unpack(">H", read(2))
            if marker in _JPEG_SOF:
                _precision, height, width = struct.unpack(">BHH", read(5))
                return width, height
            if length < 2:
                raise ValueError("JPEG segment with an invalid length")
            fh.seek(length - 2, io.SEEK_CUR)
    raise ValueError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image")


def decode_full(contents: Any) -> Any:
    """Decode an image at its own size with the training pipeline's decoder (no resize).

    Args:
        contents: the encoded file's bytes (a string tensor or ``bytes``).

    Returns:
        A float32 ``(height, width, 3)`` RGB tensor in 0..255 (16-bit PNGs scaled, not rounded).

    Raises:
        tensorflow.errors.InvalidArgumentError: the decoder cannot read the bytes.
    """
    import tensorflow as tf

    def png() -> Any:
        return tf.cast(_png(contents), tf.float32) * (255.0 / 65535.0)

    is_png = tf.equal(tf.strings.substr(contents, 0, 8), _PNG_SIGNATURE)
    return tf.cond(tf.io.is_jpeg(contents), lambda: tf.cast(_jpeg(contents), tf.float32),
                   lambda: tf.cond(is_png, png, lambda: tf.cast(_other(contents), tf.float32)))


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
    import tensorflow as tf

    img = tf.image.resize(decode_full(contents), (img_size, img_size), method="bilinear", antialias=True)
    img = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)
    img.set_shape((img_size, img_size, 3))
    return img


def decode_image(contents: Any, img_size: int) -> Any:
    """Decode JPEG/PNG bytes to a float32 ``(img_size, img_size, 3)`` RGB tensor of whole 0..255 values.

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
        path: a JPEG, PNG, BMP or GIF file.
        img_size: output height and width.
        max_pixels: the most pixels (width x height) accepted; ``None`` for no limit.

    Returns:
        A float32 ``(img_size, img_size, 3)`` array of 0..255 RGB values.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: the image has more than ``max_pixels`` pixels (a ``ValueError``).
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
        ValueError: the bytes are not a decodable image.
    """
    import tensorflow as tf

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

    Args:
        path: the file to check.
        min_side: the smallest accepted width and height, in pixels.
        max_pixels: the largest accepted width times height.

    Returns:
        ``None`` when the image is usable, else a short reason: ``empty``, ``undecodable``,
        ``truncated``, ``too_small`` or ``pixel_limit``, followed by details.
    """
    from PIL import Image

    p = Path(path)
    if p.stat().st_size == 0:
        return "empty: 0 bytes"
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
        with Image.open(p, formats=IMAGE_FORMATS) as im:
            fmt = im.format or "image"
            if im.size != (width, height):
                return f"undecodable: header sizes disagree ({im.size[0]}x{im.size[1]} vs {width}x{height})"
            im.verify()
        with Image.open(p, formats=IMAGE_FORMATS) as im:
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
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            expected = np.asarray(im.convert("RGB"))
        if pixels.shape != expected.shape or not np.array_equal(pixels.numpy(), expected):
            return (f"undecodable: TensorFlow, the decoder training uses, reads this {fmt} "
                    f"({im.mode} mode) with other pixel values than its own colours")
    return None


