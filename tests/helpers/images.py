"""Hand-made image bytes for tests: PNG chunks and a decompression bomb."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_bytes(width: int, height: int, depth: int, color: int, idat: bytes, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_bomb(path: Path, side: int = 30000) -> bytes:
    """A valid zero-filled side×side 8-bit grey PNG: ~2.7 MB encoded, 900 MB decoded (30000²)."""
    if not path.exists():
        comp = zlib.compressobj(9)
        row = b"\x00" * (1 + side)  # filter byte 0 + one row of zero samples
        parts = [comp.compress(row) for _ in range(side)]
        parts.append(comp.flush())
        path.write_bytes(png_bytes(side, side, 8, 0, b"".join(parts)))
    return path.read_bytes()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height
