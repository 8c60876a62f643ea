"""Image headers: width and height of a JPEG, PNG, BMP or GIF without decoding any pixel.

The header half of :func:`covid_tasks.images.image_size` (DICOM headers are read by
:mod:`covid_tasks.dicom_header`).
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_size(fh: BinaryIO) -> tuple[int, int] | None:
    """``(width, height)`` from the header at the start of ``fh``.

    Args:
        fh: a binary file positioned at its start.

    Returns:
        The size, or ``None`` when the file is none of these formats.

    Raises:
        EOFError: the header is cut short.
        struct.error: a field is cut short.
        ValueError: the file is empty, or its header is invalid.
    """
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
    return None
