"""TLS, mutual TLS and tokens on real processes, with a CA and certificates made in the test:
the gateway serves TLS to clients and reaches the services over mTLS; the services accept only
the gateway's certificate; tokens carry scopes, are re-read when their file changes, and may be
rate-limited; a rotated certificate is served without a restart."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.suite import Suite
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as emotion_grpc
from tessera_client import ClientTls, TesseraClient
from tests.helpers.pki import Issued, TestCA
from tests.helpers.suites import start_suite
from tools.modeller.proxylabel.generate import write_shard

SERVICES = ("emotion", "engagement", "proxylabel")
TOKENS = """
tokens:
  - {token: admin-token-123, name: ops, scopes: [admin]}
  - {token: app-token-456, name: webapp, scopes: [classify, stream]}
  - {token: slow-token-789, name: batch, scopes: [status], rate_per_second: 0.2}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA()
    (folder / "ca.crt").write_bytes(ca.pem)
    files: dict[str, object] = {"ca": ca, "dir": folder, "ca_file": folder / "ca.crt"}
    for name in ("gateway", *SERVICES):
        files[name] = ca.issue(name, dns=(f"{name}.tessera.svc",)).write(folder, name)
    files["gateway-client"] = ca.issue("gateway", client=True).write(folder, "gateway-client")
    files["launcher"] = ca.issue("launcher", client=True)
    files["stranger"] = ca.issue("stranger", client=True)
    return files


def _env(pki: dict[str, object], tokens: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for p in ("gateway", *SERVICES):
        cert, key = pki[p]  # type: ignore[misc]
        prefix = f"TESSERA_{p.upper()}__"
        env |= {
            f"{prefix}SERVER__TLS__CERT_FILE": str(cert),
            f"{prefix}SERVER__TLS__KEY_FILE": str(key),
            f"{prefix}SERVER__TLS__RELOAD_SECONDS": "0.2",
        }
        if p != "gateway":  # services: mTLS, only the gateway's certificate gets in
            env |= {
                f"{prefix}SERVER__TLS__CLIENT_CA_FILE": str(pki["ca_file"]),
                f"{prefix}AUTH__TRUSTED_PEERS": '["gateway"]',
            }
    cert, key = pki["gateway-client"]  # type: ignore[misc]
    env |= {
        "TESSERA_GATEWAY__DOWNSTREAM__TLS__CA_FILE": str(pki["ca_file"]),
        "TESSERA_GATEWAY__DOWNSTREAM__TLS__CERT_FILE": str(cert),
        "TESSERA_GATEWAY__DOWNSTREAM__TLS__KEY_FILE": str(key),
        "TESSERA_GATEWAY__AUTH__TOKEN_FILE": str(tokens),
    }
    return env


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, model_repository: Path, pki: dict[str, object]
) -> Iterator[Suite]:
    tokens = pki["dir"] / "tokens.yaml"  # type: ignore[operator]
    tokens.write_text(TOKENS)
    launcher: Issued = pki["launcher"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    s = start_suite(
        tmp_path_factory.mktemp("secure"),
        model_repository,
        extra_env=_env(pki, tokens),
        data_roots=(tmp_path_factory.getbasetemp(),),
        tls=ClientTls(ca.pem, launcher.cert, launcher.key),
    )
    yield s
    s.stop()


def _client(suite: Suite, pki: dict[str, object], token: str | None = "admin-token-123") -> TesseraClient:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    return TesseraClient(suite.gateway.target, token=token, root_certificates=ca.pem, timeout=60)


def test_the_gateway_over_mtls_serves_every_public_rpc(
    secure: Suite, pki, astronaut_jpeg: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _client(secure, pki) as client:
        assert [f.label for f in client.classify_image(astronaut_jpeg)] == ["Happy"]
        assert client.score_clip([astronaut_jpeg] * 5, fps=5).frames_received == 5
        assert len(list(client.stream_video([astronaut_jpeg] * 5, fps=5))) == 5
        assert client.score_texts([{"id": "a", "text": "How do plants make food?"}]).rows[0].status.code == 0
        root = tmp_path_factory.getbasetemp() / "secure-shard"
        shard = write_shard(root / "s.parquet", 32, labelled_fraction=0.5, seed=1, row_group_rows=16)
        pq.write_table(
            pq.read_table(shard).drop_columns(["embedding"]), shard, row_group_size=16
        )  # text only
        events = list(client.score_shard(shard, root / "out"))
        assert events[-1].summary.rows_done == 32
        status = client.status()
        assert all(s.state == 1 for s in status.services), status  # SERVING through mTLS
        assert client.health() == "SERVING"


def test_plaintext_to_a_tls_port_fails(secure: Suite) -> None:
    with TesseraClient(secure.gateway.target, token="admin-token-123") as client:
        with pytest.raises(grpc.RpcError) as info:
            client.status(timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _emotion_stub(
    suite: Suite, pki, cert: Issued | None
) -> tuple[grpc.Channel, emotion_grpc.EmotionServiceStub]:
    ca: TestCA = pki["ca"]
    creds = grpc.ssl_channel_credentials(ca.pem, cert.key if cert else None, cert.cert if cert else None)
    channel = grpc.secure_channel(suite.processes["emotion"].target, creds)
    return channel, emotion_grpc.EmotionServiceStub(channel)


def test_model_services_accept_only_the_gateway(secure: Suite, pki) -> None:
    # No client certificate: the mTLS handshake fails.
    channel, stub = _emotion_stub(secure, pki, None)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ListModels(emotion_pb.ListModelsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate of the same CA, but not the gateway's: the bypass is refused.
    channel, stub = _emotion_stub(secure, pki, pki["stranger"])
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ListModels(emotion_pb.ListModelsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health stays open to any certificate holder (probes).
    channel, _ = _emotion_stub(secure, pki, pki["stranger"])
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_scopes_and_rate_limits(secure: Suite, pki, astronaut_jpeg: bytes) -> None:
    for token in (None, "not-a-token"):
        with _client(secure, pki, token) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.status()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert client.health() == "SERVING"  # health needs no token
    with _client(secure, pki, "app-token-456") as client:
        assert client.classify_image(astronaut_jpeg)
        with pytest.raises(grpc.RpcError) as info:
            client.status()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'status' scope" in info.value.details()
    with _client(secure, pki, "slow-token-789") as client:
        codes = []
        for _ in range(3):
            try:
                client.status()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes[0] == "OK" and "RESOURCE_EXHAUSTED" in codes[1:]


def test_reflection_needs_a_token_with_its_scope(secure: Suite, pki) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ca: TestCA = pki["ca"]
    with grpc.secure_channel(secure.gateway.target, grpc.ssl_channel_credentials(ca.pem)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(
            stub.ServerReflectionInfo(
                iter([request]), timeout=10, metadata=(("authorization", "Bearer admin-token-123"),)
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert "tessera.gateway.v1.GatewayService" in names


def test_an_edited_token_file_is_used_without_restart(secure: Suite, pki) -> None:
    tokens: Path = pki["dir"] / "tokens.yaml"
    tokens.write_text(TOKENS + "  - {token: fresh-token-000, name: newcomer, scopes: [status]}\n")
    with _client(secure, pki, "fresh-token-000") as client:
        for _ in range(100):
            try:
                client.status()
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                time.sleep(0.1)
        else:
            raise AssertionError("the new token was never accepted")


def _served_serial(target: str, ca_pem: bytes) -> int:
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="gateway") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_a_rotated_certificate_is_served_without_restart(secure: Suite, pki) -> None:
    ca: TestCA = pki["ca"]
    old = _served_serial(secure.gateway.target, ca.pem)
    fresh = ca.issue("gateway", dns=("gateway.tessera.svc",))
    fresh.write(pki["dir"], "gateway")
    for _ in range(100):
        if _served_serial(secure.gateway.target, ca.pem) == fresh.serial:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"still serving certificate {old}")
    with _client(secure, pki) as client:
        assert client.status().rules_version  # and new connections work with it


def test_watched_files_offer_a_change_until_it_is_taken(tmp_path: Path) -> None:
    from services.runtime.auth import FileSecret
    from services.runtime.watched import WatchedFiles

    path = tmp_path / "token"
    path.write_text("first\n")
    watch = WatchedFiles([path], interval=0.0)
    stamp = watch.poll()
    assert stamp is not None and watch.poll() == stamp  # not taken yet: offered again
    watch.take(stamp)
    assert watch.poll() is None
    secret = FileSecret(path, recheck_seconds=0.0)
    assert secret.value() == "first"
    path.write_text("second, longer\n")
    assert secret.value() == "second, longer"
    path.unlink()
    assert secret.value() == "second, longer"  # unreadable: the previous value stays
