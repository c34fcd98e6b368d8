"""Face crops and HOG features of the engagement models.

The crop (grey, 64x64) feeds both models: HOG over each crop, averaged over the clip's frames, is
the XGBoost boosters' input; a stack of crops is the temporal network's. The HOG parameters are
stored as ``hog.json`` beside each booster (docs/architecture.md: preprocessing lives with the model).

HOG is OpenCV's ``HOGDescriptor`` (Dalal & Triggs): one 64x64 window, [-1, 0, 1] gradients, unsigned
orientations, votes interpolated between neighbouring bins and cells, a Gaussian window over each
block, L2-Hys block normalisation. Its layout: blocks column by column (x outer), within a block
the cells column by column, then the bins. ``skimage.feature.hog`` differs (hard bin and cell
votes, no Gaussian block window, row-major layout), so the two agree closely but not exactly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
from pydantic import Field, model_validator

from services.fusion.rules import AFFECTS
from services.runtime.config import StrictModel, load_json_model
from services.runtime.errors import InvalidArgument
from services.vision.faces import Box, Margins, crop_view

__all__ = ["AFFECTS", "CROP_SIZE", "HOG_FILENAME", "HogParams", "clip_hog", "face_crop", "hog_features"]

CROP_SIZE = 64
HOG_FILENAME = "hog.json"


def face_crop(
    frame_bgr: np.ndarray, box: tuple[int, int, int, int], margin: float | Margins = 0.1
) -> np.ndarray:
    """The face as a grey CROP_SIZE x CROP_SIZE uint8 image.

    ``box`` is (x, y, w, h) in frame pixels; each side grows by ``margin`` of the box's side (or by
    its own ratio, given `Margins`: the detector's, services.vision.faces), the result is clipped to
    the frame and resized with INTER_AREA (the crop is nearly always shrunk). A BGR or grey uint8
    frame is accepted.
    """
    if frame_bgr.dtype != np.uint8 or frame_bgr.ndim not in (2, 3) or frame_bgr.size == 0:
        raise InvalidArgument(f"face_crop needs a uint8 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
    x, y, w, h = (int(v) for v in box)
    margins = margin if isinstance(margin, Margins) else Margins.even(margin)
    crop = crop_view(frame_bgr, Box(x, y, w, h), margins=margins)  # no copy: converted just below
    if crop.ndim == 3:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    return cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)


class HogParams(StrictModel):
    """What the HOG descriptor depends on; sizes in pixels unless named in cells."""

    size: int = Field(CROP_SIZE, gt=0, description="Side of the square window (the crop).")
    orientations: int = Field(9, gt=0, description="Unsigned orientation bins over 0-180 degrees.")
    cell: int = Field(8, gt=0, description="Cell side in pixels.")
    block: int = Field(2, gt=0, description="Block side in cells.")
    block_stride: int = Field(1, gt=0, description="Block step in cells.")
    gamma_correction: bool = Field(True, description="Square root of the pixels before gradients.")
    l2hys_threshold: float = Field(0.2, gt=0, le=1, description="L2-Hys clipping bound.")

    @model_validator(mode="after")
    def _fits(self) -> HogParams:
        if self.size % self.cell:
            raise ValueError(f"size {self.size} is not a multiple of the cell {self.cell}")
        cells = self.size // self.cell
        if self.block > cells or (cells - self.block) % self.block_stride:
            raise ValueError(
                f"blocks of {self.block} cells at stride {self.block_stride} do not tile {cells} cells"
            )
        return self

    @property
    def blocks_per_side(self) -> int:
        return (self.size // self.cell - self.block) // self.block_stride + 1

    @property
    def dimension(self) -> int:
        return self.blocks_per_side**2 * self.block**2 * self.orientations

    @classmethod
    def load(cls, path: str | Path) -> HogParams:
        """Read and validate a hog.json; ConfigError messages name the file."""
        return load_json_model(cls, path, "HOG parameters")

    def dumps(self) -> str:
        return json.dumps(self.model_dump(), indent=2) + "\n"


@functools.lru_cache(maxsize=8)
def _descriptor(params: HogParams) -> cv2.HOGDescriptor:
    # compute() keeps no state between calls, so one descriptor per parameter set is shared.
    cell = (params.cell, params.cell)
    block = (params.cell * params.block,) * 2
    stride = (params.cell * params.block_stride,) * 2
    return cv2.HOGDescriptor(
        (params.size, params.size),
        block,
        stride,
        cell,
        params.orientations,
        1,
        -1.0,
        cv2.HOGDESCRIPTOR_L2HYS,
        params.l2hys_threshold,
        params.gamma_correction,
    )


def hog_features(crops: np.ndarray, params: HogParams) -> np.ndarray:
    """HOG of each crop: [n, size, size] uint8 -> [n, params.dimension] float32."""
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 3 or crops.shape[1:] != (params.size, params.size):
        raise InvalidArgument(
            f"HOG needs [n, {params.size}, {params.size}] uint8 crops, got {crops.dtype} {list(crops.shape)}"
        )
    hog = _descriptor(params)
    out = np.empty((len(crops), params.dimension), np.float32)
    for i, crop in enumerate(crops):
        out[i] = np.ravel(hog.compute(np.ascontiguousarray(crop)))
    return out


def clip_hog(crops: np.ndarray, params: HogParams) -> np.ndarray:
    """The boosters' input for one clip: the mean HOG over its frames, [params.dimension] float32."""
    if len(crops) == 0:
        raise InvalidArgument("a clip needs at least one face crop")
    return hog_features(crops, params).mean(axis=0, dtype=np.float64).astype(np.float32)
