"""deploy/: every file parses; the Kubernetes overlays render with kustomize (kubectl's) and
validate strictly against a pinned Kubernetes version (kubernetes-validate), and hang together
(ports, probes, TLS Secrets, tokens, NetworkPolicies, PodDisruptionBudgets, autoscaling, Pod
Security "restricted"); Compose validates against the Compose Specification's JSON schema and
`docker-compose config`; promtool accepts the Prometheus configs and rules, and its unit tests fire
every alert; a real Prometheus scraping a real suite answers every query of the Grafana dashboard,
every rule expression and every prometheus-adapter query the autoscalers use.

The rendered Deployments and the shard Job are run as local processes in tests/deploy/test_k8s.py.

Needs the Debian packages `prometheus` (prometheus + promtool) and `docker-compose`, and the
Compose schema under .cache/compose-spec (`make prometheus` installs all three); without them those
tests skip and say so. kubectl and kubernetes-validate come with requirements/test.txt.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from launcher.suite import ROOT, SERVICES, Suite
from services.fusion.rules import parse_rules
from services.runtime.config import GATEWAY_SCOPES, load_config
from tessera_client import TesseraClient
from tests.helpers.deploy import (
    BIN,
    DEPLOY,
    HEALTHCHECK,
    K8S,
    PROCESSES,
    RENDERED,
    SEED_MODELS,
    TOOLS_HINT,
    containers_of,
    dockerfile_env,
    free_port,
    main_container,
    objects,
    pod_spec,
    render,
)
from tests.helpers.suites import start_suite

PROM_DIR = DEPLOY / "prometheus"
COMPOSE_DIR = DEPLOY / "compose"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tessera.json"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts.test.yml"
ADAPTER_VALUES = PROM_DIR / "prometheus-adapter-values.yaml"
GATEWAY_SERVICE = "tessera.gateway.v1.GatewayService"
SERVICE_NAMES = {
    "gateway": GATEWAY_SERVICE,
    "emotion": "tessera.emotion.v1.EmotionService",
    "engagement": "tessera.engagement.v1.EngagementService",
    "proxylabel": "tessera.proxylabel.v1.ProxyLabelService",
}
NAMESPACE = "tessera"

# The Kubernetes version the manifests are validated against (and the namespace's Pod Security
# labels name): the oldest they are written for (Job backoffLimitPerIndex is GA from 1.33).
K8S_VERSION = "1.33.0"
OVERLAYS = ("cpu", "gpu")
CRD_KINDS = {"Certificate", "Issuer", "ServiceMonitor", "PrometheusRule"}

KUBERNETES_VALIDATE = BIN / "kubernetes-validate"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DOCKER_COMPOSE = shutil.which("docker-compose")
INSTALL_HINT = (
    "make prometheus (Debian packages prometheus + docker-compose, and the Compose schema); "
    "it also stops the prometheus system service"
)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not found: {INSTALL_HINT}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus not found: {INSTALL_HINT}")
# The current Compose Specification schema, as the npm package dclint ships it (make prometheus);
# and the one docker-compose v1 (Debian's package) validates with.
COMPOSE_SCHEMA = ROOT / ".cache" / "compose-spec" / "package" / "schemas" / "compose.schema.json"
COMPOSE_V1_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
COMPOSE_FILES = (COMPOSE_DIR / "docker-compose.yml", COMPOSE_DIR / "triton.yml")


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The literal variables of a container (valueFrom ones are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def config_model(process: str) -> type[Any]:
    from gateway.config import GatewayConfig
    from services.emotion.config import EmotionConfig
    from services.engagement.config import EngagementConfig
    from services.proxylabel.config import ProxyLabelConfig

    return {
        "gateway": GatewayConfig,
        "emotion": EmotionConfig,
        "engagement": EngagementConfig,
        "proxylabel": ProxyLabelConfig,
    }[process]


def validate_env(process: str, env: dict[str, str]) -> Any:
    """The process's own config loader accepts these variables (unknown keys are errors)."""
    prefix = f"TESSERA_{process.upper()}__"
    mine = {k: v for k, v in env.items() if k.startswith(prefix)}
    assert mine, f"no {prefix}* variable"
    return load_config(config_model(process), process, environ=mine)


def process_config(name: str, process: str) -> Any:
    """The configuration a rendered Deployment's process runs with (the image's ENV, then its own)."""
    container = main_container(objects(name, "Deployment")[process])
    return validate_env(process, {**dockerfile_env(), **env_of(container)})


def exec_probe(container: dict[str, Any], probe: str) -> list[str]:
    command = container[probe]["exec"]["command"]
    assert command[0] == "tessera-healthcheck", (container["name"], probe, command)
    return command


def probe_option(command: list[str], option: str) -> str | None:
    return command[command.index(option) + 1] if option in command else None


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_metric_names() -> set[str]:
    return {r["name"]["as"] for r in adapter_rules()}


# ------------------------------------------------------------------------------------------------
# Files parse
# ------------------------------------------------------------------------------------------------
def test_deploy_holds_the_expected_files() -> None:
    for rel in (
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "prometheus/alerts.test.yml",
        "prometheus/prometheus-k8s.yml",
        "prometheus/prometheus-adapter-values.yaml",
        "grafana/dashboards/tessera.json",
        "compose/docker-compose.yml",
        "compose/triton.yml",
        "compose/.env",
        "compose/data/.gitignore",
        "docker/Dockerfile",
        "docker/healthcheck.py",
        "docker/seed-models.sh",
        "k8s/sync.py",
        "k8s/base/kustomization.yaml",
        "k8s/overlays/cpu/kustomization.yaml",
        "k8s/overlays/gpu/kustomization.yaml",
        "k8s/components/cert-manager/kustomization.yaml",
        "k8s/components/prometheus-operator/kustomization.yaml",
        "k8s/secrets/kustomization.yaml",
        "k8s/shard-job/job.yaml",
    ):
        assert (DEPLOY / rel).is_file(), rel
    assert list((DEPLOY / "grafana/provisioning/datasources").glob("*.yaml"))
    assert list((DEPLOY / "grafana/provisioning/dashboards").glob("*.yaml"))
    for script in (HEALTHCHECK, SEED_MODELS):
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# ------------------------------------------------------------------------------------------------
# Kubernetes: the files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_k8s_manifest_has_api_version_kind_and_name(path: Path) -> None:
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: document without apiVersion/kind"
        if doc["kind"] not in ("Kustomization", "Component"):
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_kustomizations_use_every_file_of_their_folder() -> None:
    """Each folder's kustomization names only files that exist, and every manifest of the folder
    is used (a forgotten file would silently never be deployed)."""
    folders = [k.parent for k in K8S.rglob("kustomization.yaml")]
    assert {f.relative_to(K8S).as_posix() for f in folders} == {
        "base",
        "overlays/cpu",
        "overlays/gpu",
        "components/cert-manager",
        "components/prometheus-operator",
        "secrets",
        "shard-job",
    }
    for folder in folders:
        (k,) = load_docs(folder / "kustomization.yaml")
        used = set()
        for ref in [
            *k.get("resources", []),
            *k.get("components", []),
            *(p["path"] for p in k.get("patches", [])),
        ]:
            target = (folder / ref).resolve()
            assert target.exists(), f"{folder}: {ref} missing"
            used.add(target)
        for path in folder.glob("*.yaml"):
            assert path.name == "kustomization.yaml" or path.resolve() in used, (
                f"{path} is in no kustomization"
            )
    # Nothing is left at the top of deploy/k8s but the generator.
    assert sorted(p.name for p in K8S.iterdir() if p.is_file()) == ["sync.py"]


def test_generated_objects_are_in_sync() -> None:
    out = subprocess.run(
        [sys.executable, str(K8S / "sync.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------------
# Kubernetes: rendered and validated
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*RENDERED, "full"])
def test_kustomize_renders_into_the_namespace(name: str) -> None:
    docs = render(name)
    assert docs and all(d.get("apiVersion") and d.get("kind") for d in docs)
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, (d["kind"], d["metadata"]["name"])
            assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tessera", d["metadata"]["name"]
        if "template" in d.get("spec", {}):
            for c in [*pod_spec(d).get("initContainers", []), *containers_of(d)]:
                assert c["image"].startswith(("tessera:", "nvcr.io/nvidia/tritonserver:")), c["image"]
                assert not c["image"].endswith(":latest"), c["image"]


@pytest.mark.parametrize("name", [*RENDERED, "full"])
def test_rendered_objects_validate_strictly(name: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict (unknown fields are errors) against K8S_VERSION; only the CRD
    kinds of the optional components have no schema there (checked field by field below)."""
    assert KUBERNETES_VALIDATE.exists(), f"{KUBERNETES_VALIDATE} missing: {TOOLS_HINT}"
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(name)))
    out = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", K8S_VERSION, str(rendered)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    passed = [line for line in lines if line.startswith("INFO") and "passed" in line]
    warned = [line for line in lines if line.startswith("WARN")]
    assert len(passed) == len([d for d in render(name) if d["kind"] not in CRD_KINDS]), out.stdout
    kinds = {re.search(r"kind (\w+) ", w).group(1) for w in warned}  # type: ignore[union-attr]
    assert kinds <= CRD_KINDS, warned


def test_strict_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    """The validator is not a rubber stamp: a field Kubernetes does not know fails."""
    job = json.loads(json.dumps(objects("shard-job", "Job")["proxylabel-shards"]))
    job["spec"]["backoffLimitPerIndexx"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    out = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", K8S_VERSION, str(bad)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "backoffLimitPerIndexx" in out.stdout, out.stdout


# Pod Security Standards, "restricted" profile (baseline included), field by field.
PSS_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
PSS_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What keeps a pod spec from Pod Security "restricted" (empty: it passes); plus our own rule
    that every container's root filesystem is read-only."""
    bad = []
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= PSS_VOLUME_TYPES:
            bad.append(f"volume {volume['name']}: {kinds - PSS_VOLUME_TYPES}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in PSS_SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    if pod.get("runAsUser") == 0 or pod.get("runAsGroup") == 0:
        bad.append("pod runs as root")
    if pod.get("seLinuxOptions", {}).get("type") not in (
        None,
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
        "container_engine_t",
    ):
        bad.append("pod seLinuxOptions.type")
    for c in [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities.add {caps['add']}")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp.get('type')}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: readOnlyRootFilesystem is not true")
    return bad


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}/{o['kind']}/{o['metadata']['name']}", o)
        for name in RENDERED
        for o in render(name)
        if "template" in o.get("spec", {})
    ]


def test_every_pod_meets_pod_security_restricted() -> None:
    templates = pod_templates()
    assert {t.split("/", 1)[1] for t, _ in templates} >= {
        "Deployment/gateway",
        "Deployment/emotion",
        "Deployment/engagement",
        "Deployment/proxylabel",
        "Deployment/triton",
        "Job/proxylabel-shards",
    }
    failures = {where: restricted_violations(pod_spec(o)) for where, o in templates}
    assert not {k: v for k, v in failures.items() if v}, failures
    # The checker itself: a pod as the old manifests had it fails on each missing field.
    old = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False}}],
    }
    assert restricted_violations(old) == [
        "c: capabilities.drop lacks ALL",
        "c: seccompProfile None",
        "c: readOnlyRootFilesystem is not true",
    ]


def test_the_namespace_enforces_pod_security_restricted() -> None:
    for name in OVERLAYS:
        (ns,) = objects(name, "Namespace").values()
        labels = ns["metadata"]["labels"]
        assert ns["metadata"]["name"] == NAMESPACE
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
            assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "v" + K8S_VERSION.rsplit(".", 1)[0]


def test_every_pod_has_its_own_service_account_without_a_token() -> None:
    accounts = objects("gpu", "ServiceAccount")
    used: dict[str, set[str]] = {}
    for where, o in pod_templates():
        spec = pod_spec(o)
        assert spec.get("automountServiceAccountToken") is False, where
        account = spec.get("serviceAccountName")
        assert account in accounts, f"{where}: ServiceAccount {account} not rendered"
        render_name = where.split("/")[0]
        assert account not in used.setdefault(render_name, set()), f"{where}: {account} is shared"
        used[render_name].add(account)
    assert all(a.get("automountServiceAccountToken") is False for a in accounts.values())
    # No Role, RoleBinding or any RBAC: nothing of the suite talks to the API server.
    assert not [o for name in RENDERED for o in render(name) if "rbac" in o["apiVersion"]]


# ------------------------------------------------------------------------------------------------
# Kubernetes: the processes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_process_has_a_deployment_service_hpa_and_pdb(overlay: str) -> None:
    deployments, services = objects(overlay, "Deployment"), objects(overlay, "Service")
    hpas, pdbs = objects(overlay, "HorizontalPodAutoscaler"), objects(overlay, "PodDisruptionBudget")
    assert set(hpas) == set(PROCESSES)
    for name in PROCESSES:
        dep = deployments[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/part-of"] == "tessera"
        c = main_container(dep)
        assert c["command"] == [f"tessera-{name}"] and "args" not in c
        env = env_of(c)
        prefix = f"TESSERA_{name.upper()}__"
        assert env[prefix + "SERVER__HOST"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        config = process_config(overlay, name)
        assert config.server.port == ports["grpc"] and config.server.metrics_port == ports["metrics"]
        assert int(env[prefix + "SERVER__PORT"]) == ports["grpc"]
        assert int(env[prefix + "SERVER__METRICS_PORT"]) == ports["metrics"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert int(probe_option(exec_probe(c, probe), "--port")) == ports["grpc"], (name, probe)
        svc = services[name]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
        # Autoscaled on work, and the HPA alone owns the replica count.
        assert "replicas" not in dep["spec"], f"{name}: a fixed replicas fights the HPA on every apply"
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert "tessera_admission_queued" in custom and set(custom) <= adapter_metric_names(), (name, custom)
        assert {"tessera_unary_requests_in_flight", "tessera_streams_in_flight"} & set(custom)
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Resource":
                assert m["resource"]["name"] in c["resources"]["requests"], (
                    name,
                    "HPA on an unrequested resource",
                )
        # Voluntary disruptions take one pod at a time; a broken pod never blocks a node drain.
        pdb = pdbs[name]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert (
            pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        )
    # Every other Deployment (Triton) has a fixed size and no HPA, and a PDB too.
    for name, dep in deployments.items():
        assert name in pdbs, f"{name}: no PodDisruptionBudget"
        assert (name in hpas) == ("replicas" not in dep["spec"]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_liveness_on_the_process_readiness_on_its_service(overlay: str) -> None:
    """Exec probes (the kubelet's gRPC probe speaks no TLS) through the process's TLS: liveness and
    startup ask the process's own health (""), readiness its service's entry; for the gateway, its
    own service, never the per-service entries (one service down must not unready every gateway)."""
    deployments = objects(overlay, "Deployment")
    for name in PROCESSES:
        c = main_container(deployments[name])
        config = process_config(overlay, name)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = exec_probe(c, probe)
            assert c[probe]["timeoutSeconds"] >= 3 and c[probe]["periodSeconds"] >= 5
            service = probe_option(command, "--service")
            assert service == (SERVICE_NAMES[name] if probe == "readinessProbe" else None), (name, probe)
            # The probe speaks the server's TLS: the folder of the server's own certificate ...
            tls_dir = probe_option(command, "--tls-dir")
            assert tls_dir and Path(config.server.tls.cert_file).parent == Path(tls_dir) and tls_dir in mounts
            # ... verified under the name of the Service the clients use.
            assert probe_option(command, "--server-name") == name
            # A mutual-TLS server gets the pod's own certificate (health is open to any of the CA).
            assert ("--no-client-cert" in command) == (config.server.tls.client_ca_file is None), (
                name,
                probe,
            )
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
        assert c["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_covers_the_drain(overlay: str) -> None:
    """preStop waits while the endpoint is withdrawn, then SIGTERM starts the drain
    (server.grace_seconds); the kubelet must not kill the process before both are over."""
    for name, dep in objects(overlay, "Deployment").items():
        c = main_container(dep)
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) >= 3, (name, sleep)
        if name in PROCESSES:
            grace = process_config(overlay, name).server.grace_seconds
        else:  # Triton: how long it waits for requests in flight
            (grace,) = [float(a.split("=")[1]) for a in c["args"] if a.startswith("--exit-timeout-secs=")]
        assert pod_spec(dep)["terminationGracePeriodSeconds"] >= int(sleep[1]) + grace + 5, name


def test_tls_everywhere_and_only_the_gateway_is_trusted() -> None:
    for overlay in OVERLAYS:
        gateway = process_config(overlay, "gateway")
        assert gateway.server.tls is not None and gateway.server.tls.client_ca_file is None  # TLS, any client
        assert gateway.auth.token_file is not None  # ... with bearer tokens
        tls = gateway.downstream.tls
        assert tls is not None and tls.cert_file and tls.key_file  # mTLS to the services
        for name in SERVICES:
            config = process_config(overlay, name)
            assert config.server.tls is not None and config.server.tls.client_ca_file is not None, name
            assert config.auth.trusted_peers == ["gateway"], name
            assert not config.auth.tokens and config.auth.token_file is None, name
            assert not config.auth.open_reflection


def secret_keys_used(overlay: str) -> dict[str, set[str]]:
    """Secret name -> the files of it that some process or probe of the overlay reads."""
    used: dict[str, set[str]] = {}
    for where, o in pod_templates():
        if not where.startswith((f"{overlay}/", "shard-job/")):
            continue
        spec = pod_spec(o)
        secrets = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in secrets:
                    continue
                assert "subPath" not in mount, f"{where}: a subPath mount never sees a renewed Secret"
                assert mount.get("readOnly") is True, f"{where}: {mount['mountPath']}"
                texts = [e.get("value", "") for e in c.get("env", [])] + [
                    a
                    for p in ("startupProbe", "livenessProbe", "readinessProbe")
                    if p in c
                    for a in c[p].get("exec", {}).get("command", [])
                ]
                prefix = mount["mountPath"] + "/"
                files = {t[len(prefix) :] for t in texts if t.startswith(prefix)}
                probe_dirs = [t for t in texts if t == mount["mountPath"]]
                if probe_dirs:  # tessera-healthcheck --tls-dir: ca.crt, tls.crt, tls.key
                    files |= {"ca.crt", "tls.crt", "tls.key"}
                assert files, f"{where}: {mount['mountPath']} is mounted but nothing reads it"
                used.setdefault(secrets[mount["name"]]["secretName"], set()).update(files)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    return used


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_a_pod_reads_is_provided(overlay: str) -> None:
    """The TLS Secrets come from the cert-manager component (tls.crt, tls.key, ca.crt), the token
    Secrets from the placeholders (deploy/k8s/secrets), each with the keys the pods read."""
    provided: dict[str, set[str]] = {}
    for cert in objects("full", "Certificate").values():
        provided[cert["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    for secret in objects("secrets", "Secret").values():
        provided[secret["metadata"]["name"]] = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    used = secret_keys_used(overlay)
    assert set(used) == {
        "tessera-gateway-tls",
        "tessera-gateway-client-tls",
        "tessera-emotion-tls",
        "tessera-engagement-tls",
        "tessera-proxylabel-tls",
        "tessera-gateway-tokens",
        "tessera-shard-token",
    }
    for name, keys in used.items():
        assert name in provided, (
            f"Secret {name} is read but neither cert-manager nor the placeholders make it"
        )
        assert keys <= provided[name], (name, keys - provided[name])


def test_placeholder_secrets_hold_no_usable_token() -> None:
    from services.runtime.config import TokenFile

    secrets = objects("secrets", "Secret")
    text = secrets["tessera-gateway-tokens"]["stringData"]["tokens.yaml"]
    tokens = TokenFile.model_validate(yaml.safe_load(text))
    assert tokens.tokens == []  # a token file that lets nobody in (and parses)
    assert secrets["tessera-shard-token"]["stringData"]["token"] == ""
    # The overlays make none: applied again, they must never overwrite the real ones.
    assert not [o for o in render("full") if o["kind"] == "Secret"]


def test_certificates_carry_the_names_clients_and_probes_check() -> None:
    certs = {c["spec"]["secretName"]: c["spec"] for c in objects("full", "Certificate").values()}
    issuers = objects("full", "Issuer")
    ca = objects("full", "Certificate")["tessera-ca"]["spec"]
    assert ca["isCA"] is True and issuers["tessera-ca"]["spec"]["ca"]["secretName"] == ca["secretName"]
    gateway = process_config("cpu", "gateway")
    for name in SERVICES:
        spec = certs[f"tessera-{name}-tls"]
        m = re.fullmatch(r"dns:///([a-z0-9-]+):\d+", getattr(gateway.targets, name))
        assert m
        host = m.group(1)
        assert host in spec["dnsNames"] and f"{name}.{NAMESPACE}.svc" in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"]), name  # client: its own probe
        assert spec["issuerRef"]["name"] == "tessera-ca"
    client = certs["tessera-gateway-client-tls"]
    trusted = process_config("cpu", "emotion").auth.trusted_peers
    assert client["commonName"] in trusted and "client auth" in client["usages"]
    server = certs["tessera-gateway-tls"]
    assert "gateway" in server["dnsNames"] and "server auth" in server["usages"]
    for spec in certs.values():
        if not spec.get("isCA"):
            assert spec["privateKey"]["rotationPolicy"] == "Always"  # a renewal brings a new key


def test_gateway_targets_are_headless_services_through_dns() -> None:
    services = objects("cpu", "Service")
    env = env_of(main_container(objects("cpu", "Deployment")["gateway"]))
    for name in SERVICES:
        target = env[f"TESSERA_GATEWAY__TARGETS__{name.upper()}"]
        m = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert m, target
        svc = services[m.group(1)]
        assert svc["spec"].get("clusterIP") == "None", (
            f"{m.group(1)} must be headless for round-robin over pods"
        )
        assert int(m.group(2)) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}


def test_fusion_rules_configmap_is_mounted_where_the_gateway_reads_it() -> None:
    dep = objects("cpu", "Deployment")["gateway"]
    c = main_container(dep)
    rules_path = Path(env_of(c)["TESSERA_GATEWAY__RULES_PATH"])
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if rules_path.parent == Path(m["mountPath"])]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    cm = objects("cpu", "ConfigMap")[cm_name]
    assert cm_name == "tessera-fusion-rules", "a hashed name would roll the gateways instead of reloading"
    parse_rules(cm["data"][rules_path.name], f"ConfigMap {cm_name}")  # valid for the gateway's schema


def test_models_live_on_a_shared_volume_seeded_from_the_image() -> None:
    """Every model service (and Triton) reads the repository from the PVC tessera-models, read-only,
    and polls it for new versions; an init container seeds it from the image first."""
    for overlay in OVERLAYS:
        deployments = objects(overlay, "Deployment")
        claims = objects(overlay, "PersistentVolumeClaim")
        for name, dep in deployments.items():
            if name == "gateway":
                continue
            spec = pod_spec(dep)
            volumes = {v["name"]: v for v in spec["volumes"]}
            claim = {n: v.get("persistentVolumeClaim", {}).get("claimName") for n, v in volumes.items()}
            (mount,) = [
                m for m in main_container(dep)["volumeMounts"] if claim[m["name"]] == "tessera-models"
            ]
            assert mount.get("readOnly") is True, name
            (seed,) = spec["initContainers"]
            assert seed["command"] == ["tessera-seed-models", "/app/model_repository", mount["mountPath"]], (
                name
            )
            assert seed["image"].startswith("tessera:")
            if name in SERVICES:
                config = process_config(overlay, name)
                assert str(config.model_repository) == mount["mountPath"]
                assert config.repository_poll_seconds is not None  # new versions are picked up
        assert claims["tessera-models"]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claims["tessera-shards"]["spec"]["accessModes"] == ["ReadWriteMany"]


PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def app_peer(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}


def prometheus_peers(rule: dict[str, Any]) -> bool:
    return rule.get("from") == [PROMETHEUS_PEER]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_gateway_in_and_only_prometheus_scrape(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    deployments = objects(overlay, "Deployment")

    def ingress_rules(labels: dict[str, str]) -> list[dict[str, Any]]:
        return [
            rule
            for p in policies.values()
            if "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", [])
            if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        ]

    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"] for p in main_container(dep)["ports"]}
        rules = ingress_rules(labels)
        assert rules, f"{name}: no ingress allowed at all"
        for rule in rules:
            rule_ports = {p["port"] for p in rule["ports"]}
            assert rule_ports <= ports, (name, rule_ports)
            if "metrics" in rule_ports:
                assert rule_ports == {"metrics"} and prometheus_peers(rule), (
                    name,
                    "/metrics beyond Prometheus",
                )
            elif name == "gateway":
                assert rule_ports == {"grpc"} and "from" not in rule  # the public API
            elif name == "triton":
                assert rule["from"] == [app_peer("emotion")]
            else:  # a model service: the gateway only
                assert rule["from"] == [app_peer("gateway")]
        assert any("metrics" in {p["port"] for p in r["ports"]} for r in rules), (
            name,
            "Prometheus cannot scrape",
        )
    # Egress: DNS for every pod; otherwise only suite-internal gRPC (gateway -> services,
    # emotion -> Triton, shard Job -> gateway).
    dns = policies["allow-dns"]["spec"]
    assert dns["podSelector"] == {} and [p["port"] for r in dns["egress"] for p in r["ports"]] == [53, 53]
    for name, p in policies.items():
        for rule in p["spec"].get("egress", []) if name != "allow-dns" else []:
            assert [port["port"] for port in rule["ports"]] == ["grpc"], name
            assert all(set(peer) == {"podSelector"} for peer in rule["to"]), name
    egress = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for p in policies.values()
        if p["spec"].get("egress") and p["spec"]["podSelector"]
    }
    assert egress == {"gateway", "proxylabel-shards", *(["emotion"] if overlay == "gpu" else [])}


def test_the_gpu_overlay_runs_triton_on_gpu_nodes_for_the_emotion_service() -> None:
    deployments = objects("gpu", "Deployment")
    triton = deployments["triton"]
    spec = pod_spec(triton)
    c = main_container(triton)
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:") and c["image"].endswith("-py3")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    args = c["args"]
    assert "--model-control-mode=explicit" in args
    loaded = {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--grpc-port={ports['grpc']}" in args and f"--metrics-port={ports['metrics']}" in args
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/emotion_student/ready"
    # The emotion service of this overlay sends its models there; the other services stay in-process.
    emotion = process_config("gpu", "emotion")
    assert emotion.backend == "triton" and emotion.triton.control_models
    assert set(emotion.triton.models or ()) <= loaded and "emotion_student" in (emotion.triton.models or ())
    host, port = emotion.triton.url.split(":")
    triton_svc = objects("gpu", "Service")[host]
    assert int(port) in {p["port"] for p in triton_svc["spec"]["ports"] if p["name"] == "grpc"}
    assert triton_svc["spec"]["selector"].items() <= triton["spec"]["template"]["metadata"]["labels"].items()
    # The repository's configs name the backends Triton serves them with: onnxruntime and FIL.
    repository = ROOT / "model_repository"
    for model in loaded:
        text = (repository / model / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in text or 'backend: "fil"' in text, model
    assert process_config("cpu", "emotion").backend == "onnxruntime"
    for name in ("engagement", "proxylabel"):
        assert process_config("gpu", name) == process_config("cpu", name)


def test_prometheus_operator_component_scrapes_every_process_and_holds_the_rules() -> None:
    (monitor,) = objects("full", "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    for name, svc in objects("full", "Service").items():
        assert selector.items() <= svc["metadata"]["labels"].items(), name
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}, name
        assert svc["metadata"]["labels"]["app.kubernetes.io/name"] == name  # job = the process's name
    (rule,) = objects("full", "PrometheusRule").values()
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_shard_job_is_indexed_and_scores_its_shard_through_the_gateway() -> None:
    (job,) = objects("shard-job", "Job").values()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] >= 1 and spec["parallelism"] >= 1
    c = main_container(job)
    assert c["command"] == ["tessera-score-shard"]
    args = c["args"]
    assert args[:2] == ["--gateway", "$(GATEWAY_TARGET)"]
    assert " ".join(args).count("$(SHARD_INDEX)") == 2  # input and output path
    env = {e["name"]: e for e in c["env"]}
    assert (
        env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # Its token, from a Secret, in the variable the CLI reads.
    assert env["TESSERA_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "tessera-shard-token",
        "key": "token",
    }
    target = env["GATEWAY_TARGET"]["value"]
    host, port = re.fullmatch(r"(?:dns:///)?([a-z0-9-]+):(\d+)", target).groups()  # type: ignore[union-attr]
    assert int(port) in {p["port"] for p in objects("cpu", "Service")[host]["spec"]["ports"]}
    # Retries per index; a command line the CLI refuses (exit 2) fails the Job at once; evictions
    # do not count.
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    fail_job = {
        "action": "FailJob",
        "onExitCodes": {"containerName": c["name"], "operator": "In", "values": [2]},
    }
    assert fail_job in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert pod_spec(job)["restartPolicy"] == "Never"
    # The paths are opened by the proxylabel pods: they mount the shared volume and allow its folders.
    proxylabel = objects("cpu", "Deployment")["proxylabel"]
    config = process_config("cpu", "proxylabel")
    mounts = {m["mountPath"] for m in main_container(proxylabel)["volumeMounts"]}
    roots = [str(p) for p in (*config.input_roots, *config.output_roots)]
    for var in ("SHARD_INPUT_DIR", "SHARD_OUTPUT_DIR"):
        path = env[var]["value"]
        assert path in roots and any(path.startswith(m + "/") for m in mounts), path
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(proxylabel)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert "tessera-shards" in claims and "tessera-shards" in objects("cpu", "PersistentVolumeClaim")
    # The gateway lets its token's scope run it.
    assert GATEWAY_SCOPES["ScoreShard"] == "shard"


def test_adapter_rules_read_metrics_the_processes_export() -> None:
    """Every tessera_* series and label the prometheus-adapter queries read is one that
    services/runtime/metrics.py exports (a typo would hide behind the rules' `or 0 * up`)."""
    from services.runtime.metrics import Metrics

    families = {c._name: c for c in Metrics("x").registry._collector_to_names}  # type: ignore[attr-defined]
    for rule in adapter_rules():
        for metric, labels in re.findall(r"(tessera_\w+)\{([^}]*)\}", rule["metricsQuery"]):
            assert metric in families, metric
            selectors = labels.replace("<<.LabelMatchers>>", "")
            used = {m.group(1) for m in re.finditer(r"(\w+)\s*[!=]~?", selectors)}
            assert used <= set(families[metric]._labelnames), (metric, used)


# ------------------------------------------------------------------------------------------------
# Compose and Docker
# ------------------------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_runs_every_process_from_one_image_with_prometheus_and_grafana() -> None:
    services = compose()["services"]
    images = {services[p]["image"] for p in PROCESSES}
    assert len(images) == 1
    for p in PROCESSES:
        assert services[p]["command"] == [f"tessera-{p}"]
        assert services[p]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert {"prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} missing"
    # Prometheus scrapes the compose service names on their metrics port.
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for p in PROCESSES:
        (target,) = jobs[p]["static_configs"][0]["targets"]
        assert target == f"{p}:9100"
    assert "triton" in jobs
    gw_env = compose_env(services["gateway"])
    for p in PROCESSES:
        config = validate_env(p, {**dockerfile_env(), **compose_env(services[p])})
        # Docker's health check: the process's own health on its port (plaintext in Compose).
        test = services[p]["healthcheck"]["test"]
        assert (
            test[:2] == ["CMD", "tessera-healthcheck"]
            and int(test[test.index("--port") + 1]) == config.server.port
        )
        assert config.server.tls is None and "--tls-dir" not in test
    for s in SERVICES:
        assert services["gateway"]["depends_on"][s] == {"condition": "service_healthy"}
    for s in SERVICES:
        assert gw_env[f"TESSERA_GATEWAY__TARGETS__{s.upper()}"].startswith(f"dns:///{s}:")


def test_compose_publishes_only_on_localhost_and_generates_grafanas_password() -> None:
    services = compose()["services"]
    env_file = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name, service in services.items():
        for port in service.get("ports", []):
            host = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env_file.get(m.group(1), m.group(2)), str(port))
            assert host.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    grafana = compose_env(services["grafana"])
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana and grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    password_file = Path(grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"])
    (volume,) = [
        v.split(":")[0]
        for v in services["grafana"]["volumes"]
        if v.split(":")[1] == str(password_file.parent)
    ]
    generator = services["grafana-password"]
    assert f"{volume}:/secrets" in generator["volumes"]
    assert f"/secrets/{password_file.name}" in generator["command"][2]
    assert services["grafana"]["depends_on"]["grafana-password"] == {
        "condition": "service_completed_successfully"
    }
    assert "secrets.token_urlsafe" in generator["command"][2]
    assert env_file["COMPOSE_PROJECT_NAME"] == "tessera" and "name" not in compose()


def run_one_off(service: str, mounts: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    """A one-off Compose service's command, run here as in its container (its mounts moved to
    local folders, the image's commands and files found in this checkout)."""
    command = compose()["services"][service]["command"]
    if command[:2] == ["sh", "-c"]:
        args = ["sh", "-c", command[2].replace("$$", "$")]  # Compose's escape of a literal $
    else:
        args = [str(SEED_MODELS) if command[0] == "tessera-seed-models" else command[0], *command[1:]]
        args = [str(ROOT / "model_repository") if a == "/app/model_repository" else a for a in args]
    for inside, outside in mounts.items():
        args = [re.sub(rf"(?<![\w/]){re.escape(inside)}(?![\w-])", str(outside), a) for a in args]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_compose_generates_grafanas_password_once(tmp_path: Path) -> None:
    secrets = tmp_path / "grafana-secrets"
    secrets.mkdir()
    for _ in range(2):
        out = run_one_off("grafana-password", {"/secrets": secrets})
        assert out.returncode == 0, out.stderr
    password = (secrets / "admin_password").read_text().strip()
    assert len(password) >= 24 and password != "admin"
    assert (secrets / "admin_password").stat().st_mode & 0o777 == 0o444  # Grafana's uid reads it
    assert run_one_off("grafana-password", {"/secrets": secrets}).returncode == 0
    assert (secrets / "admin_password").read_text().strip() == password  # kept across restarts


@pytest.mark.skipif(os.geteuid() != 0, reason="data-init runs as root in its container (chown)")
def test_compose_data_init_gives_each_folder_its_owner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 1234, 5678)  # ./data, as the person who cloned the repository owns it
    out = run_one_off("data-init", {"/data": data})
    assert out.returncode == 0, out.stderr
    shards, labels = (data / "shards").stat(), (data / "labels").stat()
    assert (shards.st_uid, shards.st_gid) == (1234, 5678)  # input: the person's
    assert (labels.st_uid, labels.st_gid) == (
        10001,
        5678,
    ) and labels.st_mode & 0o7777 == 0o2775  # the service's
    assert run_one_off("data-init", {"/data": data}).returncode == 0  # again: nothing changes


def test_compose_models_init_seeds_the_model_volume(tmp_path: Path) -> None:
    models = tmp_path / "models"
    out = run_one_off("models-init", {"/models": models})
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in models.iterdir()) == sorted(
        p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()
    )


def test_compose_proxylabel_reads_and_writes_the_data_folders() -> None:
    services = compose()["services"]
    proxylabel = services["proxylabel"]
    config = validate_env("proxylabel", {**dockerfile_env(), **compose_env(proxylabel)})
    assert [str(p) for p in config.input_roots] == ["/data/shards"]
    assert [str(p) for p in config.output_roots] == ["/data/labels"]
    assert "./data:/data" in proxylabel["volumes"]
    assert proxylabel["depends_on"]["data-init"]["condition"] == "service_completed_successfully"
    for name in SERVICES:
        config = validate_env(name, {**dockerfile_env(), **compose_env(services[name])})
        assert str(config.model_repository) == "/models" and "models:/models:ro" in services[name]["volumes"]
        assert services[name]["depends_on"]["models-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize(
    "schema_path", [COMPOSE_SCHEMA, COMPOSE_V1_SCHEMA], ids=["compose-spec", "compose-v1"]
)
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification_schema(schema_path: Path, path: Path) -> None:
    if not schema_path.is_file():
        pytest.skip(f"{schema_path} missing: {INSTALL_HINT}")
    schema = json.loads(schema_path.read_text())
    validator_class = (
        jsonschema.Draft201909Validator
        if "2019-09" in schema.get("$schema", "")
        else jsonschema.Draft7Validator
    )
    validator = validator_class(schema)
    document = yaml.safe_load(path.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, errors
    # Not a rubber stamp: the top-level `name` that docker-compose v1 rejects, an unknown key.
    bad = {"services": {"x": {"image": "x", "bogus": 1}}}
    assert list(validator.iter_errors(bad))


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["suite", "suite+triton"])
def test_docker_compose_config_accepts_the_files(files: tuple[Path, ...]) -> None:
    if DOCKER_COMPOSE is None:
        pytest.skip(f"docker-compose not found: {INSTALL_HINT}")
    args = [DOCKER_COMPOSE, *(a for f in files for a in ("-f", str(f))), "config"]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
    )
    assert out.returncode == 0, out.stderr
    merged = yaml.safe_load(out.stdout)
    assert "127.0.0.1:50051:50051" in str(merged["services"]["gateway"]["ports"])
    if len(files) > 1:
        env = merged["services"]["emotion"]["environment"]
        config = validate_env("emotion", {**dockerfile_env(), **env})
        assert config.backend == "triton" and config.triton.url == "triton:8001"
        assert "triton" in merged["services"]["emotion"]["depends_on"]


def test_dockerfile_builds_the_serving_image_without_torch() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "pip install -r /tmp/src/requirements/serve.txt" in text
    assert "tessera-models" in text
    assert "torch" not in re.sub(r"#.*", "", text)
    copies = re.findall(r"^COPY (.+)$", text, re.MULTILINE)
    for line in copies:
        for source in [w for w in line.split() if not w.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} missing"
    # The helpers the manifests call, under the names they call them.
    assert "deploy/docker/healthcheck.py /usr/local/bin/tessera-healthcheck" in copies
    assert "deploy/docker/seed-models.sh /usr/local/bin/tessera-seed-models" in copies
    assert "chmod 0755 /usr/local/bin/tessera-healthcheck /usr/local/bin/tessera-seed-models" in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    env = dockerfile_env()
    for p in PROCESSES:
        assert env[f"TESSERA_{p.upper()}__SERVER__METRICS_PORT"] == "9100"
        assert env[f"TESSERA_{p.upper()}__SERVER__HOST"] == "0.0.0.0"
        validate_env(p, env)


# ------------------------------------------------------------------------------------------------
# Grafana dashboard (structure; the queries are checked live below)
# ------------------------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def test_dashboard_structure() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, (panel["title"], var)
    text = json.dumps(d)
    for metric in (
        "tessera_request_duration_seconds_count",
        "tessera_request_duration_seconds_bucket",
        "tessera_request_errors_total",
        "tessera_requests_in_flight",
        "tessera_stage_duration_seconds_bucket",
        "tessera_model_inference_seconds_bucket",
        "tessera_batch_size_bucket",
        "tessera_shard_rows_scored_total",
        "tessera_fusion_rules_info",
    ):
        assert metric in text, metric
    datasource = load_docs(next((DEPLOY / "grafana/provisioning/datasources").glob("*.yaml")))[0]
    assert "prometheus" in {ds["uid"] for ds in datasource["datasources"]}


# ------------------------------------------------------------------------------------------------
# promtool
# ------------------------------------------------------------------------------------------------
def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=60)


@needs_promtool
def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests_fire_every_alert_and_stay_silent_on_a_healthy_suite() -> None:
    out = promtool("test", "rules", ALERT_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    # Every alert of alerts.yml is tested both ways: firing on a synthetic series that breaks its
    # objective, silent on the healthy suite.
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    fired, silent = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
            for alert in check["exp_alerts"]:
                assert alert["exp_annotations"]["summary"] and alert["exp_annotations"]["runbook"]
    assert fired == alerts, alerts - fired
    assert silent >= alerts, alerts - silent


@needs_promtool
def test_promtool_check_k8s_config(tmp_path: Path) -> None:
    (cm,) = load_docs(K8S / "base" / "prometheus-config.yaml")
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    if out.returncode != 0 and "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check the rest of the config
        # with static targets in place of the discovery.
        config = yaml.safe_load(cm["data"]["prometheus.yml"])
        for job in config["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


class Prometheus:
    def __init__(self, base: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.base = base
        self.popen = popen
        self.log = log

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def result(self, expr: str) -> list[dict[str, Any]]:
        reply = self.query(expr)
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def wait_for(what: str, check: Any, timeout: float = 60.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def call_bad(client: TesseraClient) -> None:
    """A request the gateway refuses as a whole (no images): INVALID_ARGUMENT, a client error."""
    with pytest.raises(grpc.RpcError) as err:
        client.classify([])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, model_repository: Path, astronaut_jpeg: bytes
) -> Iterator[tuple[Prometheus, Suite]]:
    if PROMETHEUS is None:
        pytest.skip(f"prometheus not found: {INSTALL_HINT}")
    work = tmp_path_factory.mktemp("deploy")
    suite = start_suite(work / "suite", model_repository, data_roots=(work,))
    popen = None
    try:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                # namespace and pod as deploy/prometheus/prometheus-k8s.yml's relabelling (and the
                # Prometheus Operator) add them: what the prometheus-adapter rules map to pods.
                {
                    "job_name": name,
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{proc.metrics_port}"],
                            "labels": {"namespace": NAMESPACE, "pod": live_pod(name)},
                        }
                    ],
                }
                for name, proc in suite.processes.items()
            ],
        }
        config_file = work / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        log = work / "prometheus.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
        prom = Prometheus(f"http://127.0.0.1:{port}", popen, log)

        def ready() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"prometheus exited with {popen.returncode}:\n{prom.log_tail()}")
            try:
                with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("prometheus ready", ready, 60)
        wait_for(
            "every target scraped and up",
            lambda: len([r for r in prom.result("up == 1")]) == len(suite.processes),
            60,
        )

        # Traffic in two rounds with scrapes in between, so counters move inside the rate windows.
        with TesseraClient(suite.gateway.target, timeout=60) as client:
            for _ in range(2):
                for _ in range(3):
                    assert client.classify_image(astronaut_jpeg)
                call_bad(client)
                time.sleep(3.0)
        yield prom, suite
    finally:
        if popen is not None and popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        suite.stop()


def live_pod(process: str) -> str:
    return f"{process}-7c9d8f6b5-x2k4q"


GATEWAY_VARS = {
    "job": "gateway",
    "service": GATEWAY_SERVICE,
    "method": "ClassifyEmotion",
    "stage": ".*",
    "model": ".*",
}
ALL_VARS = dict.fromkeys(GATEWAY_VARS, ".*")


def substitute(expr: str, variables: dict[str, str]) -> str:
    values = {**variables, "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("record") or rule["alert"], rule["expr"]))
    return out


def finite(sample: dict[str, Any]) -> float:
    value = float(sample["value"][1])
    assert math.isfinite(value), sample
    return value


@needs_prometheus
def test_rule_groups_are_loaded_and_healthy(live: tuple[Prometheus, Suite]) -> None:
    prom, _ = live
    expected = {g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]}

    def healthy() -> list[dict[str, Any]] | None:
        reply = prom.get("/api/v1/rules")
        assert reply["status"] == "success", reply
        groups = reply["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [r for r in rules if r["health"] == "err"]
        assert not bad, [(r["name"], r.get("lastError")) for r in bad]
        if {g["name"] for g in groups} == expected and all(r["health"] == "ok" for r in rules):
            return groups
        return None

    groups = wait_for("every rule evaluated with health ok", healthy, 60)
    assert sum(len(g["rules"]) for g in groups) == len(rule_exprs())


@needs_prometheus
def test_every_rule_expression_evaluates(live: tuple[Prometheus, Suite]) -> None:
    prom, _ = live
    failures = []
    for name, expr in rule_exprs():
        reply = prom.query(expr)
        if reply["status"] != "success":
            failures.append((name, reply.get("errorType"), reply.get("error")))
    assert not failures, failures


@needs_prometheus
@pytest.mark.parametrize("variables", [GATEWAY_VARS, ALL_VARS], ids=["gateway-ClassifyEmotion", "all"])
def test_every_dashboard_query_evaluates(live: tuple[Prometheus, Suite], variables: dict[str, str]) -> None:
    prom, _ = live
    now = time.time()
    failures = []
    for title, expr in dashboard_targets():
        query = substitute(expr, variables)
        for reply in (
            prom.query(query),
            prom.get("/api/v1/query_range", query=query, start=now - 120, end=now, step=5),
        ):
            if reply["status"] != "success":
                failures.append((title, query, reply.get("errorType"), reply.get("error")))
    assert not failures, failures


@needs_prometheus
def test_dashboard_variables_list_the_suite(live: tuple[Prometheus, Suite]) -> None:
    prom, _ = live
    seen: dict[str, set[str]] = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        selector = substitute(m.group(1), ALL_VARS)
        reply = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": selector})
        assert reply["status"] == "success", (var["name"], reply)
        seen[var["name"]] = set(reply["data"])
    assert set(PROCESSES) <= seen["job"]
    assert GATEWAY_SERVICE in seen["service"] and "ClassifyEmotion" in seen["method"]
    assert "emotion_student" in seen["model"]


def panel_exprs(title: str) -> list[str]:
    found = [expr for t, expr in dashboard_targets() if t == title]
    assert found, f"no panel {title!r}"
    return found


@needs_prometheus
def test_request_rate_and_latency_panels_show_gateway_classify_emotion(
    live: tuple[Prometheus, Suite],
) -> None:
    prom, _ = live

    def series(title: str, index: int = 0) -> list[dict[str, Any]]:
        return prom.result(substitute(panel_exprs(title)[index], GATEWAY_VARS))

    (rate,) = wait_for("request rate", lambda: series("Request rate by service and method"), 30)
    assert rate["metric"]["method"] == "ClassifyEmotion" and finite(rate) > 0
    latency_panel = "Latency p50 / p95 / p99 by service and method"
    for i in range(len(panel_exprs(latency_panel))):
        (latency,) = series(latency_panel, i)
        assert latency["metric"]["service"] == GATEWAY_SERVICE
        assert 0 < finite(latency) <= 10
    errors = series("Errors by code")
    assert {e["metric"]["code"] for e in errors} == {"INVALID_ARGUMENT"}
    # INVALID_ARGUMENT is a client error: the server-side ratio stays at 0.
    (ratio,) = series("Server-side error ratio (objective 1 %)")
    assert finite(ratio) == 0
    (flight,) = series("Requests in flight")
    assert finite(flight) == 0
    stages = {
        s["metric"]["stage"]
        for s in prom.result(substitute(panel_exprs("Time per second spent in each stage")[0], ALL_VARS))
    }
    assert stages, "no stage durations"
    inference = prom.result(substitute(panel_exprs("Model executions per second")[0], ALL_VARS))
    assert {s["metric"]["model"] for s in inference} >= {"emotion_student"}
    versions = prom.result(substitute(panel_exprs("Fusion rules version in force")[0], ALL_VARS))
    assert any(v["metric"]["job"] == "gateway" and v["metric"]["version"] for v in versions)


@needs_prometheus
def test_recording_rules_record_the_gateway(live: tuple[Prometheus, Suite]) -> None:
    prom, _ = live
    sel = '{job="gateway", method="ClassifyEmotion"}'

    def recorded(name: str) -> list[dict[str, Any]]:
        return prom.result(name + sel)

    for q in ("p50", "p95", "p99"):
        (s,) = wait_for(
            f"{q} recorded",
            lambda q=q: recorded(f"service_method:tessera_request_duration_seconds:{q}_5m"),
            30,
        )
        assert 0 < finite(s) <= 10
    (requests,) = wait_for("rate recorded", lambda: recorded("service_method:tessera_requests:rate5m"), 30)
    assert finite(requests) > 0
    (ratio,) = wait_for(
        "error ratio recorded", lambda: recorded("service_method:tessera_request_error_ratio:rate5m"), 30
    )
    assert 0 < finite(ratio) < 1  # the bad calls count here ...
    (server,) = recorded("service_method:tessera_request_server_error_ratio:rate5m")
    assert finite(server) == 0  # ... but not against the error-rate objective
    # With a healthy suite and no shard job, no alert fires.
    reply = prom.get("/api/v1/alerts")
    assert reply["status"] == "success"
    assert [a for a in reply["data"]["alerts"] if a["state"] == "firing"] == []


def adapter_query(template: str, pods: list[str]) -> str:
    """A prometheus-adapter metricsQuery as the adapter sends it for the pods of one HPA target."""
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    return template.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


@needs_prometheus
def test_adapter_rules_give_every_hpa_its_metrics(live: tuple[Prometheus, Suite]) -> None:
    """Each rule of deploy/prometheus/prometheus-adapter-values.yaml discovers the suite's pods and
    answers one finite value per pod for every HorizontalPodAutoscaler that names its metric, on a
    real Prometheus scraping a real suite (a pod without calls reads 0, not nothing)."""
    prom, suite = live
    rules = {r["name"]["as"]: r for r in adapter_rules()}
    for rule in rules.values():
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        series_name = re.match(r"(\w+)", rule["seriesQuery"])
        assert series_name and re.fullmatch(rule["name"]["matches"], series_name.group(1))
        series = prom.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
        assert series["status"] == "success", series
        assert {(s["namespace"], s["pod"]) for s in series["data"]} == {
            (NAMESPACE, live_pod(p)) for p in suite.processes
        }, rule["name"]["as"]
    named = 0
    for overlay in OVERLAYS:
        for name, hpa in objects(overlay, "HorizontalPodAutoscaler").items():
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] != "Pods":
                    continue
                named += 1
                rule = rules[metric["pods"]["metric"]["name"]]
                query = adapter_query(rule["metricsQuery"], [live_pod(name)])
                what = f"{metric['pods']['metric']['name']} of {name}"
                (sample,) = wait_for(what, lambda q=query: prom.result(q), 30)
                assert sample["metric"] == {"pod": live_pod(name)}
                assert 0 <= finite(sample) < 1000
                # The target is a per-pod quantity the metric can reach.
                assert metric["pods"]["target"]["type"] == "AverageValue"
                assert float(metric["pods"]["target"]["averageValue"]) >= 1
    assert named >= 9
    # The main part of a rule (before its `or 0 * up` fallback) reads the processes' series: the
    # gateway answered ClassifyEmotion calls, so its unary in-flight series exists.
    primary = adapter_query(
        rules["tessera_unary_requests_in_flight"]["metricsQuery"].split(" or ")[0], [live_pod("gateway")]
    )
    assert prom.result(primary), primary
    # A live stream held open counts in the gateway's streams, not in its unary calls.
    import threading

    from tessera.gateway.v1 import gateway_service_pb2 as gateway_pb

    release = threading.Event()

    def requests() -> Iterator[gateway_pb.StreamVideoRequest]:
        yield gateway_pb.StreamVideoRequest(header=gateway_pb.ClipHeader(clip_id="held-open", fps=30))
        release.wait(60)

    streams = adapter_query(rules["tessera_streams_in_flight"]["metricsQuery"], [live_pod("gateway")])
    unary = adapter_query(rules["tessera_unary_requests_in_flight"]["metricsQuery"], [live_pod("gateway")])
    with TesseraClient(suite.gateway.target, timeout=60) as client:
        call = client.stub.StreamVideo(requests(), timeout=60)
        try:
            wait_for(
                "the open stream in tessera_streams_in_flight",
                lambda: [s for s in prom.result(streams) if finite(s) >= 1],
                30,
            )
            (sample,) = prom.result(unary)
            assert finite(sample) == 0
        finally:
            release.set()
            call.cancel()


@needs_prometheus
def test_compose_health_checks_pass_on_a_running_suite(live: tuple[Prometheus, Suite]) -> None:
    """Each Compose service's health check command, on the same process run here (plaintext)."""
    _, suite = live
    services = compose()["services"]
    for name, proc in suite.processes.items():
        test = list(services[name]["healthcheck"]["test"][1:])
        test[test.index("--port") + 1] = str(proc.port)
        for extra in ([], ["--service", SERVICE_NAMES[name]]):
            out = subprocess.run(
                [sys.executable, str(HEALTHCHECK), *test[1:], *extra],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, (name, extra, out.stderr)
    out = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr  # nothing listens there
