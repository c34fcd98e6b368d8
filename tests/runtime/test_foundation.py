"""The suite's foundation on real processes and loopback ports: health, reflection, metrics,
graceful shutdown, limits, a stopped service, config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from launcher.suite import ROOT, Suite
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as emotion_grpc
from tessera_client import TesseraClient
from tests.helpers.suites import GATEWAY_MAX_MESSAGE, start_suite

SERVICE_NAMES = {
    "gateway": "tessera.gateway.v1.GatewayService",
    "emotion": "tessera.emotion.v1.EmotionService",
    "engagement": "tessera.engagement.v1.EngagementService",
    "proxylabel": "tessera.proxylabel.v1.ProxyLabelService",
}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def request_count(port: int, service: str, method: str, code: str) -> float:
    key = (
        "tessera_request_duration_seconds_count",
        frozenset({"service": service, "method": method, "code": code}.items()),
    )
    return scrape(port).get(key, 0.0)


def test_every_process_is_serving_and_reflects_its_services(suite: Suite) -> None:
    for name, proc in suite.processes.items():
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAMES[name]):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
            listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {SERVICE_NAMES[name], "grpc.health.v1.Health"} <= listed


def test_gateway_health_aggregates_the_services(suite: Suite) -> None:
    with TesseraClient(suite.gateway.target) as client:
        for name in ("emotion", "engagement", "proxylabel"):
            assert client.health(SERVICE_NAMES[name]) == "SERVING"
        status = client.status()
    states = {s.name: s.state for s in status.services}
    assert states == {n: common_pb2.SERVING_STATE_SERVING for n in ("emotion", "engagement", "proxylabel")}
    assert status.rules_version


def test_metrics_show_the_request_after_one_call(suite: Suite, astronaut_jpeg: bytes) -> None:
    gw, emotion = suite.gateway, suite.processes["emotion"]
    before_gw = request_count(gw.metrics_port, SERVICE_NAMES["gateway"], "ClassifyEmotion", "OK")
    before_em = request_count(emotion.metrics_port, SERVICE_NAMES["emotion"], "InferFaces", "OK")
    with TesseraClient(gw.target) as client:
        client.classify_image(astronaut_jpeg)
        with pytest.raises(grpc.RpcError) as err:
            client.classify([astronaut_jpeg], mode="ensemble", ensemble="research")  # teachers absent
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert request_count(gw.metrics_port, SERVICE_NAMES["gateway"], "ClassifyEmotion", "OK") == before_gw + 1
    assert request_count(emotion.metrics_port, SERVICE_NAMES["emotion"], "InferFaces", "OK") == before_em + 1
    assert (
        request_count(gw.metrics_port, SERVICE_NAMES["gateway"], "ClassifyEmotion", "FAILED_PRECONDITION")
        >= 1
    )
    samples = scrape(gw.metrics_port)
    assert any(name == "tessera_fusion_rules_info" and value == 1 for (name, _), value in samples.items())
    stage_names = {
        dict(labels).get("stage")
        for (name, labels) in scrape(emotion.metrics_port)
        if name == "tessera_stage_duration_seconds_count"
    }
    assert {"decode", "detect", "preprocess", "queue"} <= stage_names


def test_oversized_message_is_resource_exhausted_and_gateway_keeps_serving(suite: Suite) -> None:
    big = os.urandom(GATEWAY_MAX_MESSAGE + 1024)
    with TesseraClient(suite.gateway.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify([big])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.status().rules_version


def _slow_request() -> emotion_pb.InferFacesRequest:
    # Haar detection on big noisy images takes seconds: a call that is surely in flight.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(1600, 1600, 3), dtype=np.uint8)
    encoded = cv2.imencode(".png", image)[1].tobytes()
    return emotion_pb.InferFacesRequest(
        images=[common_pb2.Image(encoded=encoded)] * 2, models=["emotion_student"]
    )


def test_sigterm_lets_the_in_flight_call_finish_then_exits_zero(
    tmp_path: Path, model_repository: Path
) -> None:
    ready = tmp_path / "emotion.ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.emotion",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready),
        ],
        # The Haar detector: its seconds on big noisy images keep the call in flight (BlazeFace takes ms).
        cwd=ROOT,
        env={
            **os.environ,
            "TESSERA_EMOTION__MODEL_REPOSITORY": str(model_repository),
            "TESSERA_EMOTION__SERVER__GRACE_SECONDS": "60",
            "TESSERA_EMOTION__DETECTOR__KIND": "haar",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        info = __import__("json").loads(ready.read_text())
        result: dict[str, object] = {}

        def call() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
                try:
                    result["reply"] = emotion_grpc.EmotionServiceStub(channel).InferFaces(
                        _slow_request(), timeout=60
                    )
                except grpc.RpcError as exc:
                    result["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        in_flight = (
            "tessera_requests_in_flight",
            frozenset({"service": SERVICE_NAMES["emotion"], "method": "InferFaces"}.items()),
        )
        while scrape(info["metrics_port"]).get(in_flight, 0) < 1:
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert "error" not in result, result.get("error")
        reply = result["reply"]
        assert len(reply.images) == 2 and all(i.status.code == 0 for i in reply.images)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stopped_service_gives_unavailable_within_the_deadline(
    tmp_path: Path, model_repository: Path, astronaut_jpeg: bytes
) -> None:
    suite = start_suite(tmp_path, model_repository, data_roots=(tmp_path,))
    try:
        engagement = suite.processes["engagement"]
        engagement.popen.send_signal(signal.SIGTERM)
        assert engagement.popen.wait(20) == 0
        with TesseraClient(suite.gateway.target) as client:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.score_clip([astronaut_jpeg], timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engagement" in err.value.details()
            assert time.monotonic() - start < 5.5
            # The others are still served.
            assert client.classify_image(astronaut_jpeg)[0].label == "Happy"
            states = {s.name: s.state for s in client.status().services}
            assert states["engagement"] == common_pb2.SERVING_STATE_UNREACHABLE
            assert states["emotion"] == common_pb2.SERVING_STATE_SERVING
            deadline = time.monotonic() + 10
            while client.health(SERVICE_NAMES["engagement"]) != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        suite.stop()


@pytest.mark.parametrize("process", ["services.emotion", "gateway"])
def test_unknown_config_key_fails_at_start_naming_it(tmp_path: Path, process: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  prot: 5000\n")
    proc = subprocess.run(
        [sys.executable, "-m", process, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown key 'server.prot'" in proc.stderr


def test_unknown_environment_key_fails_at_start_naming_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.engagement"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TESSERA_ENGAGEMENT__SERVER__BOGUS": "1"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown key 'server.bogus'" in proc.stderr


def test_gateway_refuses_a_bad_rules_file_at_start(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("emotion:\n  default_mode: student\n  wieghts: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TESSERA_GATEWAY__RULES_PATH": str(rules)},
    )
    assert proc.returncode == 2
    assert "unknown key 'emotion.wieghts'" in proc.stderr
