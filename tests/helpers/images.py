"""Hand-built image files the usual encoders do not write: bombs' headers and RLE8 BMPs."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries only a few rows: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rle8_bmp(pixels: np.ndarray) -> bytes:
    """An 8-bit grey BMP with run-length encoding (BI_RLE8): Pillow reads it, TensorFlow cannot.

    Args:
        pixels: ``(height, width)`` uint8 grey levels.
    """
    height, width = pixels.shape
    data = bytearray()
    for y in range(height - 1, -1, -1):  # bottom-up rows
        row, x = pixels[y], 0
        while x < width:
            run = 1
            while x + run < width and row[x + run] == row[x] and run < 255:
                run += 1
            data += bytes([run, int(row[x])])
            x += run
        data += b"\x00\x00"  # end of line
    data += b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + bytes(data)
