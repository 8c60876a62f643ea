"""Uploaded images: checks before decoding, then decoding with the training pipeline's own code.

Each upload is checked in this order, and the first failure answers the whole request with a
4xx (no partial answers):

1. size: empty (400) or above ``max_file_bytes`` (413);
2. header (Pillow, or for DICOM pydicom, reads only the header; nothing is decoded): not an image
   (415), a format not in :data:`ACCEPTED_FORMATS` (415), or more than ``max_pixels`` pixels (413:
   a decompression bomb, or an image far larger than any radiograph). DICOM is recognised by
   content (``DICM`` at byte 128), whatever the part's type or name (a JPEG sent as
   ``application/dicom`` is read as a JPEG); a part declared DICOM (``application/dicom``,
   ``.dcm``) that is no image at all answers 415 saying it is not a DICOM Part 10 file; a DICOM header
   the decoder refuses answers 415 for a non-image object or an unsupported encoding
   (``not_image``, ``unsupported``) and 422 for a broken file (``truncated``, ``undecodable``),
   with the reason;
3. the request's pixel budget: the sum of width x height over its images, from their headers,
   above ``max_request_pixels`` (413). Decoding costs memory and time in proportion to the
   pixels, not the bytes (a 47 KB 7000 x 7000 greyscale PNG takes about 1.1 GB and 3.7 s), so
   these limits, not the byte limits, bound what one request can cost;
4. decoding with :func:`covid_tasks.images.load_image`, exactly as training, ``evaluate`` and
   ``predict`` decode: any ``ValueError`` (truncated or corrupt data, files Pillow reads but
   TensorFlow does not, the decoder's own limits) answers 422.

Steps 1-3 (:func:`check_request`) run before the request takes an inference slot.
"""

from __future__ import annotations

import io
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from covid_tasks.dicom import is_dicom
from covid_tasks.images import FORMATS


@dataclass(frozen=True)
class ImageFormat:
    """One accepted file format.

    Attributes:
        name: the name people read ("JPEG").
        pillow: the Pillow format names of such files (the header check).
        media_types: MIME types, for the page's file picker.
        extensions: file name endings, for the page's file picker.
    """

    name: str
    pillow: tuple[str, ...]
    media_types: tuple[str, ...]
    extensions: tuple[str, ...]


#: Pillow's names of each format's files (the header check); Pillow reads no DICOM header, which
#: :mod:`covid_tasks.dicom` checks instead.
_PILLOW_NAMES = {"JPEG": ("JPEG", "MPO"), "DICOM": ()}
#: The formats the service accepts, in the order shown: the one list behind the header check,
#: the 415 messages, the page (drop zone text, file picker) and the OpenAPI description. It is
#: :data:`covid_tasks.images.FORMATS`, the formats the one decoder (and so training) reads.
ACCEPTED_FORMATS: tuple[ImageFormat, ...] = tuple(
    ImageFormat(name, _PILLOW_NAMES.get(name, (name,)), (media,), extensions)
    for name, (media, extensions) in FORMATS.items())
_DICOM_MEDIA, _DICOM_EXTENSIONS = FORMATS["DICOM"]


def accepted_names() -> str:
    """``"JPEG, PNG, BMP or GIF"``: the accepted formats in words."""
    names = [f.name for f in ACCEPTED_FORMATS]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def accept_attribute() -> str:
    """The ``accept`` attribute of a file input: every accepted MIME type and file ending."""
    return ",".join([*(m for f in ACCEPTED_FORMATS for m in f.media_types),
                     *(e for f in ACCEPTED_FORMATS for e in f.extensions)])


def _decodable() -> frozenset[str]:
    return frozenset(p for f in ACCEPTED_FORMATS for p in f.pillow)
_TF_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")


class BadInputError(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's file name, its bytes and the part's declared media type."""

    filename: str
    data: bytes
    content_type: str = ""

    @property
    def dicom(self) -> bool:
        """A DICOM Part 10 file, by content."""
        return is_dicom(self.data)

    @property
    def declared_dicom(self) -> bool:
        """Declared DICOM by media type or file name, whatever its content."""
        return (self.content_type.split(";")[0].strip().lower() == _DICOM_MEDIA
                or self.filename.lower().endswith(_DICOM_EXTENSIONS))


def check_upload(upload: Upload, max_file_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Check size and header without decoding; return ``(format, width, height)``.

    Raises:
        BadInputError: empty (400), too large (413), not an image (415), an unsupported format
            (415), or more than ``max_pixels`` pixels (413).
    """
    from PIL import Image, UnidentifiedImageError

    name = upload.filename
    if not upload.data:
        raise BadInputError(400, f"'{name}' is empty")
    if len(upload.data) > max_file_bytes:
        raise BadInputError(413, f"'{name}' is {len(upload.data) / 2**20:.1f} MiB; the limit is "
                                 f"{max_file_bytes / 2**20:.0f} MiB per file")
    if upload.dicom:
        return _check_dicom(upload, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data)) as img:
                fmt, (width, height) = img.format or "unknown", img.size
    except Image.DecompressionBombError as exc:  # Pillow's own, far higher limit
        raise BadInputError(413, f"'{name}' is a decompression bomb ({exc}); the limit is "
                                 f"{max_pixels / 1e6:g} Mpx per image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        if upload.declared_dicom:
            raise BadInputError(415, f"'{name}' is declared DICOM but is not a DICOM Part 10 file (no "
                                     "'DICM' at byte 128); send the file as the PACS exports it") from None
        raise BadInputError(415, f"'{name}' is not an image; send a chest X-ray as "
                                 f"{accepted_names()}") from None
    if fmt not in _decodable():
        raise BadInputError(415, f"'{name}' is a {fmt} image; send {accepted_names()}")
    if width * height > max_pixels:
        raise _too_many_pixels(name, width, height, max_pixels)
    return fmt, width, height


def _too_many_pixels(name: str, width: int, height: int, max_pixels: int) -> BadInputError:
    """413 for an image over the per-image pixel limit (any format)."""
    return BadInputError(413, f"'{name}' is {width} x {height} = {width * height / 1e6:.1f} Mpx; "
                              f"the limit is {max_pixels / 1e6:g} Mpx per image (a decompression "
                              f"bomb?); send it downscaled")


def _check_dicom(upload: Upload, max_pixels: int) -> tuple[str, int, int]:
    """:func:`check_upload` for a DICOM part: its header only, every refusal with its reason."""
    from covid_tasks.dicom import DicomError, DicomTooLargeError, dicom_size

    name = upload.filename
    try:
        width, height = dicom_size(upload.data, max_pixels)
    except DicomTooLargeError as exc:
        raise _too_many_pixels(name, exc.width, exc.height, max_pixels) from None
    except DicomError as exc:
        status = 415 if exc.reason in ("not_image", "unsupported") else 422
        raise BadInputError(status, f"'{name}' is a DICOM file the model cannot use: {exc}") from None
    return "DICOM", width, height


def check_request(uploads: Sequence[Upload], max_file_bytes: int, max_pixels: int,
                  max_request_pixels: int) -> int:
    """Check every upload (:func:`check_upload`), then the request's pixel budget; nothing is decoded.

    Args:
        uploads: the files of one request.
        max_file_bytes: per-file size limit.
        max_pixels: per-image pixel limit (width x height).
        max_request_pixels: the limit on the sum of width x height over the request's images.

    Returns:
        The request's pixels in all.

    Raises:
        BadInputError: the first upload that fails a check, or 413 for a request over the budget.
    """
    sizes = [check_upload(upload, max_file_bytes, max_pixels) for upload in uploads]
    total = sum(width * height for _, width, height in sizes)
    if total > max_request_pixels:
        raise BadInputError(413, f"the {len(uploads)} images of this request have {total / 1e6:.1f} Mpx "
                                 f"in all; the limit is {max_request_pixels / 1e6:g} Mpx per request "
                                 f"(decoding costs memory and time per pixel): send fewer or smaller "
                                 f"images, or several requests")
    return total


def decode_uploads(uploads: Sequence[Upload], img_size: int, max_pixels: int, threads: int = 2
                   ) -> np.ndarray:
    """Decode uploads that passed :func:`check_request` with :func:`covid_tasks.images.load_image`.

    Args:
        uploads: the files of one request.
        img_size: the model's input size.
        max_pixels: per-image pixel limit (``load_image`` checks the header again).
        threads: parallel decoders.

    Returns:
        float32 ``(n, img_size, img_size, 3)`` raw 0..255 RGB, in upload order.

    Raises:
        BadInputError: the first upload that does not decode (422).
    """
    with tempfile.TemporaryDirectory(prefix="covid-serve-") as tmp:
        paths = []
        for i, upload in enumerate(uploads):
            path = Path(tmp) / f"{i:04d}"
            path.write_bytes(upload.data)
            paths.append(path)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
            items = zip(uploads, paths, strict=True)
            return np.stack(list(pool.map(lambda item: _decode(*item, img_size, max_pixels), items)))


def _decode(upload: Upload, path: Path, img_size: int, max_pixels: int) -> np.ndarray:
    from covid_tasks.images import load_image

    try:
        return load_image(path, img_size, max_pixels=max_pixels)
    except ValueError as exc:
        reason = _TF_NODE.sub("", str(exc).replace(str(path), "the file"))
        raise BadInputError(422, f"'{upload.filename}' cannot be decoded: {reason}") from None
