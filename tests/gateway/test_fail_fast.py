"""Fail fast: with a service dead or frozen, gateway calls end UNAVAILABLE naming it instead of
waiting out their deadline, the other services keep answering, the gateway's own health stays
SERVING (a liveness probe must not restart every gateway), and all clears once the service is back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.suite import Suite
from tessera_client import TesseraClient
from tests.helpers.suites import start_suite

EMOTION_HEALTH = "tessera.emotion.v1.EmotionService"


@pytest.fixture(scope="module")
def fast_suite(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Suite]:
    s = start_suite(tmp_path_factory.mktemp("fail-fast"), model_repository)
    yield s
    s.stop()


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def _until(what: str, check, seconds: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.1)):
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {seconds:.0f}s")


def _classify_code(client: TesseraClient, photo: bytes, timeout: float = 10.0) -> tuple[str, str]:
    try:
        client.classify_image(photo, timeout=timeout)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def test_a_frozen_service_is_answered_unavailable_not_deadline_exceeded(
    fast_suite: Suite, astronaut_jpeg: bytes
) -> None:
    emotion = fast_suite.processes["emotion"]
    with TesseraClient(fast_suite.gateway.target) as client:
        assert _classify_code(client, astronaut_jpeg)[0] == "OK"
        os.kill(emotion.popen.pid, signal.SIGSTOP)
        try:
            # Calls made while the gateway still thinks it alive are cut when it learns; later ones fail at once.
            codes = [_classify_code(client, astronaut_jpeg, timeout=10.0) for _ in range(3)]
            assert [c for c, _ in codes] == ["UNAVAILABLE"] * 3, codes
            assert all("emotion service" in d for _, d in codes)
            assert _health(fast_suite.gateway.target) == health_pb2.HealthCheckResponse.SERVING
            assert (
                _health(fast_suite.gateway.target, EMOTION_HEALTH)
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            rows = client.score_texts([{"id": "a", "text": "How do plants make food?"}]).rows
            assert rows[0].status.code == 0  # the others answer meanwhile
        finally:
            os.kill(emotion.popen.pid, signal.SIGCONT)
        _until("emotion served again", lambda: _classify_code(client, astronaut_jpeg)[0] == "OK")


def test_a_dead_service_fails_at_once_and_clears_when_back(fast_suite: Suite, astronaut_jpeg: bytes) -> None:
    with TesseraClient(fast_suite.gateway.target) as client:
        fast_suite.kill("emotion")
        _until(
            "gateway knows",
            lambda: (
                _health(fast_suite.gateway.target, EMOTION_HEALTH)
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
        )
        code, detail = _classify_code(client, astronaut_jpeg, timeout=30.0)
        assert code == "UNAVAILABLE" and "emotion service" in detail
        assert _health(fast_suite.gateway.target) == health_pb2.HealthCheckResponse.SERVING
        fast_suite.restart("emotion")
        _until("emotion served again", lambda: _classify_code(client, astronaut_jpeg)[0] == "OK")
        assert _health(fast_suite.gateway.target, EMOTION_HEALTH) == health_pb2.HealthCheckResponse.SERVING
