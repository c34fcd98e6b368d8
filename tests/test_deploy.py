"""deploy/: every file parses, the Kubernetes manifests hang together, promtool accepts the
Prometheus config and rules, and a real Prometheus scraping a real suite answers every query of
the Grafana dashboard and every rule expression.

Needs the Debian package `prometheus` (binaries `prometheus` and `promtool`); without it the
Prometheus tests skip and say so.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
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
import pytest
import yaml

from tessera_client import TesseraClient
from launcher.suite import ROOT, SERVICES, Suite
from services.fusion.rules import parse_rules
from services.runtime.config import load_config
from tests.conftest import start_suite

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tessera.json"
ALERTS = PROM_DIR / "alerts.yml"
PROCESSES = ("gateway", *SERVICES)
GATEWAY_SERVICE = "tessera.gateway.v1.GatewayService"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
INSTALL_HINT = ("apt-get install -y prometheus (Debian package: prometheus + promtool); "
                "then `service prometheus stop` so its system service does not keep running")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not found: {INSTALL_HINT}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus not found: {INSTALL_HINT}")


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.rglob("*.yaml")) for d in load_docs(p)]


def objects_of(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


# ------------------------------------------------------------------------------------------------
# Files parse
# ------------------------------------------------------------------------------------------------
def test_deploy_holds_the_expected_files() -> None:
    for rel in ("prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/dashboards/tessera.json",
                "compose/docker-compose.yml", "docker/Dockerfile", "k8s/kustomization.yaml",
                "k8s/shard-job/job.yaml"):
        assert (DEPLOY / rel).is_file(), rel
    assert list((DEPLOY / "grafana/provisioning/datasources").glob("*.yaml"))
    assert list((DEPLOY / "grafana/provisioning/dashboards").glob("*.yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_k8s_manifest_has_api_version_kind_and_name(path: Path) -> None:
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: document without apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_kustomizations_list_existing_files() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        (k,) = load_docs(kfile)
        for res in k["resources"]:
            assert (kfile.parent / res).is_file(), f"{kfile}: resource {res} missing"
    (base,) = load_docs(K8S / "kustomization.yaml")
    listed = set(base["resources"])
    for path in K8S.glob("*.yaml"):
        assert path.name == "kustomization.yaml" or path.name in listed, f"{path.name} not in kustomization.yaml"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not found (its built-in kustomize builds deploy/k8s)")
@pytest.mark.parametrize("folder", ["k8s", "k8s/shard-job"])
def test_kustomize_builds(folder: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs and all(d.get("apiVersion") and d.get("kind") for d in docs)
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "tessera", d["metadata"]["name"]
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"].startswith("tessera:"), c["image"]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def config_model(process: str) -> type[Any]:
    from gateway.config import GatewayConfig
    from services.emotion.config import EmotionConfig
    from services.engagement.config import EngagementConfig
    from services.proxylabel.config import ProxyLabelConfig

    return {"gateway": GatewayConfig, "emotion": EmotionConfig, "engagement": EngagementConfig,
            "proxylabel": ProxyLabelConfig}[process]


def validate_env(process: str, env: dict[str, str]) -> None:
    """The process's own config loader accepts these variables (unknown keys are errors)."""
    prefix = f"TESSERA_{process.upper()}__"
    mine = {k: v for k, v in env.items() if k.startswith(prefix)}
    assert mine, f"no {prefix}* variable"
    load_config(config_model(process), process, environ=mine)


def test_every_process_has_a_deployment_service_and_cpu_hpa() -> None:
    deployments, services, hpas = objects_of("Deployment"), objects_of("Service"), objects_of("HorizontalPodAutoscaler")
    for name in PROCESSES:
        dep = deployments[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/part-of"] == "tessera"
        (c,) = _containers(dep)
        assert c["command"] == [f"tessera-{name}"]
        env = _env(c)
        prefix = f"TESSERA_{name.upper()}__"
        assert env[prefix + "SERVER__HOST"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(env[prefix + "SERVER__PORT"]) == ports["grpc"]
        assert int(env[prefix + "SERVER__METRICS_PORT"]) == ports["metrics"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], (name, probe)
        assert "cpu" in c["resources"]["requests"], f"{name}: the CPU HPA needs a CPU request"
        svc = services[name]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        validate_env(name, env)


def test_gateway_targets_are_headless_services_through_dns() -> None:
    services = objects_of("Service")
    (c,) = _containers(objects_of("Deployment")["gateway"])
    env = _env(c)
    for name in SERVICES:
        target = env[f"TESSERA_GATEWAY__TARGETS__{name.upper()}"]
        m = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert m, target
        svc = services[m.group(1)]
        assert svc["spec"].get("clusterIP") == "None", f"{m.group(1)} must be headless for round-robin over pods"
        assert int(m.group(2)) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}


def test_fusion_rules_configmap_is_mounted_where_the_gateway_reads_it() -> None:
    dep = objects_of("Deployment")["gateway"]
    (c,) = _containers(dep)
    rules_path = Path(_env(c)["TESSERA_GATEWAY__RULES_PATH"])
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if rules_path.parent == Path(m["mountPath"])]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    cm = objects_of("ConfigMap")[cm_name]
    text = cm["data"][rules_path.name]
    parse_rules(text, f"ConfigMap {cm_name}")  # valid for the gateway's schema


def test_generated_configmaps_are_in_sync() -> None:
    out = subprocess.run([sys.executable, str(K8S / "sync.py"), "--check"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_shard_job_is_indexed_and_scores_its_shard_through_the_gateway() -> None:
    (job,) = objects_of("Job").values()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] >= 1 and spec["parallelism"] >= 1
    (c,) = _containers(job)
    script = " ".join(c["command"] + c.get("args", []))
    assert "tessera-score-shard" in script and "--gateway" in script
    assert script.count("${JOB_COMPLETION_INDEX}") == 2  # input and output path
    target = _env(c)["GATEWAY_TARGET"]
    host, port = re.fullmatch(r"(?:dns:///)?([a-z0-9-]+):(\d+)", target).groups()  # type: ignore[union-attr]
    assert int(port) in {p["port"] for p in objects_of("Service")[host]["spec"]["ports"]}
    # The paths are opened by the proxylabel pods: they mount the shared volume and allow its folders.
    (pl,) = _containers(objects_of("Deployment")["proxylabel"])
    mounts = {m["mountPath"] for m in pl["volumeMounts"]}
    roots = yaml.safe_load(_env(pl)["TESSERA_PROXYLABEL__INPUT_ROOTS"]) + yaml.safe_load(
        _env(pl)["TESSERA_PROXYLABEL__OUTPUT_ROOTS"])
    env = _env(c)
    for path in (env["SHARD_INPUT_DIR"], env["SHARD_OUTPUT_DIR"]):
        assert path in roots and any(path.startswith(m) for m in mounts), path
    claim = objects_of("Deployment")["proxylabel"]["spec"]["template"]["spec"]["volumes"][0]
    assert claim["persistentVolumeClaim"]["claimName"] in objects_of("PersistentVolumeClaim")


# ------------------------------------------------------------------------------------------------
# Compose and Docker
# ------------------------------------------------------------------------------------------------
def test_compose_runs_every_process_from_one_image_with_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    images = {services[p]["image"] for p in PROCESSES}
    assert len(images) == 1
    for p in PROCESSES:
        assert services[p]["command"] == [f"tessera-{p}"]
        assert services[p]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert {"prometheus", "grafana"} <= services.keys()
    here = DEPLOY / "compose"
    for name in ("prometheus", "grafana", "gateway"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (here / source).exists(), f"{name}: {source} missing"
    # Prometheus scrapes the compose service names on their metrics port.
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for p in PROCESSES:
        (target,) = jobs[p]["static_configs"][0]["targets"]
        assert target == f"{p}:9100"
    assert "triton" in jobs
    gw_env = services["gateway"]["environment"]
    for p in PROCESSES:
        validate_env(p, {**dockerfile_env(), **services[p].get("environment", {})})
    for s in SERVICES:
        assert gw_env[f"TESSERA_GATEWAY__TARGETS__{s.upper()}"].startswith(f"dns:///{s}:")


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_dockerfile_builds_the_serving_image_without_torch() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "pip install -r /tmp/src/requirements/serve.txt" in text
    assert "tessera-models" in text
    assert "torch" not in re.sub(r"#.*", "", text)
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} missing"
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
    for metric in ("tessera_request_duration_seconds_count", "tessera_request_duration_seconds_bucket",
                   "tessera_request_errors_total", "tessera_requests_in_flight",
                   "tessera_stage_duration_seconds_bucket", "tessera_model_inference_seconds_bucket",
                   "tessera_batch_size_bucket", "tessera_shard_rows_scored_total", "tessera_fusion_rules_info"):
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
def test_promtool_check_k8s_config(tmp_path: Path) -> None:
    (cm,) = load_docs(K8S / "prometheus-config.yaml")
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


# ------------------------------------------------------------------------------------------------
# A real Prometheus scraping a real suite
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def live(tmp_path_factory: pytest.TempPathFactory, model_repository: Path,
         astronaut_jpeg: bytes) -> Iterator[tuple[Prometheus, Suite]]:
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
                {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{proc.metrics_port}"]}]}
                for name, proc in suite.processes.items()],
        }
        config_file = work / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        log = work / "prometheus.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=work)
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
        wait_for("every target scraped and up", lambda: len(
            [r for r in prom.result("up == 1")]) == len(suite.processes), 60)

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


GATEWAY_VARS = {"job": "gateway", "service": GATEWAY_SERVICE, "method": "ClassifyEmotion",
                "stage": ".*", "model": ".*"}
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
        for reply in (prom.query(query),
                      prom.get("/api/v1/query_range", query=query, start=now - 120, end=now, step=5)):
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
def test_request_rate_and_latency_panels_show_gateway_classify_emotion(live: tuple[Prometheus, Suite]) -> None:
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
    stages = {s["metric"]["stage"] for s in prom.result(substitute(
        panel_exprs("Time per second spent in each stage")[0], ALL_VARS))}
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
        (s,) = wait_for(f"{q} recorded", lambda q=q: recorded(f"service_method:tessera_request_duration_seconds:{q}_5m"), 30)
        assert 0 < finite(s) <= 10
    (requests,) = wait_for("rate recorded", lambda: recorded("service_method:tessera_requests:rate5m"), 30)
    assert finite(requests) > 0
    (ratio,) = wait_for("error ratio recorded", lambda: recorded("service_method:tessera_request_error_ratio:rate5m"), 30)
    assert 0 < finite(ratio) < 1  # the bad calls count here ...
    (server,) = recorded("service_method:tessera_request_server_error_ratio:rate5m")
    assert finite(server) == 0  # ... but not against the error-rate objective
    # With a healthy suite and no shard job, no alert fires.
    reply = prom.get("/api/v1/alerts")
    assert reply["status"] == "success"
    assert [a for a in reply["data"]["alerts"] if a["state"] == "firing"] == []
