"""services.vision: safe decode, face detection, preprocessing."""

from __future__ import annotations

import json
import resource
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from services.runtime.config import ConfigError
from services.runtime.errors import InvalidArgument, ResourceExhausted
from services.vision.decode import DecodeLimits, decode_image, raw_to_bgr, read_header
from services.vision.faces import (
    Box,
    FaceDetector,
    HaarConfig,
    HaarDetector,
    build_detector,
    crop_with_margin,
    iou,
)
from services.vision.preprocess import PreprocessParams, load_params, preprocess_faces
from tests.helpers.images import png_bytes as _png
from tests.helpers.images import png_chunk as _chunk

LIMITS = DecodeLimits()
EMOTIONS = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


# ----------------------------------------------------------------------------- helpers


def _encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)


# ----------------------------------------------------------------------------- decode


def test_png_round_trip_is_exact(astronaut: np.ndarray) -> None:
    out = decode_image(_encode(".png", astronaut), LIMITS)
    assert out.dtype == np.uint8 and out.shape == astronaut.shape
    np.testing.assert_array_equal(out, astronaut)


def test_jpeg_round_trip(astronaut: np.ndarray) -> None:
    jpg = _encode(".jpg", astronaut)
    out = decode_image(jpg, LIMITS)
    assert out.shape == astronaut.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR))
    assert np.abs(out.astype(int) - astronaut).mean() < 3


def test_grayscale_and_rgba_png(astronaut: np.ndarray) -> None:
    gray = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    out = decode_image(_encode(".png", gray), LIMITS)
    assert out.shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)

    bgra = np.dstack([astronaut, np.arange(astronaut.size // 3, dtype=np.uint8).reshape(astronaut.shape[:2])])
    np.testing.assert_array_equal(decode_image(_encode(".png", bgra), LIMITS), astronaut)


def test_palette_png() -> None:
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]  # RGB
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    rows = b"".join(b"\x00" + bytes([(r[0] << 6) | (r[1] << 4) | (r[2] << 2) | r[3]]) for r in indices)
    plte = _chunk(b"PLTE", bytes(v for rgb in palette for v in rgb))
    trns = _chunk(b"tRNS", bytes([255, 128, 0, 255]))  # transparency is dropped, colour kept
    out = decode_image(_png(4, 2, 2, 3, zlib.compress(rows), plte + trns), LIMITS)
    expected = np.array([[palette[i][::-1] for i in row] for row in indices], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)


def _to8(v: np.ndarray) -> np.ndarray:
    return np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16bit_png_scaled_to_8bit() -> None:
    rng = np.random.default_rng(0)
    bgr16 = rng.integers(0, 65536, size=(7, 9, 3), dtype=np.uint16)
    bgr16[0, :4, 0] = [0, 128, 65535, 32896]  # edges and a rounding boundary
    np.testing.assert_array_equal(decode_image(_encode(".png", bgr16), LIMITS), _to8(bgr16))

    gray16 = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    out = decode_image(_encode(".png", gray16), LIMITS)
    np.testing.assert_array_equal(out, np.repeat(_to8(gray16)[:, :, None], 3, axis=2))

    # 16-bit grey + alpha (colour type 4), written by hand: alpha must be dropped.
    ga = np.dstack([gray16, np.full_like(gray16, 1234)]).astype(">u2")
    rows = b"".join(b"\x00" + ga[y].tobytes() for y in range(ga.shape[0]))
    out = decode_image(_png(6, 5, 16, 4, zlib.compress(rows)), LIMITS)
    np.testing.assert_array_equal(out, np.repeat(_to8(gray16)[:, :, None], 3, axis=2))


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 40, "format"),
        (np.random.default_rng(1).bytes(5000), "format"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated"),
        (b"\xff\xd8\xff", "truncated"),
    ],
)
def test_bad_bytes_are_invalid_argument(payload: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        decode_image(payload, LIMITS)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_and_corrupt(astronaut: np.ndarray, ext: str) -> None:
    data = _encode(ext, astronaut)
    for cut in (30, len(data) // 2, len(data) - 3):
        with pytest.raises(InvalidArgument):
            decode_image(data[:cut], LIMITS)
    corrupt = bytearray(data)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        corrupt[i] ^= 0x5A
    if ext == ".png":  # a flipped IDAT byte breaks the chunk CRC: libpng refuses it
        with pytest.raises(InvalidArgument):
            decode_image(bytes(corrupt), LIMITS)
    # A JPEG has no checksum, so corrupt entropy data may decode to garbage pixels: that is fine as
    # long as it never crashes and always gives a well-formed image or InvalidArgument.
    else:
        try:
            out = decode_image(bytes(corrupt), LIMITS)
            assert out.shape == astronaut.shape
        except InvalidArgument:
            pass


def test_random_bytes_behind_a_valid_signature() -> None:
    rng = np.random.default_rng(2)
    for prefix in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8"):
        for _ in range(20):
            with pytest.raises(InvalidArgument):
                decode_image(prefix + rng.bytes(int(rng.integers(0, 3000))), LIMITS)


def test_zero_size_headers() -> None:
    with pytest.raises(InvalidArgument, match="empty size 0x0"):
        decode_image(_png(0, 0, 8, 0, zlib.compress(b"")), LIMITS)
    with pytest.raises(InvalidArgument, match="checksum"):
        png = bytearray(_png(4, 4, 8, 0, zlib.compress(b"\x00" * 20)))
        png[19] = 9  # change the width without fixing the CRC
        decode_image(bytes(png), LIMITS)


def _patch_sof(jpg: bytes, width: int, height: int) -> bytes:
    i = jpg.index(b"\xff\xc0")
    return jpg[: i + 5] + struct.pack(">HH", height, width) + jpg[i + 9 :]


def test_jpeg_sof_sizes(astronaut: np.ndarray) -> None:
    jpg = _encode(".jpg", astronaut)
    assert (read_header(jpg).width, read_header(jpg).height) == (512, 512)
    with pytest.raises(ResourceExhausted, match="60000x50000"):
        decode_image(_patch_sof(jpg, 60000, 50000), LIMITS)
    with pytest.raises(InvalidArgument, match="empty or deferred"):
        decode_image(_patch_sof(jpg, 512, 0), LIMITS)


def test_png_bomb_is_refused_without_allocating(png_bomb: bytes) -> None:
    assert len(png_bomb) < 4 * 1024 * 1024
    header = read_header(png_bomb)
    assert (header.width, header.height) == (30000, 30000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ResourceExhausted, match="30000x30000"):
        decode_image(png_bomb, LIMITS)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 50, f"peak RSS grew by {grown_mib:.0f} MiB (decoded size would be ~860 MiB)"


def test_encoded_size_limit(astronaut: np.ndarray) -> None:
    with pytest.raises(ResourceExhausted, match="bytes"):
        decode_image(_encode(".png", astronaut), DecodeLimits(max_encoded_bytes=1000))
    with pytest.raises(ResourceExhausted):
        decode_image(_encode(".png", astronaut), DecodeLimits(max_pixels=512 * 512 - 1))


def test_raw_pixels(astronaut: np.ndarray) -> None:
    h, w = astronaut.shape[:2]
    rgb = astronaut[:, :, ::-1]
    np.testing.assert_array_equal(raw_to_bgr(h, w, "rgb8", rgb.tobytes(), LIMITS), astronaut)
    out = raw_to_bgr(h, w, "bgr8", astronaut.tobytes(), LIMITS)
    np.testing.assert_array_equal(out, astronaut)
    assert out.flags.writeable
    rgba = np.dstack([rgb, np.full((h, w), 7, np.uint8)])
    np.testing.assert_array_equal(raw_to_bgr(h, w, "rgba8", rgba.tobytes(), LIMITS), astronaut)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(raw_to_bgr(3, 4, "gray8", gray.tobytes(), LIMITS)[:, :, 1], gray)

    with pytest.raises(InvalidArgument, match="needs 786432 bytes, got 786431"):
        raw_to_bgr(h, w, "bgr8", astronaut.tobytes()[:-1], LIMITS)
    with pytest.raises(InvalidArgument, match="unknown raw pixel format"):
        raw_to_bgr(h, w, "yuv420", b"", LIMITS)
    with pytest.raises(InvalidArgument, match="empty size"):
        raw_to_bgr(0, 0, "gray8", b"", LIMITS)
    with pytest.raises(ResourceExhausted):
        raw_to_bgr(30000, 30000, "gray8", b"", LIMITS)


# ----------------------------------------------------------------------------- faces


def test_haar_finds_the_astronaut(astronaut: np.ndarray) -> None:
    detector = build_detector(HaarConfig())
    assert isinstance(detector, FaceDetector)
    full = detector.detect(astronaut)
    assert len(full) == 1
    face = full[0]
    assert 0.0 < face.score < 1.0
    assert 150 < face.x + face.w / 2 < 260 and 80 < face.y + face.h / 2 < 160  # the face, not the suit

    small = HaarDetector(HaarConfig(detect_max_side=256)).detect(astronaut)
    assert len(small) == 1
    assert iou(full[0], small[0]) > 0.7


def test_detection_runs_on_a_bounded_copy_by_default(astronaut: np.ndarray) -> None:
    from services.vision.faces import DEFAULT_DETECT_MAX_SIDE

    # Unbounded, a 6000² photo cost seconds of uninterruptible detection.
    assert HaarConfig().detect_max_side == DEFAULT_DETECT_MAX_SIDE == 1280
    detector = build_detector(HaarConfig())
    (face,) = detector.detect(astronaut)  # 512²: detected as it is
    # Upscaled 5× (2560²): detected on a 1280² copy, the box mapped back onto the big image.
    found = detector.detect(cv2.resize(astronaut, (2560, 2560)))
    scaled = Box(face.x * 5, face.y * 5, face.w * 5, face.h * 5)
    assert max(iou(b, scaled) for b in found) > 0.7


def test_blazeface_is_bounded_too_and_answers_in_original_pixels(
    astronaut: np.ndarray, model_repository: Path
) -> None:
    from services.vision.faces import DEFAULT_DETECT_MAX_SIDE, BlazeFaceConfig, BoundedDetector

    assert BlazeFaceConfig().detect_max_side == DEFAULT_DETECT_MAX_SIDE
    detector = build_detector(BlazeFaceConfig(), model_repository)
    assert isinstance(detector, BoundedDetector) and isinstance(detector, FaceDetector)
    (face,) = detector.detect(astronaut)
    (big,) = detector.detect(cv2.resize(astronaut, (2560, 2560)))  # on a 1280² copy, mapped back
    assert iou(big, Box(face.x * 5, face.y * 5, face.w * 5, face.h * 5)) > 0.9
    assert big.keypoints[2] == pytest.approx(tuple(5 * v for v in face.keypoints[2]), abs=10)


def test_any_detector_is_bounded_and_answers_in_original_pixels() -> None:
    from services.vision.faces import BoundedDetector, DetectorSettings

    seen: list[tuple[tuple[int, ...], int]] = []

    class Recording(BoundedDetector):
        def _find(self, image: np.ndarray, min_side: int) -> list[tuple[float, float, float, float, float]]:
            seen.append((image.shape, min_side))
            return [(100, 50, 64, 64, 0.9), (1270, 630, 64, 64, 0.5)]  # the second crosses the corner

    boxes = Recording(DetectorSettings(min_size=50)).detect(np.zeros((3000, 6000, 3), np.uint8))
    scale = 1280 / 6000
    assert seen == [((640, 1280, 3), round(50 * scale))]
    assert boxes == [Box(469, 234, 300, 300, 0.9), Box(5953, 2953, 47, 47, 0.5)]  # clipped to the image
    assert Recording(DetectorSettings(detect_max_side=None)).detect(np.zeros((3000, 6000), np.uint8))
    assert seen[-1] == ((3000, 6000), 50)


def test_haar_on_grey_and_blank(astronaut: np.ndarray) -> None:
    detector = HaarDetector()
    assert len(detector.detect(cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY))) == 1
    assert detector.detect(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector.detect(np.full((300, 300, 3), 200, np.uint8)) == []
    with pytest.raises(InvalidArgument):
        detector.detect(np.zeros((10, 10, 3), np.float32))


def test_crop_with_margin() -> None:
    img = np.arange(100 * 80 * 3, dtype=np.uint32).astype(np.uint8).reshape(100, 80, 3)
    box = Box(10, 20, 30, 40, 0.9)
    np.testing.assert_array_equal(crop_with_margin(img, box), img[20:60, 10:40])
    np.testing.assert_array_equal(crop_with_margin(img, box, margin_px=5), img[15:65, 5:45])
    np.testing.assert_array_equal(crop_with_margin(img, box, margin_ratio=0.1), img[16:64, 7:43])
    # At the borders the crop is clipped to the image.
    corner = crop_with_margin(img, Box(70, 90, 20, 20), margin_px=15)
    np.testing.assert_array_equal(corner, img[75:100, 55:80])
    whole = crop_with_margin(img, Box(-5, -5, 200, 200), margin_px=40)
    assert whole.shape == img.shape
    crop = crop_with_margin(img, box)
    crop[:] = 0
    assert img[20, 10].any()  # a copy, not a view
    with pytest.raises(InvalidArgument, match="outside"):
        crop_with_margin(img, Box(500, 500, 10, 10))
    with pytest.raises(InvalidArgument):
        crop_with_margin(img, Box(0, 0, 0, 10))


# ----------------------------------------------------------------------------- preprocess


def _params(**kw: object) -> PreprocessParams:
    base = {
        "input_name": "input",
        "output_name": "logits",
        "input_size": [64, 64],
        "color": "gray",
        "layout": "NCHW",
        "clahe": None,
        "interpolation": "linear",
        "mean": [0.5],
        "std": [0.5],
        "temperature": 1.0,
        "class_names": EMOTIONS,
    }
    base.update(kw)
    return PreprocessParams.model_validate(base)


def _reference(crop: np.ndarray, p: PreprocessParams) -> np.ndarray:
    """The plain per-image recipe, one cv2 call at a time."""
    if p.color == "gray":
        img = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    elif p.color == "rgb":
        img = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
    else:
        img = crop.copy()
    if p.clahe is not None:
        clahe = cv2.createCLAHE(clipLimit=p.clahe.clip_limit, tileGridSize=tuple(p.clahe.tile_grid))
        if p.clahe.space == "gray":
            img = clahe.apply(img)
        else:
            lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB if p.color == "rgb" else cv2.COLOR_BGR2LAB)
            l, a, b = cv2.split(lab)
            lab = cv2.merge([clahe.apply(l), a, b])
            img = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB if p.color == "rgb" else cv2.COLOR_LAB2BGR)
    interp = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}[p.interpolation]
    img = cv2.resize(img, (p.input_size[1], p.input_size[0]), interpolation=interp)
    if img.ndim == 2:
        img = img[:, :, None]
    x = (img.astype(np.float64) / 255.0 - np.array(p.mean)) / np.array(p.std)
    if p.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def crops(astronaut: np.ndarray) -> list[np.ndarray]:
    return [astronaut[60:170, 170:280], astronaut[0:37, 0:91], astronaut[300:512, 100:350]]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"interpolation": "area", "input_size": [48, 40]},
        {"color": "gray", "clahe": {"clip_limit": 2.0, "tile_grid": [8, 8], "space": "gray"}},
        {
            "color": "rgb",
            "input_size": [224, 224],
            "layout": "NCHW",
            "clahe": {"clip_limit": 2.0, "tile_grid": [8, 8], "space": "lab_l"},
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        {
            "color": "rgb",
            "input_size": [224, 224],
            "layout": "NHWC",
            "clahe": {"clip_limit": 2.0, "tile_grid": [8, 8], "space": "lab_l"},
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        {
            "color": "bgr",
            "layout": "NHWC",
            "interpolation": "cubic",
            "mean": [0.1, 0.2, 0.3],
            "std": [1, 2, 3],
        },
    ],
)
def test_preprocess_matches_reference(crops: list[np.ndarray], kw: dict) -> None:
    p = _params(**kw)
    batch = preprocess_faces(crops, p)
    h, w = p.input_size
    c = p.channels
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    assert batch.shape == ((len(crops), c, h, w) if p.layout == "NCHW" else (len(crops), h, w, c))
    for i, crop in enumerate(crops):
        np.testing.assert_allclose(batch[i], _reference(crop, p), rtol=0, atol=1e-6)


def test_preprocess_gray_clahe_on_colour_model(crops: list[np.ndarray]) -> None:
    p = _params(
        color="rgb",
        clahe={"clip_limit": 3.0, "tile_grid": [4, 4], "space": "gray"},
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    batch = preprocess_faces(crops, p)
    np.testing.assert_array_equal(batch[:, 0], batch[:, 1])  # grey replicated to 3 channels
    gray = _params(clahe={"clip_limit": 3.0, "tile_grid": [4, 4], "space": "gray"})
    np.testing.assert_allclose(batch[:, :1], preprocess_faces(crops, gray), atol=1e-6)


def test_preprocess_empty_and_bad_crops() -> None:
    p = _params()
    assert preprocess_faces([], p).shape == (0, 1, 64, 64)
    with pytest.raises(InvalidArgument, match="crop 1"):
        preprocess_faces([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)], p)


def test_load_params(tmp_path: Path) -> None:
    doc = {
        "input_name": "input",
        "output_name": "logits",
        "input_size": [64, 48],
        "color": "gray",
        "layout": "NCHW",
        "clahe": None,
        "interpolation": "linear",
        "mean": [0.5],
        "std": [0.5],
        "temperature": 1.0,
        "class_names": EMOTIONS,
    }
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(doc))
    p = load_params(path)
    assert p.input_size == (64, 48) and p.class_names == tuple(EMOTIONS)
    assert p.model_dump(mode="json") == doc  # writers and readers agree on the schema

    for bad, words in [
        ({**doc, "extra": 1}, "unknown key 'extra'"),
        ({**doc, "mean": [0.5, 0.5, 0.5]}, "needs 1 mean"),
        ({**doc, "temperature": 0}, "temperature"),
        (
            {
                **doc,
                "color": "rgb",
                "mean": [0] * 3,
                "std": [1] * 3,
                "clahe": {"clip_limit": 2.0, "tile_grid": [8, 8], "space": "hsv"},
            },
            "clahe.space",
        ),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="preprocess.json") as info:
            load_params(path)
        assert words in str(info.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_params(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "missing.json")
