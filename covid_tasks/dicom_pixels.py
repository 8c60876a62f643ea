"""DICOM pixel data to display grey: decoding, Bits Stored, modality LUT, VOI LUT or window, MONOCHROME1.

The lower half of :mod:`covid_tasks.dicom`, which reads headers and decides what to refuse and
calls :func:`stored_pixels` and :func:`display_grey` only on what it accepted. This module holds
the refusal type both raise and the transfer syntax tables. Compressed pixel data is decoded by
the pylibjpeg plugins only (named explicitly, so a machine with Pillow or pyjpegls installed
decodes exactly like one without), after the codestream's own size is checked against the header.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any

#: The reason a refusal's message starts with (then ``": "`` and details).
REASONS = ("empty", "truncated", "undecodable", "unsupported", "not_image", "pixel_limit")
#: Without a VOI LUT or window, these percentiles of the image map to 0 and 255.
MINMAX_PERCENTILES = (0.5, 99.5)

NATIVE = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
}
_JPEG = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
}
_J2K = {
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}
#: Transfer syntax UID -> name: the uncompressed ones, JPEG, JPEG-LS, JPEG 2000, HTJ2K and RLE.
SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {**NATIVE, **_JPEG, **_J2K,
                                               "1.2.840.10008.1.2.5": "RLE Lossless"}
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # 0xF7: JPEG-LS SOF55
_TRUNCATION = re.compile(r"truncat|end of (the )?(file|data|buffer|stream)|less than (the )?expected|"
                         r"no tag to read|unexpected end|fewer bytes|not enough", re.IGNORECASE)


class DicomError(ValueError):
    """A DICOM file this project refuses, with a machine-usable reason.

    Attributes:
        reason: one of :data:`REASONS`; the message is ``"<reason>: <details>"``, and never
            quotes a header's text (a patient's name, ID, dates...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_truncation(error: BaseException | str) -> bool:
    """Whether a library's exception (or warning text) says that the data ended early."""
    return isinstance(error, (EOFError, struct.error)) or bool(_TRUNCATION.search(str(error)))


def stored_pixels(ds: Any, transfer_syntax: str, rows: int, columns: int, bits_stored: int,
                  signed: bool) -> Any:
    """Decode a single-frame grey image's stored values, honouring Bits Stored.

    Args:
        ds: the pydicom dataset, already accepted (one frame, one sample, supported syntax).
        transfer_syntax: its transfer syntax UID, a key of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
        rows: Rows from the header.
        columns: Columns from the header.
        bits_stored: Bits Stored; higher bits are dropped (and the sign extended when signed).
        signed: Pixel Representation 1.

    Returns:
        An integer numpy array ``(rows, columns)``.

    Raises:
        DicomError: a codestream declaring another size than the header, or pixel data that
            does not decode (``truncated`` or ``undecodable``).
    """
    import pydicom.pixels

    name = SUPPORTED_TRANSFER_SYNTAXES[transfer_syntax]
    expected = rows * columns * int(ds.BitsAllocated) // 8
    if transfer_syntax in NATIVE and len(ds.PixelData) < expected:  # checked before pydicom allocates
        raise DicomError("truncated", f"{len(ds.PixelData)} bytes of pixel data where {rows}x{columns} "
                                      f"pixels need {expected}")
    try:
        if transfer_syntax not in NATIVE:
            _check_codestream(_first_fragment(ds.PixelData), transfer_syntax, (rows, columns))
        options = {} if transfer_syntax in NATIVE else {"decoding_plugin": "pylibjpeg"}
        arr = pydicom.pixels.pixel_array(ds, **options)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile data
        kind = "truncated" if is_truncation(exc) else "undecodable"
        raise DicomError(kind, f"the {name} pixel data cannot be decoded ({type(exc).__name__})") from None
    if arr.shape != (rows, columns) or arr.dtype.kind not in "iu":
        raise DicomError("undecodable", f"the {name} pixel data decodes to {arr.shape} {arr.dtype}, "
                                        f"not ({rows}, {columns}) integers")
    if bits_stored < arr.dtype.itemsize * 8:
        arr = arr.astype("int64") & ((1 << bits_stored) - 1)
        if signed:
            arr = arr - ((arr >> (bits_stored - 1)) << bits_stored)
    return arr


def display_grey(arr: Any, ds: Any, photometric: str, bits_stored: int, signed: bool) -> Any:
    """Stored values to display grey: modality LUT, then VOI LUT, first window or min-max, MONOCHROME1.

    Args:
        arr: stored values from :func:`stored_pixels`.
        ds: the dataset, for Rescale Slope/Intercept or the Modality LUT, the VOI LUT Sequence,
            Window Center/Width/VOI LUT Function and Pixel Padding Value.
        photometric: ``MONOCHROME1`` (inverted: its minimum is white) or ``MONOCHROME2``.
        bits_stored: Bits Stored (8-bit unsigned data without a modality or VOI LUT is taken as is).
        signed: Pixel Representation 1.

    Returns:
        A uint8 numpy array of the same shape, bone bright.

    Raises:
        DicomError: a modality LUT, VOI LUT or window that cannot be applied (``undecodable``).
    """
    import numpy as np
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        window = _first_window(ds)
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
            table = apply_voi_lut(np.arange(first, first + (entries or 65536), dtype=np.int64), ds, index=0)
            low, high = float(np.min(table)), float(np.max(table))  # the LUT's own output range
            lut_out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
            out = (np.asarray(lut_out, np.float64) - low) * (255.0 / max(high - low, 1e-12))
        elif window is not None:
            out = _apply_window(values, *window)
        elif bits_stored <= 8 and not signed and np.array_equal(values, arr):
            out = values  # 8-bit display values, identity modality LUT: taken as they are
        else:
            out = _min_max(values, _padding(arr, ds))
    except Exception as exc:  # noqa: BLE001 - a hostile LUT or window; never echo its values
        raise DicomError("undecodable", f"the modality or VOI LUT cannot be applied ({type(exc).__name__})") \
            from None
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _first_fragment(pixel_data: bytes) -> bytes:
    """The start (64 KiB) of the first fragment after the Basic Offset Table of encapsulated data."""
    pos = length = 0
    for _ in range(2):  # the Basic Offset Table item, then the first fragment's item
        if len(pixel_data) < pos + 8:
            raise DicomError("truncated", "the encapsulated pixel data ends before its first fragment")
        group, elem, length = struct.unpack_from("<HHI", pixel_data, pos)
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise DicomError("undecodable", "broken encapsulation (no item where one must be)")
        pos += 8 + length
    return pixel_data[pos - length:min(pos, pos - length + 65536)]


def _check_codestream(fragment: bytes, transfer_syntax: str, expected: tuple[int, int]) -> None:
    """Refuse a codestream whose own header declares another size than the DICOM header (a bomb)."""
    if transfer_syntax in _J2K:
        size = _j2k_size(fragment)
    elif transfer_syntax in _JPEG:
        size = _jpeg_size(fragment)
    else:
        return  # RLE: the decoder writes into rows x columns from the DICOM header
    name = SUPPORTED_TRANSFER_SYNTAXES[transfer_syntax]
    if size is None:
        raise DicomError("undecodable", f"the {name} codestream has no readable size")
    if size != expected:
        raise DicomError("undecodable", f"the {name} codestream is {size[1]}x{size[0]} but the header "
                                        f"declares {expected[1]}x{expected[0]} (columns x rows)")


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG or JPEG-LS start-of-frame segment."""
    if buf[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(buf):
        if buf[pos] != 0xFF:
            pos += 1  # stray bytes between segments
            continue
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            pos += 2
        elif marker in _JPEG_SOF:
            return struct.unpack_from(">HH", buf, pos + 5) if pos + 9 <= len(buf) else None
        elif marker in (0xD9, 0xDA):
            return None
        else:
            pos += 2 + struct.unpack_from(">H", buf, pos + 2)[0]
    return None


def _j2k_size(buf: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG 2000 SIZ segment (a JP2 wrapper is skipped)."""
    pos = 0
    if buf.startswith(b"\x00\x00\x00\x0cjP  "):
        while pos + 8 <= len(buf) and buf[pos + 4:pos + 8] != b"jp2c":
            box = struct.unpack_from(">I", buf, pos)[0]
            if box < 8:
                return None
            pos += box
        pos += 8
    if buf[pos:pos + 4] != b"\xff\x4f\xff\x51" or len(buf) < pos + 24:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", buf, pos + 8)
    return ysiz - y0, xsiz - x0


def _first_window(ds: Any) -> tuple[float, float, str] | None:
    """The first ``(center, width, function)`` of the header, ``None`` when absent or unusable."""
    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)

    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center, width = first(center), first(width)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    except Exception:  # noqa: BLE001 - malformed windows count as absent
        return None
    minimum = 0.0 if function == "LINEAR_EXACT" else 1.0
    if not (minimum < width < 1e12 and abs(center) < 1e12):
        return None
    return center, width, function


def _apply_window(values: Any, center: float, width: float, function: str) -> Any:
    """DICOM PS3.3 C.11.2.1.2 windowing (LINEAR, LINEAR_EXACT, SIGMOID), straight to 0..255."""
    import numpy as np

    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0) * 255.0


def _min_max(values: Any, padding: Any) -> Any:
    """The robust min-max: :data:`MINMAX_PERCENTILES` of the non-padding pixels to 0 and 255."""
    import numpy as np

    stats = values[~padding] if padding is not None and not padding.all() else values
    low, high = np.percentile(stats, MINMAX_PERCENTILES)
    if high <= low:  # a mostly flat image: fall back to its full range
        low, high = float(stats.min()), float(stats.max())
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def _padding(arr: Any, ds: Any) -> Any:
    """Pixels equal to Pixel Padding Value (or in its range), or ``None`` without one."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        pad = int(ds.PixelPaddingValue)
        limit = int(ds.get("PixelPaddingRangeLimit", pad))
    except Exception:  # noqa: BLE001 - malformed padding values count as absent
        return None
    return (arr >= min(pad, limit)) & (arr <= max(pad, limit))
