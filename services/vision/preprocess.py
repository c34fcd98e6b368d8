"""Face-crop preprocessing, driven by the `preprocess.json` stored beside each model.

The order is the training order and must not change: colour conversion -> CLAHE (optional) ->
resize to the input size -> /255 -> (x - mean) / std -> layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from services.runtime.config import StrictModel, load_json_model
from services.runtime.errors import InvalidArgument

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}


class ClaheParams(StrictModel):
    clip_limit: float = Field(gt=0)
    tile_grid: tuple[int, int]
    # "gray": on the grey image (for a colour model: grey, CLAHE, then replicated to 3 channels, the
    # usual way grey-trained FER networks take colour input); "lab_l": on the L channel of LAB.
    space: Literal["gray", "lab_l"]

    @model_validator(mode="after")
    def _grid(self) -> ClaheParams:
        if min(self.tile_grid) < 1:
            raise ValueError(f"tile_grid must be positive, got {list(self.tile_grid)}")
        return self


class PreprocessParams(StrictModel):
    input_name: str
    output_name: str
    input_size: tuple[int, int] = Field(description="[height, width] of the model input.")
    color: Literal["gray", "rgb", "bgr"]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    clahe: ClaheParams | None = None
    interpolation: Literal["linear", "area", "cubic"] = "linear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temperature: float = Field(1.0, gt=0)
    class_names: tuple[str, ...] = Field(min_length=1)

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def pixels_key(self) -> str:
        """What the preprocessed batch depends on: models with equal keys share one batch."""
        return self.model_dump_json(
            include={"input_size", "color", "layout", "clahe", "interpolation", "mean", "std"}
        )

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessParams:
        if min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {list(self.input_size)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"color {self.color!r} needs {self.channels} mean and std values, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        if self.clahe is not None and self.clahe.space == "lab_l" and self.color == "gray":
            raise ValueError("clahe space 'lab_l' needs a colour input (color 'rgb' or 'bgr')")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names has duplicates")
        return self


def load_params(path: str | Path) -> PreprocessParams:
    """Read and validate a model's preprocess.json; ConfigError messages name the file."""
    return load_json_model(PreprocessParams, path, "preprocessing parameters")


def _convert(crop: np.ndarray, color: str) -> np.ndarray:
    if crop.ndim == 2:  # a grey crop: accepted for convenience
        if color == "gray":
            return crop
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    if color == "gray":
        return cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    if color == "rgb":
        return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
    return crop


def _apply_clahe(img: np.ndarray, space: str, color: str, clahe: cv2.CLAHE) -> np.ndarray:
    rgb = color == "rgb"
    if space == "lab_l":
        to_lab = cv2.COLOR_RGB2LAB if rgb else cv2.COLOR_BGR2LAB
        from_lab = cv2.COLOR_LAB2RGB if rgb else cv2.COLOR_LAB2BGR
        lab = cv2.cvtColor(img, to_lab)
        lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
        return cv2.cvtColor(lab, from_lab)
    if img.ndim == 2:
        return clahe.apply(img)
    to_gray = cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY
    from_gray = cv2.COLOR_GRAY2RGB if rgb else cv2.COLOR_GRAY2BGR
    return cv2.cvtColor(clahe.apply(cv2.cvtColor(img, to_gray)), from_gray)


def preprocess_faces(crops: list[np.ndarray], params: PreprocessParams) -> np.ndarray:
    """BGR uint8 face crops to the model's float32 input batch (N, C, H, W) or (N, H, W, C)."""
    height, width = params.input_size
    channels = params.channels
    # A fresh CLAHE per batch: the object is cheap and not safe to share between threads.
    clahe = (
        cv2.createCLAHE(clipLimit=params.clahe.clip_limit, tileGridSize=tuple(params.clahe.tile_grid))
        if params.clahe is not None
        else None
    )
    interpolation = _INTERPOLATION[params.interpolation]
    batch = np.empty((len(crops), height, width, channels), dtype=np.uint8)
    for i, crop in enumerate(crops):
        bad_shape = crop.ndim not in (2, 3) or (crop.ndim == 3 and crop.shape[2] != 3)
        if crop.dtype != np.uint8 or bad_shape or crop.size == 0:
            raise InvalidArgument(
                f"face crop {i} must be a non-empty BGR uint8 image, got {crop.dtype} {crop.shape}"
            )
        img = _convert(crop, params.color)
        if clahe is not None and params.clahe is not None:
            img = _apply_clahe(img, params.clahe.space, params.color, clahe)
        img = cv2.resize(img, (width, height), interpolation=interpolation)
        batch[i] = img.reshape(height, width, channels)
    if params.layout == "NCHW":
        pixels = batch.transpose(0, 3, 1, 2)
        shape = (1, channels, 1, 1)
    else:
        pixels = batch
        shape = (1, 1, 1, channels)
    # (x/255 - mean)/std == x * (1/(255 std)) - mean/std: two in-place passes over the batch,
    # coefficients in float64 then rounded once, so it agrees with the plain formula to ~1 ulp.
    mean = np.asarray(params.mean, dtype=np.float64)
    std = np.asarray(params.std, dtype=np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
    offset = (mean / std).astype(np.float32).reshape(shape)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, scale, out=out)
    np.subtract(out, offset, out=out)
    return out
