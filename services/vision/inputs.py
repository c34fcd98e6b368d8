"""An image of a request before decoding (encoded bytes or raw pixels, maybe with face boxes),
its protobuf form, and its decoding: what every vision service takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.runtime.errors import InvalidArgument
from services.vision.decode import DecodeLimits, decode_image, raw_to_bgr
from services.vision.faces import Box
from tessera.common.v1 import common_pb2

_RAW_FORMATS = {
    common_pb2.PIXEL_FORMAT_GRAY8: "gray8",
    common_pb2.PIXEL_FORMAT_RGB8: "rgb8",
    common_pb2.PIXEL_FORMAT_BGR8: "bgr8",
    common_pb2.PIXEL_FORMAT_RGBA8: "rgba8",
}


@dataclass(frozen=True)
class RawPixels:
    height: int
    width: int
    format: str  # gray8 | rgb8 | bgr8 | rgba8
    data: bytes


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, before decoding."""

    encoded: bytes | None = None
    raw: RawPixels | None = None
    boxes: tuple[Box, ...] = ()
    is_face_crop: bool = False


def image_from_pb(msg: common_pb2.Image) -> ImageInput:
    """The message as an ImageInput; a message with no pixels is reported when it is decoded."""
    boxes = tuple(Box(b.x, b.y, b.width, b.height, 1.0) for b in msg.faces)
    source = msg.WhichOneof("source")
    if source == "encoded":
        return ImageInput(encoded=msg.encoded, boxes=boxes, is_face_crop=msg.is_face_crop)
    if source == "raw":
        fmt = _RAW_FORMATS.get(msg.raw.format)
        if fmt is None:
            raise InvalidArgument(f"raw image has an unknown pixel format {msg.raw.format}")
        raw = RawPixels(msg.raw.height, msg.raw.width, fmt, msg.raw.data)
        return ImageInput(raw=raw, boxes=boxes, is_face_crop=msg.is_face_crop)
    return ImageInput(boxes=boxes, is_face_crop=msg.is_face_crop)


def decode_input(image: ImageInput, limits: DecodeLimits) -> np.ndarray:
    """BGR uint8 pixels of the image, its size checked before decoding."""
    if image.encoded is not None:
        return decode_image(image.encoded, limits)
    if image.raw is not None:
        r = image.raw
        return raw_to_bgr(r.height, r.width, r.format, r.data, limits)
    raise InvalidArgument("image has neither encoded bytes nor raw pixels")
