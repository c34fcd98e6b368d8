"""Undecodable request bytes on the wire: every public RPC of the gateway and of each service
answers INVALID_ARGUMENT at once (never UNKNOWN, never a hang until the deadline), with one log
line and no traceback; on the gateway's streams also after valid messages."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from launcher.suite import Suite
from tessera.gateway.v1 import gateway_service_pb2
from tests.helpers.wire import METHODS, SERVICES

JUNK = bytes.fromhex("0a7f0a")  # field 1, 127 bytes long, then one byte: no message parses it


def _call(channel: grpc.Channel, method, messages: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    timeout = 30
    if kind == (False, False):
        channel.unary_unary(path)(messages[0], timeout=timeout)
    elif kind == (False, True):
        list(channel.unary_stream(path)(messages[0], timeout=timeout))
    elif kind == (True, False):
        channel.stream_unary(path)(iter(messages), timeout=timeout)
    else:
        list(channel.stream_stream(path)(iter(messages), timeout=timeout))


@pytest.mark.parametrize(("process", "method"), METHODS, ids=[f"{p}.{m.name}" for p, m in METHODS])
def test_undecodable_bytes_are_invalid_argument(suite: Suite, process: str, method) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(suite.processes[process].target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, method, [JUNK])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not a valid protobuf message" in info.value.details()


def _header_then_junk(cls: type) -> Iterator[bytes]:
    yield cls(header=gateway_service_pb2.ClipHeader(clip_id="c", fps=10)).SerializeToString()
    yield JUNK


@pytest.mark.parametrize("name", ["ScoreClip", "StreamVideo"])
def test_a_bad_message_after_good_ones_fails_the_gateway_stream_at_once(suite: Suite, name: str) -> None:
    method = SERVICES["gateway"].methods_by_name[name]
    cls = getattr(gateway_service_pb2, f"{name}Request")
    with grpc.insecure_channel(suite.gateway.target) as channel, pytest.raises(grpc.RpcError) as info:
        _call(channel, method, list(_header_then_junk(cls)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "message 1 of the" in info.value.details()


def test_bad_bytes_leave_one_log_line_and_no_traceback(suite: Suite) -> None:
    with grpc.insecure_channel(suite.gateway.target) as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary("/tessera.gateway.v1.GatewayService/GetStatus")(JUNK, timeout=30)
    log = suite.gateway.log_file.read_text(errors="replace")
    assert "Traceback" not in log
    assert "GetStatus INVALID_ARGUMENT" in log
