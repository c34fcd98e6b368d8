"""Long-lived work: streams outlive connection ageing, a drain ends a live stream with UNAVAILABLE
and the client resumes it, request ids appear in the gateway's and the service's logs, decoder
warnings are counted instead of printed. Every wait is a bounded poll; nothing asserts a time."""

from __future__ import annotations

import json
import re
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage import data as skdata

from launcher.suite import Suite
from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tessera_client import TesseraClient
from tests.helpers.suites import start_suite
from tools.modeller.proxylabel.generate import write_shard

PROCESSES = ("gateway", "emotion", "engagement", "proxylabel")


def _frame_bytes() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


def _paced(items: list[bytes], per_second: float) -> Iterator[bytes]:
    for item in items:
        time.sleep(1.0 / per_second)
        yield item


def _raw_stream(target: str, frames: Iterator[bytes], fps: float = 30.0) -> Iterator[pb.StreamVideoRequest]:
    yield pb.StreamVideoRequest(header=pb.ClipHeader(clip_id="raw", fps=fps))
    for i, frame in enumerate(frames):
        yield pb.StreamVideoRequest(
            frame=common_pb2.VideoFrame(
                timestamp_us=int(i * 1e6 / fps), image=common_pb2.Image(encoded=frame)
            )
        )


def _age_env(age_ms: int, grace_ms: int | None = None) -> dict[str, str]:
    env = {f"TESSERA_{p.upper()}__SERVER__MAX_CONNECTION_AGE_MS": str(age_ms) for p in PROCESSES}
    if grace_ms is not None:
        env |= {f"TESSERA_{p.upper()}__SERVER__MAX_CONNECTION_AGE_GRACE_MS": str(grace_ms) for p in PROCESSES}
    return env


# ------------------------------------------------------------------------------------------------
# Connection ageing (scaled down: connections age after 1 s, streams last several periods)
@pytest.fixture(scope="module")
def aged_suite(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Suite]:
    s = start_suite(
        tmp_path_factory.mktemp("aged"),
        model_repository,
        extra_env=_age_env(1000),
        data_roots=(tmp_path_factory.getbasetemp(),),
    )
    yield s
    s.stop()


@pytest.mark.parametrize(
    "seconds", [4, pytest.param(300, marks=[pytest.mark.slow, pytest.mark.timeout(600)])]
)
def test_live_stream_outlives_connection_ageing(aged_suite: Suite, seconds: int) -> None:
    frames = [_frame_bytes()] * (seconds * 12)
    with grpc.insecure_channel(aged_suite.gateway.target) as channel:
        replies = list(
            pb_grpc.GatewayServiceStub(channel).StreamVideo(
                _raw_stream(aged_suite.gateway.target, _paced(frames, 12)), timeout=seconds * 3 + 60
            )
        )
    assert len(replies) == len(frames)
    assert all(r.status.code == 0 and r.HasField("face") for r in replies)


def test_clip_upload_outlives_connection_ageing(aged_suite: Suite) -> None:
    frames = [_frame_bytes()] * 40
    with TesseraClient(aged_suite.gateway.target, timeout=120) as client:
        reply = client.score_clip(_paced(frames, 12), fps=12)
    assert reply.frames_received == len(frames)


def test_shard_job_outlives_connection_ageing(
    aged_suite: Suite, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.getbasetemp() / "aged-shards"
    # Text only: the service embeds every row, so the job lasts several connection ages.
    shard = write_shard(root / "texts.parquet", 480, labelled_fraction=0.5, seed=4, row_group_rows=40)
    pq.write_table(pq.read_table(shard).drop_columns(["embedding"]), shard, row_group_size=40)
    with TesseraClient(aged_suite.gateway.target, timeout=300) as client:
        events = list(client.score_shard(shard, root / "out", batch_rows=40))
    assert events[-1].WhichOneof("event") == "summary"
    assert events[-1].summary.rows_done == 480


def test_a_bounded_age_grace_would_cut_the_stream(tmp_path: Path, model_repository: Path) -> None:
    """The control: with a bounded grace for calls on an aged connection (the old default, scaled),
    the same stream is cut. This is what the unbounded default prevents."""
    with start_suite(tmp_path, model_repository, extra_env=_age_env(1000, grace_ms=300)) as s:
        with grpc.insecure_channel(s.gateway.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                list(
                    pb_grpc.GatewayServiceStub(channel).StreamVideo(
                        _raw_stream(s.gateway.target, _paced([_frame_bytes()] * 50, 12)), timeout=120
                    )
                )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------------------------
# Drain and resume
def test_drain_ends_a_live_stream_with_unavailable_saying_so(suite: Suite) -> None:
    started = threading.Event()

    def frames() -> Iterator[bytes]:
        for _ in range(10_000):  # far longer than the test: only the drain ends it
            time.sleep(0.05)
            yield _frame_bytes()

    with grpc.insecure_channel(suite.gateway.target) as channel:
        call = pb_grpc.GatewayServiceStub(channel).StreamVideo(
            _raw_stream(suite.gateway.target, frames()), timeout=120
        )
        terminator = threading.Thread(target=lambda: started.wait(60) and suite.kill("gateway", 15))
        terminator.start()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                started.set()
        terminator.join()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    suite.restart("gateway")


def test_client_resumes_a_drained_stream_against_the_restarted_gateway(suite: Suite) -> None:
    n = 90
    answered: list[pb.StreamVideoResponse] = []
    restarter: threading.Thread | None = None
    with TesseraClient(suite.gateway.target, timeout=120) as client:
        for reply in client.stream_video(_paced([_frame_bytes()] * n, 15), fps=15, reconnect_seconds=60):
            answered.append(reply)
            if len(answered) == 20:
                restarter = threading.Thread(target=suite.restart, args=("gateway",))
                restarter.start()
    assert restarter is not None
    restarter.join()
    stamps = [r.timestamp_us for r in answered]
    assert stamps == [int(i * 1e6 / 15) for i in range(n)], "every frame answered once, in order"
    drained = (suite.workdir / "gateway.previous.log").read_text()
    assert re.search(r"StreamVideo UNAVAILABLE id=\S+ .*shutting down \(drain\)", drained)


# ------------------------------------------------------------------------------------------------
# Logs and request ids
def _poll_log(path: Path, pattern: str, seconds: float = 20.0) -> str:
    for _ in range(int(seconds / 0.1)):
        text = path.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path.name}:\n{path.read_text(errors='replace')[-3000:]}")


def test_request_id_reaches_the_service_log(suite: Suite, astronaut_jpeg: bytes) -> None:
    with grpc.insecure_channel(suite.gateway.target) as channel:
        pb_grpc.GatewayServiceStub(channel).ClassifyEmotion(
            pb.ClassifyEmotionRequest(images=[common_pb2.Image(encoded=astronaut_jpeg)]),
            timeout=30,
            metadata=(("x-request-id", "trace-4711"),),
        )
    _poll_log(suite.workdir / "gateway.log", r"ClassifyEmotion OK id=trace-4711 peer=\S+")
    _poll_log(suite.workdir / "emotion.log", r"InferFaces OK id=trace-4711 peer=\S+")


def _png_with_bad_text_crc() -> bytes:
    png = cv2.imencode(".png", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    body = b"Comment\x00damaged in transit"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + b"\0\0\0\0"  # wrong CRC: libpng warns, decodes
    return png[:33] + chunk + png[33:]


def _metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{name}{{{labels}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_decoder_warnings_are_counted_not_printed(suite: Suite) -> None:
    emotion = suite.processes["emotion"]
    before = _metric(emotion.metrics_port, "tessera_decoder_warnings_total", 'library="libpng"')
    with TesseraClient(suite.gateway.target) as client:
        faces = client.classify_image(_png_with_bad_text_crc())
    assert [f.label for f in faces] == ["Happy"]  # the image itself is fine
    for _ in range(100):
        if _metric(emotion.metrics_port, "tessera_decoder_warnings_total", 'library="libpng"') > before:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the libpng warning was not counted")
    assert "libpng warning" not in emotion.log_file.read_text(errors="replace")


def test_long_lived_defaults() -> None:
    """Streams have no deadline cap and calls on aged connections no grace limit, unless configured."""
    from gateway.config import GatewayConfig
    from services.runtime.config import ServerConfig

    assert GatewayConfig().deadlines.stream is None
    assert ServerConfig().max_connection_age_grace_ms is None
    assert ServerConfig().max_connection_age_ms is not None  # ageing stays on (DNS re-resolution)
    assert json.loads(json.dumps(GatewayConfig().reconnect.model_dump()))["max_backoff_ms"] <= 2000
    assert np.isfinite(GatewayConfig().deadlines.unary)
