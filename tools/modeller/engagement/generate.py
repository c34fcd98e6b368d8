"""Synthetic webcam clips with known affect levels, for the demo models, the tests and the demo.

Every clip shows one real face (the astronaut of ``skimage.data.astronaut()``, public domain),
warped and pasted on a generated room background, so OpenCV's Haar cascade finds it as it would
in a webcam frame. The four levels (0 very low … 3 very high, order of ``AFFECTS``) are drawn
into the face in ways a face crop keeps, each on its own image property:

| affect      | what it changes, level 0 → 3                                                        |
|-------------|-------------------------------------------------------------------------------------|
| engagement  | head turned away (yaw 36°, 24°, 12°, 0°: frontal when very engaged) and wandering     |
|             | across the frame (the wander is cancelled by the crop; the yaw is not)                |
| boredom     | head tilted (roll 0°, 5°, 10°, 15°, side drawn per clip)                              |
| confusion   | face out of focus (Gaussian blur of 0, 1.5, 3, 4.5 % of the face box side)            |
| frustration | shaking: independent per-frame roll and yaw jitter (sd 0°, 1.3°, 2.6°, 3.9° roll;     |
|             | twice that in yaw), so it shows as frame-to-frame change whatever the sampling rate, |
|             | and a frown: creases between the eyebrows, darker with the level (0, 12, 24, 36 %)   |

The face's size, place, mirror image, exposure and the background vary per clip; sensor noise
per frame. ``make_clip_with_boxes`` also gives the face box a Haar detector reports in each frame;
``clip_crops`` cuts the faces there without running one (optionally with the boxes strayed as a
detector's do, ``BoxNoise``), rendering only what the crops need. The levels are independent of each other and of these nuisances. None of this is a
model of real affect: it is a learnable signal so the demo models have something to find.

    tessera-generate-clip out_dir --levels 3,0,0,2 --frames 60
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from services.engagement.features import AFFECTS, CROP_SIZE, face_crop

LEVELS = 4
FPS = 30.0
# The astronaut's head, and the Haar cascade's box on the full image (x 177, y 66, side 95) in
# this patch's coordinates.
_HEAD = (slice(0, 220), slice(120, 340))
_HEAD_BOX = (57.0, 66.0, 95.0)
# Between the eyebrows, in the patch: where a frown's creases go.
_CREASES_X = (100, 106)
_CREASES_Y = (89, 101)
# Pixels the face box side spans in the frame (a webcam at arm's length).
_SIDE_RANGE = (110.0, 160.0)

Box = tuple[int, int, int, int]
LevelsLike = Mapping[str, int] | Sequence[int] | np.ndarray


@dataclass(frozen=True)
class Face:
    """A face patch (BGR float32), its alpha mask, and where a detector sees the face in it."""

    bgr: np.ndarray
    alpha: np.ndarray
    center: tuple[float, float]
    side: float


@functools.cache
def _astronaut() -> Face:
    from skimage import data

    rgb = data.astronaut()[_HEAD]
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR).astype(np.float32)
    h, w = bgr.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    # An ellipse over hair, face, chin and collar, feathered so the paste leaves no hard edge.
    cv2.ellipse(alpha, (107, 105), (78, 100), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 3)
    x, y, side = _HEAD_BOX
    return Face(bgr, alpha, (x + side / 2, y + side / 2), side)


def _furrowed(face: Face, depth: float) -> Face:
    """The face with two vertical creases between the eyebrows (a frown), `depth` 0-1 darkening."""
    if depth <= 0:
        return face
    creases = np.zeros(face.alpha.shape, np.float32)
    for x in _CREASES_X:
        cv2.line(creases, (x, _CREASES_Y[0]), (x, _CREASES_Y[1]), 1.0, 2, cv2.LINE_AA)
    shade = 1.0 - depth * cv2.GaussianBlur(creases, (0, 0), 0.7)
    return Face(face.bgr * shade[:, :, None], face.alpha, face.center, face.side)


def _mirrored(face: Face) -> Face:
    w = face.bgr.shape[1]
    return Face(
        np.ascontiguousarray(face.bgr[:, ::-1]),
        np.ascontiguousarray(face.alpha[:, ::-1]),
        (w - face.center[0], face.center[1]),
        face.side,
    )


def as_levels(levels: LevelsLike) -> np.ndarray:
    """Levels as an int array in AFFECTS order, from a {affect: level} mapping or a sequence."""
    if isinstance(levels, Mapping):
        unknown = set(levels) - set(AFFECTS)
        if unknown or len(levels) != len(AFFECTS):
            raise ValueError(f"levels need exactly the affects {AFFECTS}, got {sorted(levels)}")
        levels = [levels[a] for a in AFFECTS]
    out = np.asarray(levels, dtype=np.int64).reshape(-1)
    if out.shape != (len(AFFECTS),) or out.min() < 0 or out.max() >= LEVELS:
        raise ValueError(f"levels must be {len(AFFECTS)} integers in 0..{LEVELS - 1}, got {list(out)}")
    return out


@dataclass(frozen=True)
class _Style:
    """Everything one clip draws once: levels made concrete, plus the nuisances."""

    face: Face
    # The face patch as uint8 BGRA: exposure applied, focus blur applied in patch space (once per
    # clip rather than per frame: the warp is nearly a similarity, so blurring by sigma / scale
    # before it is blurring by sigma after it).
    face_bgra: np.ndarray
    background: np.ndarray  # uint8 BGR, exposure applied
    side: float
    start: tuple[float, float]
    wander: float  # amplitude of the head's wander, pixels
    wander_phase: tuple[float, float]
    yaw: float  # degrees, signed
    roll: float
    shake: float  # per-frame roll sd, degrees; yaw sd is twice this


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # A smooth wall with a few blurred furniture blocks: texture for the detector to reject.
    base = rng.uniform(40, 220, (3, 4, 3)).astype(np.float32)
    bg = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(2, 5)):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(40, width // 2)), y0 + int(rng.integers(40, height // 2))
        cv2.rectangle(bg, (x0, y0), (x1, y1), tuple(float(v) for v in rng.uniform(30, 230, 3)), -1)
    return cv2.GaussianBlur(bg, (0, 0), 3)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)  # + 0.5: round, not truncate


def _face_bgra(face: Face, gain: float, bias: float, blur: float) -> np.ndarray:
    bgra: np.ndarray = np.dstack([face.bgr * gain + bias, face.alpha * 255.0])
    if blur > 0:
        bgra = cv2.GaussianBlur(bgra, (0, 0), blur)
    return _to_uint8(bgra)


def _style(levels: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> _Style:
    height, width = size
    engagement, boredom, confusion, frustration = (int(v) for v in levels)
    face = _furrowed(_astronaut(), 0.12 * frustration)
    if rng.random() < 0.5:
        face = _mirrored(face)
    side = float(rng.uniform(*_SIDE_RANGE)) * min(1.0, height / 480)
    wander = (LEVELS - 1 - engagement) * 0.04 * width
    # Keep the whole head (about 2.3 box sides tall) in frame, wander included.
    reach = 1.2 * side
    x_lo, x_hi = reach + wander, width - reach - wander
    y_lo, y_hi = reach + 0.5 * wander, height - reach - 0.5 * wander
    start = (float(rng.uniform(x_lo, max(x_lo, x_hi))), float(rng.uniform(y_lo, max(y_lo, y_hi))))
    gain, bias = float(rng.uniform(0.75, 1.15)), float(rng.uniform(-15, 15))
    return _Style(
        face=face,
        face_bgra=_face_bgra(face, gain, bias, 0.015 * confusion * face.side),
        background=_to_uint8(_background(rng, height, width) * gain + bias),
        side=side,
        start=start,
        wander=wander,
        wander_phase=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi))),
        yaw=12.0 * (LEVELS - 1 - engagement) * float(rng.choice([-1.0, 1.0])),
        roll=5.0 * boredom * float(rng.choice([-1.0, 1.0])),
        shake=1.3 * frustration,
    )


def _homography(face: Face, center: tuple[float, float], scale: float, roll: float, yaw: float) -> np.ndarray:
    """Face patch -> frame: the face as a plane turned by `yaw` about its vertical axis (seen from
    three box sides away), rolled, scaled, and its box centre put at `center`."""
    cx, cy = face.center
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    f, phi = 3.0 * face.side, math.radians(yaw)
    turn = np.array([[f * math.cos(phi), 0, 0], [0, f, 0], [math.sin(phi), 0, f]], np.float64)
    c, s = math.cos(math.radians(roll)) * scale, math.sin(math.radians(roll)) * scale
    place = np.array([[c, -s, center[0]], [s, c, center[1]], [0, 0, 1]], np.float64)
    return place @ turn @ to_origin


@dataclass(frozen=True)
class _Pose:
    """One frame's draw: where the face is and how it is turned, and its noise seed."""

    homography: np.ndarray  # face patch -> frame
    center: tuple[float, float]
    box: Box
    noise_seed: int


def _pose(style: _Style, t: float, rng: np.random.Generator) -> _Pose:
    p1, p2 = style.wander_phase
    # Slow (0.1 Hz): a tracker that re-detects every few frames keeps up with it.
    center = (
        style.start[0] + style.wander * math.sin(2 * math.pi * 0.1 * t + p1),
        style.start[1] + 0.5 * style.wander * math.sin(2 * math.pi * 0.07 * t + p2),
    )
    roll = style.roll + float(np.clip(rng.normal(0, style.shake), -2 * style.shake, 2 * style.shake))
    yaw = style.yaw + float(np.clip(rng.normal(0, 2 * style.shake), -4 * style.shake, 4 * style.shake))
    h = _homography(style.face, center, style.side / style.face.side, roll, yaw)
    side = style.side * _detector_scale(yaw)
    box = (round(center[0] - side / 2), round(center[1] - side / 2), round(side), round(side))
    return _Pose(h, center, box, int(rng.integers(0, 2**31 - 1)))


def _detector_scale(yaw: float) -> float:
    # The Haar cascade's box side over the frontal one as the head turns (measured on these clips
    # with the default and the service's detector settings: 1.02 frontal, 0.9-0.95 at 36 degrees).
    return 1.02 - 0.10 * (yaw / 36.0) ** 2


@dataclass(frozen=True)
class BoxNoise:
    """How a real detector's boxes stray from the true one, for training crops: a fresh error per
    detection (centre and size, as shares of the side; Haar's 10 % pyramid steps show in the size),
    kept for `hold` frames as a tracker that re-detects every few frames does."""

    center_sd: float = 0.012
    size_sd: float = 0.045
    hold: tuple[int, int] = (1, 5)


def _noisy_boxes(boxes: list[Box], noise: BoxNoise, rng: np.random.Generator) -> list[Box]:
    hold = int(rng.integers(noise.hold[0], noise.hold[1] + 1))
    out: list[Box] = []
    for i, (x, y, w, h) in enumerate(boxes):
        if i % hold:  # between detections a tracker keeps the last box, wherever the face is now
            out.append(out[-1])
            continue
        dx, dy = rng.normal(0, noise.center_sd, 2)
        side = w * math.exp(rng.normal(0, noise.size_sd))
        cx, cy = x + w / 2 + dx * w, y + h / 2 + dy * h
        out.append((round(cx - side / 2), round(cy - side / 2), round(side), round(side)))
    return out


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1


def _intersect(a: Rect, b: Rect) -> Rect:
    return max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])


def _draw(style: _Style, pose: _Pose, window: Rect) -> np.ndarray:
    """The frame's pixels inside `window` (the whole frame, or only what a crop needs: rendering
    just the crop's window is what makes training-set generation cheap)."""
    wx0, wy0, wx1, wy1 = window
    out = style.background[wy0:wy1, wx0:wx1].copy()
    ph, pw = style.face_bgra.shape[:2]
    corners = cv2.perspectiveTransform(
        np.array([[[0, 0], [pw, 0], [0, ph], [pw, ph]]], np.float32), pose.homography
    )[0]
    lo, hi = np.floor(corners.min(axis=0)).astype(int) - 2, np.ceil(corners.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = _intersect((int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])), window)
    if x1 > x0 and y1 > y0:
        shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
        warped = cv2.warpPerspective(
            style.face_bgra, shift @ pose.homography, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR
        )
        bgr, alpha = cv2.cvtColor(warped, cv2.COLOR_BGRA2BGR), warped[:, :, 3].astype(np.float32) / 255
        roi = out[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
        roi[:] = cv2.blendLinear(bgr, roi, alpha, 1.0 - alpha)
    _add_noise(out, window, style, pose)
    return out


def _add_noise(out: np.ndarray, window: Rect, style: _Style, pose: _Pose) -> None:
    # Sensor noise (luma, sd 2 grey levels) over the box grown by a quarter each side: all a
    # face crop sees, at a fraction of a whole frame's cost. Drawn over the whole square whatever
    # the window, so a window shows the same noise as the full frame. OpenCV's RNG is per thread.
    height, width = style.background.shape[:2]
    cx, cy = pose.center
    half = 0.75 * style.side
    area = _intersect((int(cx - half), int(cy - half), int(cx + half), int(cy + half)), (0, 0, width, height))
    noise = np.empty((area[3] - area[1], area[2] - area[0]), np.int16)
    cv2.setRNGSeed(pose.noise_seed)
    cv2.randn(noise, 0, 2)  # type: ignore[call-overload]  # OpenCV's stubs want arrays; mean and sd may be numbers
    x0, y0, x1, y1 = _intersect(area, window)
    if x1 <= x0 or y1 <= y0:
        return
    wx0, wy0 = window[:2]
    patch = out[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    noisy = patch.astype(np.int16) + noise[y0 - area[1] : y1 - area[1], x0 - area[0] : x1 - area[0], None]
    patch[:] = np.clip(noisy, 0, 255)


def _poses(levels: LevelsLike, n_frames: int, size: tuple[int, int], seed: int) -> tuple[_Style, list[_Pose]]:
    if n_frames < 1:
        raise ValueError("a clip needs at least one frame")
    rng = np.random.default_rng(seed)
    style = _style(as_levels(levels), size, rng)
    return style, [_pose(style, i / FPS, rng) for i in range(n_frames)]


def make_clip_with_boxes(
    levels: LevelsLike, n_frames: int = 60, size: tuple[int, int] = (480, 640), seed: int = 0
) -> tuple[list[np.ndarray], list[Box]]:
    """BGR uint8 frames [height, width, 3] and the face box (x, y, w, h) in each, as a detector sees it."""
    style, poses = _poses(levels, n_frames, size, seed)
    whole = (0, 0, size[1], size[0])
    return [_draw(style, p, whole) for p in poses], [p.box for p in poses]


def make_clip(
    levels: LevelsLike, n_frames: int = 60, size: tuple[int, int] = (480, 640), seed: int = 0
) -> list[np.ndarray]:
    """A clip showing the given affect levels: BGR uint8 frames [height, width, 3]."""
    return make_clip_with_boxes(levels, n_frames, size, seed)[0]


def clip_crops(
    levels: LevelsLike,
    n_frames: int = 30,
    size: tuple[int, int] = (480, 640),
    seed: int = 0,
    margin: float = 0.1,
    box_noise: BoxNoise | None = None,
) -> np.ndarray:
    """The clip's face crops [n_frames, 64, 64] uint8 at the known face boxes (no detector), or
    at boxes strayed from them as a detector's do (``box_noise``, its own random stream).

    The frames are ``make_clip``'s with the same arguments, rendered only inside each crop's
    window (a shifted warp could in principle move a pixel by a grey level; none seen).
    """
    style, poses = _poses(levels, n_frames, size, seed)
    boxes = [p.box for p in poses]
    if box_noise is not None:
        boxes = _noisy_boxes(boxes, box_noise, np.random.default_rng([seed, 1]))
    height, width = size
    crops = np.empty((n_frames, CROP_SIZE, CROP_SIZE), np.uint8)
    for i, (pose, (x, y, w, h)) in enumerate(zip(poses, boxes, strict=True)):
        # The window face_crop cuts from the whole frame (same rounding and clipping).
        dx, dy = round(margin * w), round(margin * h)
        window = _intersect((x - dx, y - dy, x + w + dx, y + h + dy), (0, 0, width, height))
        pixels = _draw(style, pose, window)
        crops[i] = face_crop(pixels, (x - window[0], y - window[1], w, h), margin)
    return crops


def random_levels(rng: np.random.Generator, n: int) -> np.ndarray:
    """n independent, uniformly drawn level vectors [n, 4]."""
    return rng.integers(0, LEVELS, size=(n, len(AFFECTS)))


def make_dataset(
    n_clips: int,
    n_frames: int = 30,
    seed: int = 0,
    size: tuple[int, int] = (480, 640),
    box_noise: BoxNoise | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops [n_clips, n_frames, 64, 64] uint8, levels [n_clips, 4] and each clip's seed."""
    rng = np.random.default_rng(seed)
    levels = random_levels(rng, n_clips)
    seeds = rng.integers(0, 2**31 - 1, n_clips)
    crops = np.empty((n_clips, n_frames, CROP_SIZE, CROP_SIZE), np.uint8)
    for i in range(n_clips):
        crops[i] = clip_crops(levels[i], n_frames, size, int(seeds[i]), box_noise=box_noise)
    return crops, levels, seeds


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """A frame as JPEG bytes (what a client sends)."""
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {frame.dtype} {frame.shape} frame as JPEG")
    return data.tobytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-generate-clip", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for the frames (JPEG)")
    p.add_argument("--levels", default="3,0,0,0", help="engagement,boredom,confusion,frustration (0-3)")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(make_clip(levels, args.frames, seed=args.seed)):
        (args.out / f"{i:04d}.jpg").write_bytes(encode_jpeg(frame))
    print(f"{args.frames} frames with levels {dict(zip(AFFECTS, levels, strict=True))} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
