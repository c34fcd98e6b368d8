#!/usr/bin/env python3
"""`tessera-healthcheck`: one grpc.health.v1 check of a process on this host, for exec probes.

Kubernetes' own gRPC probe speaks plaintext only, and every tessera process serves TLS in the
cluster (the model services mutual TLS), so the Deployments probe with this command instead:

    tessera-healthcheck --port 50061 --tls-dir /etc/tessera/tls --server-name emotion \
        [--service tessera.emotion.v1.EmotionService]

`--tls-dir` is the process's own mounted TLS Secret (`tls.crt`, `tls.key`, `ca.crt`, as cert-manager
writes them): the server is verified against `ca.crt` under `--server-name`, and the pod's own
certificate is presented as the client certificate, which a mutual-TLS service accepts for health
(health needs no token and no trusted peer). Without `--tls-dir`, plaintext. `--service ""` (the
default) is the process's own health (liveness); a service name is that service's (readiness).
Exit 0 when SERVING, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if args.tls_dir is None:
        return grpc.insecure_channel(target)
    folder: Path = args.tls_dir
    ca = folder / "ca.crt"
    cert, key = folder / "tls.crt", folder / "tls.key"
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca.exists() else None,
        private_key=key.read_bytes() if args.client_cert and key.exists() else None,
        certificate_chain=cert.read_bytes() if args.client_cert and cert.exists() else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(target, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-healthcheck", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="the process's gRPC port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--service", default="", help='health entry to check ("": the process itself)')
    p.add_argument("--tls-dir", type=Path, help="folder with ca.crt, tls.crt, tls.key (omit: plaintext)")
    p.add_argument("--server-name", help="name expected in the server's certificate")
    p.add_argument(
        "--no-client-cert",
        dest="client_cert",
        action="store_false",
        help="do not present tls.crt as a client certificate",
    )
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        with channel(args) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(
            f"health {args.service or '(process)'} on port {args.port}: {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"cannot read the TLS files: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health {args.service or '(process)'} on port {args.port}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
