"""DICOM chest films: header facts without pixels, and one decoder to the model's raw 0..255 RGB.

Only DICOM Part 10 files are read (``DICM`` at byte 128, then a file meta header naming the
transfer syntax); raw datasets without it are refused. :func:`read_header` (from
:mod:`covid_tasks.dicom_header`, the reading half) never decodes pixels (values over 64 KiB are
not even read); :func:`check_header` applies every refusal a header can
decide, including the pixel limit (rows x columns against ``max_pixels``), so
:func:`decode_dicom` refuses a bomb before any pixel is decoded. The display pipeline is the
standard one: modality LUT (rescale), then the VOI LUT or the first window, else a robust
min-max; MONOCHROME1 is inverted so that bone is bright, as in the PNGs. docs/dicom.md has the
rules, the supported transfer syntaxes and the refusal reasons.

Every refusal is a :class:`DicomError` (a ``ValueError``) whose message starts with a reason from
:data:`REASONS` and a colon, like ``pull``'s reasons for other formats. No message, log record or
returned value carries a patient's name, ID, birth date or accession number: pydicom's own log
records (which quote header values) are dropped while this module reads, its warnings are
ignored, and the patient ID is only ever returned as a keyed one-way hash (:func:`patient_hash`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from covid_tasks.dicom_header import (
    DEFER_BYTES,
    MAX_INFLATED_BYTES,
    MIN_KEY_BYTES,
    PATIENT_HASH_KEY,
    DicomHeader,
    Source,
    load_patient_hash_key,
    patient_hash,
    quiet,
    read_dataset,
    read_header,
    uid_name,
)
from covid_tasks.dicom_pixels import (
    MINMAX_PERCENTILES,
    REASONS,
    SUPPORTED_TRANSFER_SYNTAXES,
    DicomError,
    display_grey,
    stored_pixels,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFER_BYTES", "MAX_INFLATED_BYTES", "DicomError", "DicomHeader", "DicomTooLargeError",
           "MINMAX_PERCENTILES", "MIN_KEY_BYTES", "PATIENT_HASH_KEY", "REASONS",
           "SUPPORTED_TRANSFER_SYNTAXES", "Source",
           "check_header", "decode_dicom", "dicom_size", "header_metadata", "is_dicom", "load_dicom",
           "load_patient_hash_key", "patient_hash", "read_header"]
_XRAY_SOP = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")


class DicomTooLargeError(DicomError):
    """A header that declares more pixels than the limit; refused before decoding.

    Attributes:
        width: columns declared in the header.
        height: rows declared in the header.
        max_pixels: the limit it exceeds (width x height).
    """

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__("pixel_limit", f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                        f"{max_pixels} pixels; refused before decoding")
        self.width, self.height, self.max_pixels = width, height, max_pixels


def is_dicom(source: Source) -> bool:
    """Whether ``source`` is a DICOM Part 10 file: ``DICM`` at byte 128, after the preamble.

    Args:
        source: the file's bytes, or its path.

    Returns:
        ``True`` for a Part 10 file; ``False`` for anything else, raw datasets without file meta
        included (:func:`decode_dicom` refuses those).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    with open(source, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def check_header(header: DicomHeader, max_pixels: int | None) -> None:
    """Refuse what a header alone shows this decoder cannot or must not decode.

    Args:
        header: from :func:`read_header`.
        max_pixels: the most pixels (rows x columns) accepted; ``None`` for no limit.

    Raises:
        DicomTooLargeError: more pixels than ``max_pixels`` (reason ``pixel_limit``).
        DicomError: a non-image SOP class or no pixel data (``not_image``), a header that ends
            before its pixel data (``truncated``), bad dimensions (``undecodable``), an unknown
            transfer syntax, float pixels, several frames, colour or an odd bit depth
            (``unsupported``).
    """
    name = header.sop_class
    if name != header.sop_class_uid and "Image Storage" not in name:
        raise DicomError("not_image", f"SOP class {name} holds no image")
    if header.pixel_data in ("FloatPixelData", "DoubleFloatPixelData"):
        raise DicomError("unsupported", f"{header.pixel_data} (float pixels, not a film)")
    if not header.pixel_data:
        if header.rows is not None:
            raise DicomError("truncated", "the file ends before its pixel data")
        raise DicomError("not_image", "no pixel data")
    ts = header.transfer_syntax_uid
    if not ts:
        raise DicomError("unsupported", "the file meta header names no transfer syntax")
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomError("unsupported", f"transfer syntax {uid_name(ts)}")
    rows, cols = header.rows, header.columns
    if not rows or not cols or rows < 0 or cols < 0:
        raise DicomError("undecodable", "Rows or Columns missing, zero or not a number")
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomTooLargeError(cols, rows, max_pixels)
    if header.frames is None or header.frames < 1:
        raise DicomError("undecodable", "Number of Frames is not a positive number")
    if header.frames > 1:
        raise DicomError("unsupported", f"{header.frames} frames (a chest film has one)")
    if header.samples_per_pixel != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = header.photometric if re.fullmatch(r"[A-Z0-9_ ]{1,16}", header.photometric) else "unknown"
        raise DicomError("unsupported", f"colour image ({shown}, {header.samples_per_pixel} samples per "
                                        "pixel); chest films are grey")
    alloc, stored = header.bits_allocated, header.bits_stored
    if alloc not in (8, 16, 32) or stored is None or not 1 <= stored <= alloc:
        raise DicomError("unsupported", f"bit depth {stored} stored in {alloc} allocated")
    if header.pixel_representation not in (0, 1):
        raise DicomError("undecodable", "Pixel Representation is neither 0 nor 1")


def dicom_size(source: Source, max_pixels: int | None) -> tuple[int, int]:
    """Width and height of a decodable DICOM film, from its header only (like ``image_size``).

    Args:
        source: the file's bytes, or its path.
        max_pixels: the most pixels accepted; ``None`` for no limit.

    Returns:
        ``(width, height)`` = ``(Columns, Rows)``.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: see :func:`read_header` and :func:`check_header`.
    """
    header = read_header(source)
    check_header(header, max_pixels)
    return int(header.columns or 0), int(header.rows or 0)


def header_metadata(source: Source | DicomHeader, key: bytes = PATIENT_HASH_KEY) -> dict[str, Any]:
    """The header's answers to ``metadata.csv``'s questions, in its vocabulary (docs/dicom.md).

    Args:
        source: the file's bytes or path, or a header from :func:`read_header`.
        key: HMAC key for the patient hash, when ``source`` is not a header.

    Returns:
        ``{"view", "modality", "body_part", "patient_hash"}``: ``view`` is ``PA``, ``AP``,
        ``AP Supine``, ``AP Erect``, ``L``, another ViewPosition as written or ``""``;
        ``modality`` is ``X-ray`` (CR, DX, RG), ``CT``, another code as written or ``""``;
        ``patient_hash`` is ``None`` without a patient ID.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        DicomError: see :func:`read_header`.
    """
    header = source if isinstance(source, DicomHeader) else read_header(source, key)
    modality = header.modality.upper()
    if modality in ("CR", "DX", "DR", "RG") or (not modality and header.sop_class_uid in _XRAY_SOP):
        modality = "X-ray"
    return {"view": _view(header), "modality": modality, "body_part": header.body_part,
            "patient_hash": header.patient_hash}


def decode_dicom(data: bytes | bytearray | memoryview, max_pixels: int | None) -> Any:
    """Decode a DICOM film to the raw 0..255 RGB the model takes (grey in all three channels).

    Args:
        data: the file's bytes.
        max_pixels: the most pixels (rows x columns) accepted, checked on the header before any
            pixel is decoded; ``None`` for no limit.

    Returns:
        A numpy uint8 array ``(rows, columns, 3)``.

    Raises:
        DicomTooLargeError: more pixels than ``max_pixels``.
        DicomError: anything else this decoder refuses, with its reason (never another type).
    """
    import numpy as np

    header, ds = read_dataset(data)
    check_header(header, max_pixels)
    rows, columns, bits = int(header.rows or 0), int(header.columns or 0), int(header.bits_stored or 0)
    signed = header.pixel_representation == 1
    with quiet():
        arr = stored_pixels(ds, header.transfer_syntax_uid, rows, columns, bits, signed)
        grey = display_grey(arr, ds, header.photometric, bits, signed)
    logger.debug("dicom: decoded %dx%d %s %s", columns, rows, header.photometric,
                 SUPPORTED_TRANSFER_SYNTAXES[header.transfer_syntax_uid])
    return np.repeat(grey[:, :, None], 3, axis=2)


def load_dicom(path: str | Path, max_pixels: int | None) -> Any:
    """:func:`decode_dicom` for a file, whose header is checked before the rest is read.

    Args:
        path: the DICOM file.
        max_pixels: the most pixels accepted; ``None`` for no limit.

    Returns:
        A numpy uint8 array ``(rows, columns, 3)``.

    Raises:
        FileNotFoundError: the file does not exist.
        DicomError: see :func:`decode_dicom`.
    """
    dicom_size(path, max_pixels)
    return decode_dicom(Path(path).read_bytes(), max_pixels)


def _view(header: DicomHeader) -> str:
    """ViewPosition (or the View Code Sequence) in metadata.csv's vocabulary."""
    view = {"PA": "PA", "AP": "AP", "LL": "L", "RL": "L", "L": "L", "LAT": "L", "LATERAL": "L"}.get(
        header.view_position, header.view_position)
    if not view:
        code = header.view_code.replace("-", "").replace(" ", "")
        view = next((v for word, v in (("posteroanterior", "PA"), ("anteroposterior", "AP"), ("lateral", "L"))
                     if word in code), "")
    if view == "AP":
        orientation = header.patient_orientation
        if header.patient_position in ("HFS", "FFS") or "supine" in orientation:
            return "AP Supine"
        if any(word in orientation for word in ("erect", "standing", "upright")):
            return "AP Erect"
    return view
