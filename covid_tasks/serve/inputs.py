"""Uploaded images: checks before decoding, then decoding with the training pipeline's own code.

Each upload is checked in this order, and the first failure answers the whole request with a
4xx (no partial answers):

1. size: empty (400) or above ``max_file_bytes`` (413);
2. header (Pillow, or for DICOM pydicom, reads only the header; nothing is decoded): not an image
   (415), a format the training decoder does not read (415), or more than ``max_pixels`` pixels,
   a decompression bomb (422). DICOM is recognised by content (``DICM`` at byte 128), whatever
   the part's type or name (a JPEG sent as ``application/dicom`` is read as a JPEG); a part
   declared DICOM (``application/dicom``, ``.dcm``) that is no image at all answers 415 saying it
   is not a DICOM Part 10 file. A DICOM header the decoder refuses answers 415 for a
   non-image object or an unsupported encoding (``not_image``, ``unsupported``) and 422 for a
   broken file (``truncated``, ``undecodable``), with the reason;
3. decoding with :func:`covid_tasks.images.load_image`, exactly as training, ``evaluate`` and
   ``predict`` decode: any ``ValueError`` (truncated or corrupt data, files Pillow reads but
   TensorFlow does not, the decoder's own limits) answers 422.
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

from covid_tasks.images import FORMATS, IMAGE_FORMATS, is_dicom

#: Pillow format names of the files TensorFlow's decoders (and so training) read (MPO: a JPEG).
DECODABLE_FORMATS = frozenset(IMAGE_FORMATS) - {"DICOM"} | {"MPO"}
#: What the service takes, in words: "JPEG, PNG, DICOM, BMP or GIF".
FORMATS_TEXT = f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"
#: The page's file picker filter: every format's media type and extensions.
ACCEPT = ",".join(item for media, exts in FORMATS.values() for item in (media, *exts))
_DICOM_MEDIA, _DICOM_EXTENSIONS = FORMATS["DICOM"]
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
        BadInputError: empty, too large, not an image, an unsupported format, or too many pixels.
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
        raise BadInputError(422, f"'{name}' is a decompression bomb ({exc}); the limit is "
                                 f"{max_pixels / 1e6:.0f} Mpx") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        if upload.declared_dicom:
            raise BadInputError(415, f"'{name}' is declared DICOM but is not a DICOM Part 10 file (no "
                                     "'DICM' at byte 128); send the file as the PACS exports it") from None
        raise BadInputError(415, f"'{name}' is not an image; send a chest X-ray as {FORMATS_TEXT}") from None
    if fmt not in DECODABLE_FORMATS:
        raise BadInputError(415, f"'{name}' is a {fmt} image; send {FORMATS_TEXT}")
    if width * height > max_pixels:
        raise BadInputError(422, f"'{name}' is {width} x {height} = {width * height / 1e6:.0f} Mpx; "
                                 f"the limit is {max_pixels / 1e6:.0f} Mpx (a decompression bomb?)")
    return fmt, width, height


def _check_dicom(upload: Upload, max_pixels: int) -> tuple[str, int, int]:
    """:func:`check_upload` for a DICOM part: its header only, every refusal with its reason."""
    from covid_tasks.dicom import DicomError, DicomTooLargeError, dicom_size

    name = upload.filename
    try:
        width, height = dicom_size(upload.data, max_pixels)
    except DicomTooLargeError as exc:
        pixels = exc.width * exc.height
        raise BadInputError(422, f"'{name}' is {exc.width} x {exc.height} = {pixels / 1e6:.0f} Mpx; the "
                                 f"limit is {max_pixels / 1e6:.0f} Mpx (a decompression bomb?)") from None
    except DicomError as exc:
        status = 415 if exc.reason in ("not_image", "unsupported") else 422
        raise BadInputError(status, f"'{name}' is a DICOM file the model cannot use: {exc}") from None
    return "DICOM", width, height


def decode_uploads(uploads: Sequence[Upload], img_size: int, max_file_bytes: int, max_pixels: int,
                   threads: int = 2) -> np.ndarray:
    """Check every upload, then decode all of them with :func:`covid_tasks.images.load_image`.

    Args:
        uploads: the files of one request.
        img_size: the model's input size.
        max_file_bytes: per-file size limit.
        max_pixels: per-image pixel limit.
        threads: parallel decoders.

    Returns:
        float32 ``(n, img_size, img_size, 3)`` raw 0..255 RGB, in upload order.

    Raises:
        BadInputError: the first upload that fails a check or does not decode.
    """
    for upload in uploads:
        check_upload(upload, max_file_bytes, max_pixels)
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
