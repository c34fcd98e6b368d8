"""Safe image decoding: dimensions come from the header and are checked before any pixel is decoded.

Only PNG and JPEG are accepted. For both, small bounds-checked parsers read the size from the header
(PNG IHDR, JPEG SOFn); a file whose width*height exceeds the pixel limit is refused with
ResourceExhausted without the decoder ever seeing it, so a tiny compressed "bomb" (a zero-filled
30000x30000 PNG is ~2.7 MB) cannot make the process allocate gigabytes. Anything undecodable is
InvalidArgument with a message that says what was wrong.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from services.runtime.config import MIB, StrictModel
from services.runtime.errors import InvalidArgument, ResourceExhausted

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

# Allowed PNG bit depths per colour type (PNG spec, table 11.1).
_PNG_DEPTHS: dict[int, tuple[int, ...]] = {
    0: (1, 2, 4, 8, 16),  # greyscale
    2: (8, 16),  # truecolour
    3: (1, 2, 4, 8),  # indexed
    4: (8, 16),  # greyscale + alpha
    6: (8, 16),  # truecolour + alpha
}

# SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9

RAW_CHANNELS: dict[str, int] = {"gray8": 1, "rgb8": 3, "bgr8": 3, "rgba8": 4}


class DecodeLimits(StrictModel):
    max_pixels: int = Field(40_000_000, gt=0, description="Largest width*height accepted.")
    max_encoded_bytes: int = Field(20 * MIB, gt=0, description="Largest encoded image accepted.")


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: Literal["png", "jpeg"]
    width: int
    height: int
    bit_depth: int


def _png_header(data: bytes) -> ImageHeader:
    # Signature (8) + IHDR length (4) + type (4) + 13 bytes of fields + CRC (4).
    if len(data) < 8 + 8 + 13 + 4:
        raise InvalidArgument(f"truncated PNG: {len(data)} bytes, too short for the IHDR header")
    length, ctype = struct.unpack_from(">I4s", data, 8)
    if ctype != b"IHDR" or length != 13:
        raise InvalidArgument("corrupt PNG: the first chunk is not a 13-byte IHDR")
    body = data[16:29]
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise InvalidArgument("corrupt PNG: IHDR checksum mismatch")
    width, height, depth, color, compression, filt, interlace = struct.unpack(">IIBBBBB", body)
    if width == 0 or height == 0:
        raise InvalidArgument(f"PNG has an empty size {width}x{height}")
    if width > 2**31 - 1 or height > 2**31 - 1:
        raise InvalidArgument(f"corrupt PNG: size {width}x{height} is beyond the PNG maximum")
    if depth not in _PNG_DEPTHS.get(color, ()):
        raise InvalidArgument(f"corrupt PNG: bit depth {depth} with colour type {color} is not valid")
    if compression != 0 or filt != 0 or interlace not in (0, 1):
        raise InvalidArgument("corrupt PNG: unknown compression, filter or interlace method")
    return ImageHeader("png", width, height, depth)


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk the marker segments up to the first SOS; exactly one SOFn must precede it."""
    n = len(data)
    pos = 2
    found: ImageHeader | None = None
    while True:
        # Markers may be preceded by any number of 0xFF fill bytes.
        if pos >= n or data[pos] != 0xFF:
            if pos >= n:
                raise InvalidArgument("truncated JPEG: no scan (SOS) found in the header")
            raise InvalidArgument(f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise InvalidArgument("truncated JPEG: ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == _JPEG_EOI or marker == 0xD8:
            raise InvalidArgument("corrupt JPEG: image ends before its first scan")
        if pos + 2 > n:
            raise InvalidArgument("truncated JPEG: ends inside a segment length")
        (seg_len,) = struct.unpack_from(">H", data, pos)
        if seg_len < 2 or pos + seg_len > n:
            raise InvalidArgument(f"truncated or corrupt JPEG: segment 0x{marker:02X} overruns the data")
        if marker in _JPEG_SOF:
            if found is not None:
                # Two frame headers: a decoder might honour either, so trust neither.
                raise InvalidArgument("corrupt JPEG: more than one frame header (SOF)")
            if seg_len < 8:
                raise InvalidArgument("corrupt JPEG: frame header (SOF) too short")
            precision, height, width, ncomp = struct.unpack_from(">BHHB", data, pos + 2)
            if height == 0 or width == 0:
                # Height 0 means "given later by a DNL marker": legal but rare, and unverifiable here.
                raise InvalidArgument(f"JPEG has an empty or deferred size {width}x{height}")
            if ncomp not in (1, 3, 4) or seg_len < 8 + 3 * ncomp:
                raise InvalidArgument(f"corrupt JPEG: frame header with {ncomp} components")
            found = ImageHeader("jpeg", width, height, precision)
        if marker == _JPEG_SOS:
            if found is None:
                raise InvalidArgument("corrupt JPEG: scan (SOS) before any frame header (SOF)")
            # libjpeg pads a truncated scan with grey and reports success; an EOI after the scan
            # header is the cheap evidence that the entropy-coded data is complete.
            if data.rfind(b"\xff\xd9", pos + seg_len) < 0:
                raise InvalidArgument("truncated JPEG: no end-of-image marker after the scan")
            return found
        pos += seg_len


def read_header(data: bytes) -> ImageHeader:
    """Format and size of an encoded image, from its header alone; InvalidArgument if unreadable."""
    if not data:
        raise InvalidArgument("empty image: no bytes")
    if data.startswith(PNG_SIGNATURE):
        return _png_header(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_header(data)
    raise InvalidArgument("unsupported or unrecognised image format (accepted: PNG, JPEG)")


def _check_pixels(width: int, height: int, limits: DecodeLimits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise ResourceExhausted(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


def _to_bgr8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        # Exact rescale 0..65535 -> 0..255 (v*255/65535 = v/257), rounded; the decoder's own 8-bit
        # path drops the low byte instead, which is biased downwards.
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise InvalidArgument(f"unsupported sample type {img.dtype} in the decoded image")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


def decode_image(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Decode a PNG or JPEG into a BGR uint8 HxWx3 array, checking its size before decoding it."""
    if len(data) > limits.max_encoded_bytes:
        raise ResourceExhausted(
            f"encoded image is {len(data)} bytes, over the limit of {limits.max_encoded_bytes}"
        )
    header = read_header(data)
    _check_pixels(header.width, header.height, limits, f"{header.format.upper()} image")
    # PNG: ANYDEPTH keeps 16-bit samples so they are rescaled properly below; COLOR expands palette
    # and grey and drops alpha. JPEG: plain COLOR (a 12-bit JPEG is then reduced by the decoder).
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH if header.format == "png" else cv2.IMREAD_COLOR
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise InvalidArgument(f"corrupt {header.format.upper()}: the decoder failed ({exc.err})") from None
    if img is None or img.size == 0:
        raise InvalidArgument(f"corrupt or truncated {header.format.upper()}: the decoder could not read it")
    # The decoder may apply EXIF orientation (swapping axes), so compare the pixel count only.
    if img.shape[0] * img.shape[1] != header.width * header.height:
        raise InvalidArgument(
            f"corrupt {header.format.upper()}: decoded size {img.shape[1]}x{img.shape[0]} "
            f"disagrees with the header's {header.width}x{header.height}"
        )
    return np.ascontiguousarray(_to_bgr8(img))


def raw_to_bgr(height: int, width: int, fmt: str, data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Raw interleaved pixels (gray8, rgb8, bgr8, rgba8; rows top to bottom) to BGR uint8 HxWx3."""
    channels = RAW_CHANNELS.get(fmt)
    if channels is None:
        raise InvalidArgument(f"unknown raw pixel format {fmt!r} (accepted: {', '.join(RAW_CHANNELS)})")
    if height <= 0 or width <= 0:
        raise InvalidArgument(f"raw image has an empty size {width}x{height}")
    _check_pixels(width, height, limits, "raw image")
    expected = height * width * channels
    if len(data) != expected:
        raise InvalidArgument(f"raw {fmt} image of {width}x{height} needs {expected} bytes, got {len(data)}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    if fmt == "gray8":
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if fmt == "rgb8":
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    if fmt == "rgba8":
        return cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGR)
    return pixels.copy()  # bgr8: a writable copy, not a view of the request's bytes
