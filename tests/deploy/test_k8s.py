"""The rendered Kubernetes manifests, run as local processes, the way the kubelet would run them.

Each Deployment of the cpu overlay is started from its own container spec: its command, its
environment (literal values, Secret and downward-API references resolved), its volumes as local
folders (Secrets filled from a test CA issuing what the cert-manager component's Certificates
describe, and test tokens; ConfigMaps from the render; the model PVC seeded by running the pod's own
init container), its ports moved to free local ones, the cluster's DNS names (dns:///<service>:<port>)
pointed at the local process behind that Service. Then its own startup, liveness and readiness
probe commands must pass. The shard Job's command runs the same way for two completion indexes
against that suite and must write both outputs; its exit codes must be the ones its
podFailurePolicy expects.

What needs a cluster (scheduling, NetworkPolicy enforcement, the admission of Pod Security, the
HPAs' adapter, cert-manager) or a GPU (Triton) is rendered and validated in tests/deploy/test_deploy.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.suite import ROOT, SERVICES
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.emotion.v1 import emotion_service_pb2_grpc as emotion_grpc
from tessera_client import TesseraClient
from tests.helpers.deploy import (
    BIN,
    HEALTHCHECK,
    PROCESSES,
    SEED_MODELS,
    dockerfile_env,
    free_port,
    main_container,
    objects,
    pod_spec,
)
from tests.helpers.pki import TestCA
from tools.modeller.proxylabel.generate import write_shard

ADMIN_TOKEN = "k8s-admin-token-0123456789"
SHARD_TOKEN = "k8s-shard-token-0123456789"
CLASSIFY_TOKEN = "k8s-classify-token-0123456789"
TOKENS = {
    "tokens": [
        {"token": ADMIN_TOKEN, "name": "ops", "scopes": ["admin"]},
        {"token": SHARD_TOKEN, "name": "shard-job", "scopes": ["shard"]},
        {"token": CLASSIFY_TOKEN, "name": "webapp", "scopes": ["classify", "stream"]},
    ]
}
SHARD_ROWS = 16
# The image's files the manifests name, in this checkout (the image's WORKDIR /app is a copy of it).
IMAGE_PATHS = {"/app": ROOT}
# The commands the image installs, here.
COMMANDS = {
    "tessera-healthcheck": [sys.executable, str(HEALTHCHECK)],
    "tessera-seed-models": [str(SEED_MODELS)],
}
USAGES = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}


# ------------------------------------------------------------------------------------------------
# The cluster's Secrets, as cert-manager and an operator would make them
# ------------------------------------------------------------------------------------------------
def issue(ca: TestCA, spec: dict[str, Any]) -> tuple[bytes, bytes]:
    """A certificate as cert-manager issues one for this Certificate spec (common name, DNS names,
    usages), plus 127.0.0.1 so that a local client can reach the process by address."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [
        *(x509.DNSName(d) for d in spec.get("dnsNames", [])),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    usages = [USAGES[u] for u in spec["usages"] if u in USAGES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def make_secrets(folder: Path, ca: TestCA, tokens: dict[str, Any]) -> Path:
    """secrets/<name>/<key>: the TLS Secrets of the cert-manager component, issued by `ca`, and the
    token Secrets of deploy/k8s/secrets with real test tokens in place of the placeholders."""
    for cert in objects("full", "Certificate").values():
        spec = cert["spec"]
        if spec.get("isCA"):
            continue
        out = folder / spec["secretName"]
        out.mkdir(parents=True)
        crt, key = issue(ca, spec)
        (out / "tls.key").write_bytes(key)
        (out / "tls.crt").write_bytes(crt)
        (out / "ca.crt").write_bytes(ca.pem)
    for secret in objects("secrets", "Secret").values():
        out = folder / secret["metadata"]["name"]
        out.mkdir(parents=True)
        for key, value in secret["stringData"].items():
            (out / key).write_text(value)
    (folder / "tessera-gateway-tokens" / "tokens.yaml").write_text(yaml.safe_dump(tokens))
    (folder / "tessera-shard-token" / "token").write_text(SHARD_TOKEN)
    return folder


# ------------------------------------------------------------------------------------------------
# A pod, run here
# ------------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """The local stand-in for the cluster: its folders, and the Services' addresses."""

    root: Path
    secrets: Path
    # "<service>:<port>" -> "127.0.0.1:<local port>" once the pod behind it runs.
    dns: dict[str, str] = field(default_factory=dict)

    def volume(self, pod: str, volume: dict[str, Any]) -> Path:
        if "secret" in volume:
            path = self.secrets / volume["secret"]["secretName"]
            assert path.is_dir(), f"Secret {volume['secret']['secretName']} is not provided"
            items = volume["secret"].get("items")
            if not items:
                return path
            # Only the listed keys, under their paths, as the kubelet projects them.
            projected = self.root / "pods" / pod / volume["name"]
            for item in items:
                target = projected / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((path / item["key"]).read_bytes())
            return projected
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            path = self.root / "configmaps" / name
            if not path.exists():
                path.mkdir(parents=True)
                for key, text in objects("cpu", "ConfigMap")[name]["data"].items():
                    (path / key).write_text(text)
            return path
        if "persistentVolumeClaim" in volume:
            path = self.root / "volumes" / volume["persistentVolumeClaim"]["claimName"]
        else:
            assert set(volume) == {"name", "emptyDir"}, volume
            path = self.root / "pods" / pod / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolve(self, value: str) -> str:
        """dns:///<service>:<port> or <service>:<port> of the cluster -> the local address."""
        m = re.fullmatch(r"(?:dns:///)?([a-z0-9-]+):(\d+)", value)
        if m and f"{m.group(1)}:{m.group(2)}" in self.dns:
            return self.dns[f"{m.group(1)}:{m.group(2)}"]
        return value


@dataclass
class LocalPod:
    name: str
    obj: dict[str, Any]  # the Deployment or Job
    cluster: Cluster
    paths: dict[str, Path] = field(default_factory=dict)  # mountPath (or image path) -> local folder
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    extra_env: dict[str, str | None] = field(default_factory=dict)  # None: left out
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def __post_init__(self) -> None:
        spec = pod_spec(self.obj)
        volumes = {v["name"]: self.cluster.volume(self.name, v) for v in spec.get("volumes", [])}
        self.paths = dict(IMAGE_PATHS)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in c.get("volumeMounts", []):
                assert "subPath" not in mount
                self.paths[mount["mountPath"]] = volumes[mount["name"]]
        for p in main_container(self.obj).get("ports", []):
            self.ports[p["containerPort"]] = free_port()

    def local_path(self, text: str) -> str:
        """Paths of the container (mounts, image files) inside `text` -> their local folders (one
        pass, the longest mount path first: a local folder is never rewritten again)."""
        inside = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        return re.sub(rf"(?<![\w/.-])({inside})(?=/|\"|'|$|\s)", lambda m: str(self.paths[m.group(1)]), text)

    def env(
        self, container: dict[str, Any], index: int | None = None, paths: LocalPod | None = None
    ) -> dict[str, str]:
        """The container's environment as the kubelet builds it (the image's ENV, then the pod's),
        with container paths, ports and cluster names made local."""
        paths = paths or self
        env = {k: paths.local_path(v) for k, v in dockerfile_env().items()}
        for e in container.get("env", []):
            if "value" in e:
                value = e["value"]
            else:
                source = e["valueFrom"]
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    value = (self.cluster.secrets / ref["name"] / ref["key"]).read_text()
                else:
                    field_path = source["fieldRef"]["fieldPath"]
                    assert field_path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    assert index is not None
                    value = str(index)
            is_port = e["name"].endswith(("__PORT", "__METRICS_PORT")) and value.isdigit()
            if is_port and int(value) in self.ports:
                value = str(self.ports[int(value)])
            env[e["name"]] = self.cluster.resolve(paths.local_path(value))
        for key, value in self.extra_env.items():
            if value is None:
                env = {k: v for k, v in env.items() if not k.startswith(key)}
            else:
                env[key] = value
        return env

    def command(self, words: list[str], env: dict[str, str] | None = None) -> list[str]:
        """A container's command line, runnable here: the image's commands found locally, $(VAR)
        expanded from the container's environment as Kubernetes does, ports and paths made local."""
        env = env or {}

        def expand(word: str) -> str:
            return re.sub(
                r"\$\$|\$\((\w+)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                word,
            )

        words = [expand(w) for w in words]
        out = []
        for i, word in enumerate(words):
            if i > 0 and words[i - 1] == "--port" and int(word) in self.ports:
                word = str(self.ports[int(word)])
            out.append(self.local_path(word))
        head = COMMANDS.get(out[0]) or [str(BIN / out[0]) if (BIN / out[0]).exists() else out[0]]
        return [*head, *out[1:]]

    def process_env(self, container: dict[str, Any], **kwargs: Any) -> dict[str, str]:
        return {**outside_env(), **self.env(container, **kwargs)}

    # -- lifecycle
    def run_init_containers(self) -> None:
        for c in pod_spec(self.obj).get("initContainers", []):
            out = subprocess.run(
                self.command(c["command"] + c.get("args", [])),
                capture_output=True,
                text=True,
                timeout=300,
                env=self.process_env(c),
                cwd=ROOT,
            )
            assert out.returncode == 0, f"{self.name} init container {c['name']}: {out.stdout}{out.stderr}"

    def start(self) -> None:
        c = main_container(self.obj)
        self.log = self.cluster.root / f"{self.name}.log"
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                self.command(c["command"] + c.get("args", [])),
                env=self.process_env(c),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def probe(self, name: str) -> subprocess.CompletedProcess[str]:
        c = main_container(self.obj)
        return subprocess.run(
            self.command(c[name]["exec"]["command"]),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=outside_env(),
        )

    def wait_started(self) -> None:
        """The startup probe, every periodSeconds, until it passes (failureThreshold times at most)."""
        probe = main_container(self.obj)["startupProbe"]
        deadline = time.monotonic() + min(probe["periodSeconds"] * probe["failureThreshold"], 300)
        while True:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            out = self.probe("startupProbe")
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: startup probe failing ({out.stderr}):\n{self.log_tail()}")
            time.sleep(1.0)

    def port(self, name: str) -> int:
        return self.ports[container_port(self.obj, name)]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port('grpc')}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log else ""

    def stop(self) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def outside_env() -> dict[str, str]:
    """This machine's environment without any tessera setting: a container starts from its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}


def container_port(obj: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in main_container(obj)["ports"] if p["name"] == name]
    return port


def register(cluster: Cluster, pod: LocalPod, service: str | None = None) -> None:
    """The Service named after the pod's app (or `service`) answers at the pod's local address."""
    labels = pod.obj["spec"]["template"]["metadata"]["labels"]
    for name, svc in objects("gpu", "Service").items():
        if not svc["spec"]["selector"].items() <= labels.items():
            continue
        for port in svc["spec"]["ports"]:
            local = pod.ports[container_port(pod.obj, port["targetPort"])]
            cluster.dns[f"{service or name}:{port['port']}"] = f"127.0.0.1:{local}"


@dataclass
class LocalSuite:
    cluster: Cluster
    ca: TestCA
    pods: dict[str, LocalPod]

    def client(self, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> TesseraClient:
        return TesseraClient(
            self.pods["gateway"].target, token=token, root_certificates=self.ca.pem, timeout=60, **kwargs
        )


@pytest.fixture(scope="module")
def k8s_suite(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[LocalSuite]:
    root = tmp_path_factory.mktemp("k8s")
    ca = TestCA("tessera k8s test CA")
    cluster = Cluster(root, make_secrets(root / "secrets", ca, TOKENS))
    deployments = objects("cpu", "Deployment")
    pods: dict[str, LocalPod] = {}
    try:
        for name in SERVICES:
            pods[name] = LocalPod(name, deployments[name], cluster)
            pods[name].run_init_containers()  # seeds the model volume (the first one copies)
            pods[name].start()
        for name in SERVICES:
            pods[name].wait_started()
            register(cluster, pods[name])
        pods["gateway"] = LocalPod("gateway", deployments["gateway"], cluster)
        pods["gateway"].start()
        pods["gateway"].wait_started()
        register(cluster, pods["gateway"])
        yield LocalSuite(cluster, ca, pods)
    finally:
        for name in ("gateway", *SERVICES):
            if name in pods:
                pods[name].stop()


# ------------------------------------------------------------------------------------------------
# The Deployments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROCESSES)
def test_every_deployment_starts_from_its_manifest_and_passes_its_probes(
    k8s_suite: LocalSuite, name: str
) -> None:
    pod = k8s_suite.pods[name]
    assert pod.popen is not None and pod.popen.poll() is None, pod.log_tail()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        out = pod.probe(probe)
        assert out.returncode == 0, (name, probe, out.stderr)
    # The process serves what the manifest says: TLS on its gRPC port, /metrics on its metrics port.
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{pod.port('metrics')}/metrics", timeout=10) as r:
        assert b"tessera_request_duration_seconds" in r.read()
    assert pod.log is not None
    (started,) = [line for line in pod.log.read_text(errors="replace").splitlines() if " serving on " in line]
    assert f"({'mTLS' if name in SERVICES else 'TLS'};" in started, started


def test_the_probes_check_the_servers_certificate_and_present_the_pods_own(k8s_suite: LocalSuite) -> None:
    """The probe is no formality: a wrong expected name fails the TLS check, and a model service
    (mutual TLS) refuses a probe that shows no client certificate."""
    pod = k8s_suite.pods["emotion"]
    command = main_container(pod.obj)["livenessProbe"]["exec"]["command"]
    env = outside_env()
    for changed in ([*command, "--no-client-cert"], [w if w != "emotion" else "engagement" for w in command]):
        out = subprocess.run(
            pod.command(changed), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
        )
        assert out.returncode == 1 and "UNAVAILABLE" in out.stderr, (changed, out.stderr)


def test_the_seeded_model_volume_holds_the_images_models(k8s_suite: LocalSuite) -> None:
    volume = k8s_suite.cluster.root / "volumes" / "tessera-models"
    assert sorted(p.name for p in volume.iterdir()) == sorted(
        p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()
    )
    # Seeding again changes nothing (the pods of a rollout all run it).
    pod = k8s_suite.pods["emotion"]
    before = {p: p.stat().st_mtime_ns for p in volume.rglob("*")}
    pod.run_init_containers()
    assert {p: p.stat().st_mtime_ns for p in volume.rglob("*")} == before


def test_the_gateway_serves_tls_with_tokens_and_reaches_every_service_over_mtls(
    k8s_suite: LocalSuite, astronaut_jpeg: bytes
) -> None:
    with k8s_suite.client() as client:
        status = client.status()
        assert {s.state for s in status.services} == {1} and len(status.services) == len(SERVICES), status
        assert [f.label for f in client.classify_image(astronaut_jpeg)] == ["Happy"]
        assert client.score_texts([{"id": "a", "text": "How do plants make food?"}]).rows[0].status.code == 0
    with k8s_suite.client(token=None) as client, pytest.raises(grpc.RpcError) as err:
        client.status()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with k8s_suite.client(token=CLASSIFY_TOKEN) as client, pytest.raises(grpc.RpcError) as err:
        client.status()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with (
        TesseraClient(k8s_suite.pods["gateway"].target, token=ADMIN_TOKEN) as client,
        pytest.raises(grpc.RpcError) as err,
    ):
        client.status(timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext


def test_model_services_let_in_only_the_gateway(k8s_suite: LocalSuite) -> None:
    secrets = k8s_suite.cluster.secrets

    def channel(secret: str | None) -> grpc.Channel:
        key = (secrets / secret / "tls.key").read_bytes() if secret else None
        crt = (secrets / secret / "tls.crt").read_bytes() if secret else None
        creds = grpc.ssl_channel_credentials(k8s_suite.ca.pem, key, crt)
        return grpc.secure_channel(
            k8s_suite.pods["emotion"].target, creds, options=[("grpc.ssl_target_name_override", "emotion")]
        )

    request = emotion_pb.ListModelsRequest()
    with channel("tessera-gateway-client-tls") as ch:
        assert emotion_grpc.EmotionServiceStub(ch).ListModels(request, timeout=10).models
    # A certificate of the same CA, but not the gateway's name: another service's.
    with channel("tessera-engagement-tls") as ch, pytest.raises(grpc.RpcError) as err:
        emotion_grpc.EmotionServiceStub(ch).ListModels(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with channel("tessera-engagement-tls") as ch:  # ... health stays open to it (the probes)
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with channel(None) as ch, pytest.raises(grpc.RpcError) as err:  # no client certificate at all
        emotion_grpc.EmotionServiceStub(ch).ListModels(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_placeholder_tokens_let_no_call_in_and_the_drain_ends_within_the_grace_period(
    k8s_suite: LocalSuite, tmp_path: Path
) -> None:
    """A gateway started with deploy/k8s/secrets' placeholder token file refuses every call; on
    SIGTERM its readiness fails at once and it exits 0 well within terminationGracePeriodSeconds
    less the preStop sleep."""
    secrets = tmp_path / "secrets"
    for source in k8s_suite.cluster.secrets.iterdir():
        target = secrets / source.name
        target.mkdir(parents=True)
        for f in source.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    placeholder = objects("secrets", "Secret")["tessera-gateway-tokens"]["stringData"]["tokens.yaml"]
    (secrets / "tessera-gateway-tokens" / "tokens.yaml").write_text(placeholder)
    cluster = Cluster(tmp_path, secrets, dict(k8s_suite.cluster.dns))
    dep = objects("cpu", "Deployment")["gateway"]
    pod = LocalPod("gateway-placeholder", dep, cluster)
    pod.start()
    try:
        pod.wait_started()
        for token in (None, ADMIN_TOKEN, ""):
            with (
                TesseraClient(pod.target, token=token, root_certificates=k8s_suite.ca.pem) as client,
                pytest.raises(grpc.RpcError) as err,
            ):
                client.status(timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert pod.probe("readinessProbe").returncode == 0
        assert pod.popen is not None
        start = time.monotonic()
        pod.popen.send_signal(signal.SIGTERM)
        assert pod.probe("readinessProbe").returncode != 0
        code = pod.popen.wait(120)
        took = time.monotonic() - start
    finally:
        pod.stop()
    sleep = int(main_container(dep)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert code == 0 and took < pod_spec(dep)["terminationGracePeriodSeconds"] - sleep, (code, took)


# ------------------------------------------------------------------------------------------------
# The shard Job
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job_runner(k8s_suite: LocalSuite) -> Iterator[tuple[LocalPod, LocalPod, Path]]:
    """The Job's pod (reaching the rendered TLS gateway with the CA it mounts), the proxylabel pod
    whose paths the Job names, and the shards folder."""
    cluster = k8s_suite.cluster
    (job,) = objects("shard-job", "Job").values()
    pod = LocalPod("proxylabel-shards", job, cluster)
    proxylabel = k8s_suite.pods["proxylabel"]
    shards = Path(proxylabel.local_path("/data/shards"))
    for index in range(2):
        path = write_shard(
            shards / f"part-{index}.parquet",
            SHARD_ROWS,
            labelled_fraction=0.5,
            seed=index,
            row_group_rows=8,
            id_prefix=f"shard{index}",
        )
        # Text only: the service embeds the rows itself (the demo index's embedder).
        pq.write_table(pq.read_table(path).drop_columns(["embedding"]), path, row_group_size=8)
    yield pod, proxylabel, shards


def job_command(
    pod: LocalPod, proxylabel: LocalPod, index: int, gateway: str = "gateway", extra: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, str]]:
    """The Job container's command line and environment for one completion index, as the kubelet
    builds them; the shard paths are the proxylabel service's, so they are made local through its
    mounts, and the Job's own mounts (the gateway's CA) through the Job pod's."""
    c = main_container(pod.obj)
    env = {k: pod.local_path(v) for k, v in pod.env(c, index=index, paths=proxylabel).items()}
    env["GATEWAY_TARGET"] = pod.cluster.resolve(
        next(e["value"] for e in c["env"] if e["name"] == "GATEWAY_TARGET").replace("gateway:", gateway + ":")
    )
    env["JOB_COMPLETION_INDEX"] = str(index)  # Kubernetes sets it too
    return pod.command(c["command"] + c["args"] + list(extra), env), {**outside_env(), **env}


def test_the_shard_jobs_command_scores_two_indexes(job_runner: tuple[LocalPod, LocalPod, Path]) -> None:
    """The container's own command, args and env (token from the Secret, index from the
    downward API), for JOB_COMPLETION_INDEX 0 and 1 at once, as two pods of the Job."""
    pod, proxylabel, _ = job_runner
    runs = []
    for index in range(2):
        command, env = job_command(pod, proxylabel, index)
        assert command[0] == str(BIN / "tessera-score-shard") and "--gateway" in command
        assert env["TESSERA_TOKEN"] == SHARD_TOKEN
        runs.append(
            subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    labels = Path(proxylabel.local_path("/data/labels"))
    for index, run in enumerate(runs):
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, (index, stdout, stderr)
        out = labels / f"part-{index}"
        assert f"{SHARD_ROWS} rows" in stdout, stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["state"] == "succeeded", manifest
        parts = sorted(out.glob("part-*.parquet"))
        ids = [i for part in parts for i in pq.read_table(part).column("id").to_pylist()]
        assert sorted(ids) == [f"shard{index}-{i:08d}" for i in range(SHARD_ROWS)]  # its own rows, each once


def fail_job_codes(pod: LocalPod) -> set[int]:
    rules = pod.obj["spec"]["podFailurePolicy"]["rules"]
    return {v for r in rules if r["action"] == "FailJob" for v in r["onExitCodes"]["values"]}


def test_the_shard_jobs_exit_codes_are_the_ones_its_failure_policy_expects(
    job_runner: tuple[LocalPod, LocalPod, Path],
) -> None:
    """A command line the CLI refuses exits 2, which fails the whole Job at once (no index can
    do better: this is what a wrong flag such as the old --target did); a missing shard exits 1,
    retried for that index alone (backoffLimitPerIndex)."""
    pod, proxylabel, _ = job_runner
    fail_job = fail_job_codes(pod)
    command, env = job_command(pod, proxylabel, 0, extra=("--no-such-flag",))
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.returncode in fail_job, out.stderr
    command, env = job_command(pod, proxylabel, 7)  # no part-7.parquet
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.returncode not in fail_job, (out.stdout, out.stderr)
    assert "NOT_FOUND" in out.stderr
    env["TESSERA_TOKEN"] = ""  # the placeholder Secret's token
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr, out.stderr


def test_the_shard_jobs_command_reaches_the_tls_gateway(job_runner: tuple[LocalPod, LocalPod, Path]) -> None:
    pod, proxylabel, _ = job_runner
    command, env = job_command(pod, proxylabel, 0, gateway="gateway", extra=("--reconnect-seconds", "3"))
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
