"""deploy/grafana/dashboards/tessera.json is what tools/codegen/dashboards.py writes, and every query
of it reads a recording rule of deploy/prometheus/alerts.yml or a series that exists: a metric of
services/runtime/metrics.py, Prometheus's `up`, or Triton's own metrics. Panels have unique ids
and do not overlap on Grafana's grid.

That the queries evaluate on a real Prometheus scraping a real suite is tests/deploy/test_deploy.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.metrics import Metrics
from tools.codegen import dashboards
from tools.codegen.grafana import GRID_WIDTH, render
from tools.codegen.promql import recording_rules, series_names

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Series that come from elsewhere than the suite's code: Prometheus's own per target, and Triton's
# metrics port (scraped as job "triton").
PROMETHEUS_SERIES = {"up"}
TRITON_SERIES = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
}
# The series names each metric type exposes.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def dashboard() -> dict[str, Any]:
    return json.loads(dashboards.OUT.read_text())


def exported_series() -> set[str]:
    """Every series name a tessera process exports."""
    out: set[str] = set()
    for family in Metrics("test").registry.collect():
        out.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return out


def queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every variable's series selector."""
    out = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            selector = var["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
            out.append((f"variable {var['name']}", selector))
    return out


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    assert dashboards.OUT.read_text() == render(dashboards.build()), (
        "tessera.json differs from the generator's output: edit tools/codegen/dashboards.py and run "
        ".venv/bin/python -m tools.codegen.dashboards"
    )


def test_check_fails_on_a_hand_edit(tmp_path: Path) -> None:
    out = tmp_path / "tessera.json"
    assert dashboards.main(["--check"], out) == 1  # missing
    assert dashboards.main([], out) == 0
    assert dashboards.main(["--check"], out) == 0
    edited = dashboard()
    edited["panels"][1]["title"] = "Edited in Grafana's UI"
    out.write_text(render(edited))
    assert dashboards.main(["--check"], out) == 1


def test_every_query_reads_a_recording_rule_or_a_series_that_exists() -> None:
    scraped = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert "triton" in scraped, "the Triton panels read a job prometheus.yml no longer scrapes"
    rules = recording_rules(dashboards.ALERTS)
    known = set(rules) | exported_series() | PROMETHEUS_SERIES | TRITON_SERIES
    read = set()
    for where, expr in queries(dashboard()):
        names = series_names(expr)
        assert names, (where, expr)
        assert names <= known, (where, names - known)
        read |= names
    # The objectives' panels read the series the alerts judge, not copies of their expressions:
    # the list of client-error codes is written once, in alerts.yml.
    assert {
        "service_method:tessera_request_server_error_ratio:rate5m",
        "service_method:tessera_request_duration_seconds:p99_5m",
    } <= read
    assert not [where for where, expr in queries(dashboard()) if "INVALID_ARGUMENT" in expr]


def test_every_exported_metric_is_on_the_dashboard() -> None:
    """Each metric of services/runtime/metrics.py has a panel, read directly or through a rule."""
    rules = recording_rules(dashboards.ALERTS)
    shown: set[str] = set()
    for _, expr in queries(dashboard()):
        for name in series_names(expr):
            shown |= series_names(rules[name]) if name in rules else {name}
    families = {f.name: f.type for f in Metrics("test").registry.collect()}
    missing = {
        name for name, kind in families.items() if not shown & {name + suffix for suffix in SUFFIXES[kind]}
    }
    assert not missing, f"no panel shows {sorted(missing)}"


def test_every_recording_rule_reads_exported_metrics() -> None:
    exported = exported_series()
    for name, expr in recording_rules(dashboards.ALERTS).items():
        assert series_names(expr) and series_names(expr) <= exported, (name, series_names(expr) - exported)


def test_the_generator_refuses_a_rule_alerts_yml_does_not_define() -> None:
    rule = dashboards.Rules(dashboards.ALERTS)
    assert (
        rule("service_method:tessera_requests:rate5m", 'job="gateway"')
        == 'service_method:tessera_requests:rate5m{job="gateway"}'
    )
    with pytest.raises(KeyError, match="not a recording rule"):
        rule("service_method:tessera_requests:rate1m", 'job="gateway"')


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job, le) (rate(a_bucket{code!~"X|Y", job=~"$job"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum(rate(a_bucket[5m])) by (le))", {"a_bucket"}),
        ("sum by (m) (rate(a_us[1m])) / sum by (m) (rate(b[1m])) / 1e6", {"a_us", "b"}),
        ("a > bool 0 unless on (job) group_left (v) b:rule:rate5m offset 5m", {"a", "b:rule:rate5m"}),
        ('up{job=~"gateway|triton"} == 0', {"up"}),
    ],
)
def test_series_names(expr: str, names: set[str]) -> None:
    assert series_names(expr) == names
