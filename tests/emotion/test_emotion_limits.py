"""Bounded work and memory per emotion request.

Through the real gateway and emotion service: a huge photo whose deadline passes does not delay the
next call; a request over its pixel budgets is refused before the work; a big photo leaves no
memory behind; identical bursts of big photos leave the resident memory where the first left it.
In process (no server adds anything there): detected faces over the crop budget, crops as views
preprocessed one batch slice at a time, and a stopped call starting no further stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from skimage import data as skdata

from launcher.suite import Suite
from services.emotion.config import EmotionConfig
from services.emotion.pipeline import EmotionPipeline
from services.emotion.stop import CallStopped, StopSignal
from services.runtime.backends.base import InferResult
from services.runtime.errors import ResourceExhausted
from services.runtime.metrics import Metrics
from services.runtime.repository import ModelRepository
from services.runtime.servicing import ServedModel
from services.vision.faces import Box, FaceDetector, HaarDetector
from services.vision.inputs import ImageInput
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera_client import TesseraClient
from tests.helpers.suites import start_suite

SIDE = 6000  # 36 M pixels: under decode.max_pixels (40 M) and the request budgets (80 M)
MIB = 1024 * 1024
# 32 boxes of 1300² (1560² with the 10 % margin): 78 M crop pixels, just under the 80 M budget.
GRID = [(x * 1500, y * 750, 1300, 1300) for x in range(4) for y in range(8)]
COVER = [(0, 0, SIDE, SIDE)] * 32  # 32 boxes each covering the photo: 1.15 G crop pixels


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Suite]:
    # A gateway that takes a 9 MB photo (the shared test limit is 4 MB). The Haar detector: these
    # tests are about its cost (seconds on a huge photo, big scratch buffers) and its 10 % margins.
    s = start_suite(
        tmp_path_factory.mktemp("suite"),
        model_repository,
        extra_env={
            "TESSERA_GATEWAY__SERVER__MAX_RECEIVE_MESSAGE_BYTES": str(32 * MIB),
            "TESSERA_EMOTION__DETECTOR__KIND": "haar",
        },
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(suite: Suite) -> Iterator[TesseraClient]:
    with TesseraClient(suite.gateway.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def tiled_jpeg(astronaut: np.ndarray) -> bytes:
    """144 astronauts in a 6000² JPEG (~9 MB): the costliest kind of photo for Haar (~15 s of CPU
    at full size)."""
    tiled = np.tile(astronaut, (12, 12, 1))[:SIDE, :SIDE]
    return cv2.imencode(".jpg", tiled, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@pytest.fixture(scope="module")
def big_jpeg(astronaut: np.ndarray) -> bytes:
    """The astronaut upscaled to 6000² (~1 MB)."""
    upscaled = cv2.resize(astronaut, (SIDE, SIDE))
    return cv2.imencode(".jpg", upscaled, [cv2.IMWRITE_JPEG_QUALITY, 60])[1].tobytes()


def _image(data: bytes, boxes: Sequence[tuple[int, int, int, int]] = ()) -> common_pb2.Image:
    return common_pb2.Image(
        encoded=data, faces=[common_pb2.BoundingBox(x=x, y=y, width=w, height=h) for x, y, w, h in boxes]
    )


def _classify(
    client: TesseraClient, images: list[common_pb2.Image], timeout: float = 120
) -> pb.ClassifyEmotionResponse:
    return client.stub.ClassifyEmotion(pb.ClassifyEmotionRequest(images=images), timeout=timeout)


def _memory_mb(suite: Suite, field: str) -> float:
    """VmRSS or VmHWM of the emotion process."""
    pid = suite.processes["emotion"].popen.pid
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) / 1024


def _reset_peak(suite: Suite) -> None:
    """VmHWM back to the current RSS (Linux clear_refs 5), to read one request's peak."""
    Path(f"/proc/{suite.processes['emotion'].popen.pid}/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- through the gateway


def test_a_big_photo_leaves_no_memory_behind(
    suite: Suite, client: TesseraClient, big_jpeg: bytes, astronaut_jpeg: bytes
) -> None:
    # First in the module: the first big photo the process sees (the models are warmed by a small one).
    _classify(client, [_image(astronaut_jpeg)])
    before = _memory_mb(suite, "VmRSS")
    for _ in range(2):
        (image,) = _classify(client, [_image(big_jpeg)]).images
        assert image.status.code == 0 and image.faces
    # Before: the detector kept ~430 MB of scratch buffers from its full-size run, for good.
    assert _memory_mb(suite, "VmRSS") - before < 100


def test_a_huge_photo_past_its_deadline_does_not_delay_the_next_call(
    client: TesseraClient, tiled_jpeg: bytes, astronaut_jpeg: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _classify(client, [_image(tiled_jpeg)], timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Before: the huge photo's full-size detection went on for its gone caller, holding the only
    # detector, and these calls ran out of time behind it.
    for _ in range(3):
        reply = _classify(client, [_image(astronaut_jpeg)], timeout=5.0)
        (image,) = reply.images
        assert image.status.code == 0 and [f.label for f in image.faces] == ["Happy"]


def test_caller_boxes_over_the_crop_budget_are_refused_before_decoding(
    suite: Suite, client: TesseraClient, big_jpeg: bytes
) -> None:
    _reset_peak(suite)
    before = _memory_mb(suite, "VmRSS")
    with pytest.raises(grpc.RpcError) as err:
        _classify(client, [_image(big_jpeg, COVER)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_crop_pixels_per_request" in err.value.details()
    # Nothing decoded (the photo alone is 103 MB of pixels; before: 3.4 GB for 32 copies of it).
    assert _memory_mb(suite, "VmHWM") - before < 50
    with pytest.raises(grpc.RpcError) as err:  # 72 M decoded pixels (allowed), 144 M crop pixels
        _classify(client, [_image(big_jpeg, [(0, 0, SIDE, SIDE)] * 2)] * 2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_crop_pixels_per_request" in err.value.details()


def test_images_over_the_decoded_budget_are_refused(
    client: TesseraClient, big_jpeg: bytes, png_bomb: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _classify(client, [_image(big_jpeg)] * 3)  # 108 M pixels
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_decoded_pixels_per_request" in err.value.details()
    # An image over the per-image limit is refused on its own, not counted: the others are answered.
    reply = _classify(client, [_image(png_bomb), _image(big_jpeg), _image(big_jpeg)])
    assert reply.images[0].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert all(i.status.code == 0 and i.faces for i in reply.images[1:])


def test_a_request_at_the_crop_budget_is_answered(client: TesseraClient, big_jpeg: bytes) -> None:
    (image,) = _classify(client, [_image(big_jpeg, GRID)]).images
    assert image.status.code == 0 and len(image.faces) == len(GRID)


def test_resident_memory_is_stable_over_identical_bursts(
    suite: Suite, client: TesseraClient, big_jpeg: bytes, astronaut_jpeg: bytes
) -> None:
    big, astronaut = _image(big_jpeg), _image(astronaut_jpeg)
    burst = [
        [big],
        [_image(big_jpeg, GRID)],
        [astronaut] * 32,
        [_image(big_jpeg, GRID[:16]), _image(big_jpeg, GRID[16:])],
        [big],
        [_image(big_jpeg, GRID)],
    ]
    # ONNX Runtime keeps memory for the biggest batch it has run (the batcher merges concurrent
    # requests up to max_batch_size, 64 rows: ~+100 MB, reached on its second run), whichever burst
    # first merges that much; two 64-row requests first, so the bursts measure the pipeline.
    for _ in range(2):
        _classify(client, [_image(astronaut_jpeg, [(177, 66, 94, 94)] * 32)] * 2)
    after = []
    with ThreadPoolExecutor(len(burst)) as pool:
        for _ in range(3):
            replies = list(pool.map(lambda images: _classify(client, images), burst))
            assert all(i.status.code == 0 and i.faces for r in replies for i in r.images)
            time.sleep(0.5)  # the last answers' buffers are freed just after they are sent
            after.append(_memory_mb(suite, "VmRSS"))
    # Before: 776 → 776 → 1093 MB; after: 265 → 274 → 274 MB.
    assert after[2] <= after[0] * 1.10, after


# ----------------------------------------------------------------------------- in process


class _RecordingBackend:
    """Stands in for the model backend: zeros of the right shape, and the batch sizes it saw."""

    name = "recording"

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> InferResult:
        (batch,) = inputs.values()
        self.batches.append(len(batch))
        return InferResult({"logits": np.zeros((len(batch), 7), np.float32)}, model, 1, self.name)


class _Detector:
    """A fixed answer, optionally doing something (e.g. cancelling the call) while it detects."""

    def __init__(self, boxes: list[Box], during: Callable[[], None] | None = None) -> None:
        self.boxes = boxes
        self.during = during
        self.calls = 0

    def detect(self, bgr: np.ndarray) -> list[Box]:
        self.calls += 1
        if self.during is not None:
            self.during()
        return list(self.boxes)


Pipeline = tuple[EmotionPipeline, _RecordingBackend, list[ServedModel]]


def _pipeline(repository: Path, detector: FaceDetector, **config: object) -> Pipeline:
    backend = _RecordingBackend()
    cfg = EmotionConfig(model_repository=repository, **config)  # type: ignore[arg-type]
    pipeline = EmotionPipeline(
        cfg,
        ModelRepository(repository),
        backend,  # type: ignore[arg-type]
        detector,
        Metrics("test"),
    )
    served = [ServedModel("emotion_student", 1, backend.name, temperature=1.0, class_names=("Angry",) * 7)]
    return pipeline, backend, served


def test_detected_faces_over_the_crop_budget_are_refused_before_preprocessing(
    model_repository: Path, astronaut_jpeg: bytes
) -> None:
    # The astronaut's face with its margin is ~112² = 12.5 k pixels.
    detector = HaarDetector()
    pipeline, backend, served = _pipeline(model_repository, detector, max_crop_pixels_per_request=10_000)
    with pytest.raises(ResourceExhausted, match="max_crop_pixels_per_request"):
        asyncio.run(pipeline.run([ImageInput(encoded=astronaut_jpeg)], served))
    assert backend.batches == []
    pipeline, backend, served = _pipeline(model_repository, detector, max_crop_pixels_per_request=20_000)
    (out,) = asyncio.run(pipeline.run([ImageInput(encoded=astronaut_jpeg)], served))
    assert len(out.faces) == 1 and backend.batches == [1]


def test_crops_are_views_preprocessed_one_batch_slice_at_a_time(
    model_repository: Path, astronaut_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.emotion.pipeline as emotion_pipeline

    seen: list[tuple[int, bool]] = []  # (crops, all of them views)
    real = emotion_pipeline.preprocess_faces

    def recording(crops: list[np.ndarray], params: object) -> np.ndarray:
        seen.append((len(crops), all(c.base is not None and not c.flags.owndata for c in crops)))
        return real(crops, params)  # type: ignore[arg-type]

    monkeypatch.setattr(emotion_pipeline, "preprocess_faces", recording)
    pipeline, backend, served = _pipeline(model_repository, _Detector([]))
    boxes = tuple(Box(10 * i, 10 * i, 90, 90) for i in range(25))
    outputs = asyncio.run(pipeline.run([ImageInput(encoded=astronaut_jpeg, boxes=boxes)] * 4, served))
    assert sum(len(o.faces) for o in outputs) == 100
    assert all(len(f.logits["emotion_student"]) == 7 for o in outputs for f in o.faces)
    # emotion_student's max_batch_size is 64: two slices, never the 100 crops at once.
    assert [n for n, _ in seen] == [64, 36] and all(views for _, views in seen)
    assert backend.batches == [64, 36]


def test_a_stopped_call_starts_no_further_stage(model_repository: Path, astronaut_jpeg: bytes) -> None:
    stop = StopSignal()
    detector = _Detector([Box(177, 66, 94, 94)], during=stop.cancel)  # the caller leaves mid-detection
    pipeline, backend, served = _pipeline(model_repository, detector)
    with pytest.raises(CallStopped) as err:
        asyncio.run(pipeline.run([ImageInput(encoded=astronaut_jpeg)], served, stop))
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert detector.calls == 1 and backend.batches == []  # no crop, no preprocessing, no inference
    # A deadline already passed: nothing starts, not even decoding.
    detector.calls = 0
    with pytest.raises(CallStopped) as err:
        asyncio.run(
            pipeline.run(
                [ImageInput(encoded=astronaut_jpeg)] * 3, served, StopSignal(deadline=time.monotonic())
            )
        )
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert detector.calls == 0 and backend.batches == []
