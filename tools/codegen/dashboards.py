"""Generate deploy/grafana/dashboards/tessera.json, the suite's Grafana dashboard (the only way it
is made).

    .venv/bin/python -m tools.codegen.dashboards           # write it (make dashboards)
    .venv/bin/python -m tools.codegen.dashboards --check   # exit 1 when the committed file differs

Panels that show what a recording rule of deploy/prometheus/alerts.yml records read that rule by
name, so the dashboard shows the very series the alerts judge and an expression (the list of
client-error codes, a quantile's grouping) is written once, in the rules file; a name that is not
a rule there stops the generator. The rest query the metrics of services/runtime/metrics.py at
Grafana's `$__rate_interval`. Each panel's description names the rules it reads and the metrics
they are recorded from.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tools.codegen.grafana import (
    Dashboard,
    Heatmap,
    Panel,
    QueryVariable,
    Row,
    Table,
    Target,
    TimeSeries,
    render,
)
from tools.codegen.promql import recording_rules, series_names

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
OUT = ROOT / "deploy" / "grafana" / "dashboards" / "tessera.json"

RPC = 'job=~"$job", service=~"$service", method=~"$method"'
STAGE = 'job=~"$job", stage=~"$stage"'
MODEL = 'job=~"$job", model=~"$model"'
ADMISSION = 'job=~"$job", method=~"$method"'  # admission's series carry no `service` label
SHARDS = 'job="proxylabel"'  # shard jobs run in proxylabel, whatever the job variable selects

VARIABLES = (
    QueryVariable("job", "Process", "tessera_request_duration_seconds_count"),
    QueryVariable("service", "Service", "tessera_request_duration_seconds_count", ("job",)),
    QueryVariable("method", "Method", "tessera_request_duration_seconds_count", ("job", "service")),
    QueryVariable("stage", "Stage", "tessera_stage_duration_seconds_count", ("job",)),
    QueryVariable("model", "Model", "tessera_model_inference_seconds_count", ("job",)),
)


class Rules:
    """The recording rules of the rules file, selected by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exprs = recording_rules(path)

    def __call__(self, name: str, selector: str) -> str:
        """`name{selector}`, once `name` is known to be a recording rule."""
        if name not in self.exprs:
            raise KeyError(f"{name} is not a recording rule of {self.path.name}")
        return f"{name}{{{selector}}}"


def rows(rule: Rules) -> tuple[Row, ...]:
    """The dashboard's rows, top to bottom; `rule` selects a recording rule by name."""
    requests = Row(
        "Requests",
        (
            TimeSeries(
                title="Request rate by service and method",
                width=8,
                unit="reqps",
                description="RPCs per second as the server saw them, every status code.",
                targets=(Target(rule("service_method:tessera_requests:rate5m", RPC), "{{job}} {{method}}"),),
            ),
            TimeSeries(
                title="Latency p50 / p95 / p99 by service and method",
                width=16,
                unit="s",
                description="Server-side request duration quantiles. Objective: gateway ClassifyEmotion "
                "p99 <= 250 ms. Streaming RPCs (ScoreClip, StreamVideo, ScoreShard) last as "
                "long as their stream.",
                targets=tuple(
                    Target(
                        rule(f"service_method:tessera_request_duration_seconds:p{q}_5m", RPC),
                        f"p{q} {{{{job}}}} {{{{method}}}}",
                    )
                    for q in (50, 95, 99)
                ),
            ),
            TimeSeries(
                title="Errors by code",
                width=8,
                unit="reqps",
                stacked=True,
                description="Non-OK RPCs per second by gRPC status code.",
                targets=(
                    Target(
                        f"sum by (job, method, code) "
                        f"({rule('service_method_code:tessera_request_errors:rate5m', RPC)})",
                        "{{job}} {{method}} {{code}}",
                    ),
                ),
            ),
            TimeSeries(
                title="Server-side error ratio (objective 1 %)",
                width=8,
                unit="percentunit",
                description="Non-OK requests over all requests, client errors (INVALID_ARGUMENT, NOT_FOUND, "
                "...) excluded: the ratio TesseraErrorRatioHigh judges.",
                targets=(
                    Target(
                        rule("service_method:tessera_request_server_error_ratio:rate5m", RPC),
                        "{{job}} {{method}}",
                    ),
                ),
            ),
            TimeSeries(
                title="Requests in flight",
                width=8,
                unit="short",
                description="RPCs being handled right now (tessera_requests_in_flight).",
                targets=(
                    Target(
                        f"sum by (job, method) (tessera_requests_in_flight{{{RPC}}})", "{{job}} {{method}}"
                    ),
                ),
            ),
        ),
    )
    stages = Row(
        "Pipeline stages",
        (
            *(
                TimeSeries(
                    title=f"Stage duration p{q} by stage",
                    width=8,
                    unit="s",
                    description="Time per call of each recorded stage: decode, detect, preprocess, queue, infer.",
                    targets=(
                        Target(
                            rule(f"stage:tessera_stage_duration_seconds:p{q}_5m", STAGE), "{{job}} {{stage}}"
                        ),
                    ),
                )
                for q in (50, 99)
            ),
            TimeSeries(
                title="Time per second spent in each stage",
                width=8,
                unit="s",
                stacked=True,
                description="Seconds of stage work per wall-clock second: where the time goes "
                "(tessera_stage_duration_seconds_sum).",
                targets=(
                    Target(
                        f"sum by (job, stage) (rate(tessera_stage_duration_seconds_sum{{{STAGE}}}"
                        f"[$__rate_interval]))",
                        "{{job}} {{stage}}",
                    ),
                ),
            ),
        ),
    )
    models = Row(
        "Models",
        (
            TimeSeries(
                title="Model inference p50 / p99 by model, version, backend",
                width=12,
                unit="s",
                description="Execution time of one batch.",
                targets=tuple(
                    Target(
                        rule(f"model:tessera_model_inference_seconds:p{q}_5m", MODEL),
                        f"p{q} {{{{job}}}} {{{{model}}}} v{{{{version}}}} {{{{backend}}}}",
                    )
                    for q in (50, 99)
                ),
            ),
            TimeSeries(
                title="Model executions per second",
                width=12,
                unit="ops",
                description="Batches run per second (tessera_model_inference_seconds_count).",
                targets=(
                    Target(
                        f"sum by (model, version, backend) (rate(tessera_model_inference_seconds_count"
                        f"{{{MODEL}}}[$__rate_interval]))",
                        "{{model}} v{{version}} {{backend}}",
                    ),
                ),
            ),
            Heatmap(
                title="Batch size distribution",
                width=12,
                unit="short",
                description="Items per model execution (tessera_batch_size buckets).",
                targets=(
                    Target(
                        f"sum by (le) (increase(tessera_batch_size_bucket{{{MODEL}}}[$__rate_interval]))",
                        "{{le}}",
                    ),
                ),
            ),
            TimeSeries(
                title="Mean batch size by model",
                width=12,
                unit="short",
                description="Items per model execution, on average.",
                targets=(Target(rule("model:tessera_batch_size:mean5m", MODEL), "{{job}} {{model}}"),),
            ),
        ),
    )
    shards = Row(
        "Shard jobs and fusion rules",
        (
            TimeSeries(
                title="Shard rows/s",
                width=12,
                unit="rowsps",
                description="Rows written per second by shard jobs, and the job's own figure "
                "(tessera_shard_rows_per_second).",
                targets=(
                    Target(
                        f"sum by (instance) ({rule('instance:tessera_shard_rows_scored:rate1m', SHARDS)})",
                        "written {{instance}}",
                    ),
                    Target(
                        f"sum by (instance) (tessera_shard_rows_per_second{{{SHARDS}}})",
                        "reported {{instance}}",
                    ),
                ),
            ),
            Table(
                title="Fusion rules version in force",
                width=6,
                description="tessera_fusion_rules_info: one row per process and version.",
                targets=(
                    Target(
                        'max by (job, instance, version) (tessera_fusion_rules_info{job=~"$job"})',
                        "{{version}}",
                    ),
                ),
            ),
            TimeSeries(
                title="Fusion rules reload errors",
                width=6,
                unit="short",
                description="Edits of the rules file refused in the last hour (the old rules stay).",
                targets=(
                    Target(
                        "sum by (instance) (increase(tessera_fusion_rules_reload_errors_total"
                        '{job=~"$job"}[1h]))',
                        "{{instance}}",
                    ),
                ),
            ),
        ),
    )
    targets = Row(
        "Targets and Triton",
        (
            TimeSeries(
                title="Scrape targets up",
                width=8,
                unit="short",
                description="1 when Prometheus's last scrape of the target succeeded.",
                targets=(
                    Target('up{job=~"gateway|emotion|engagement|proxylabel|triton"}', "{{job}} {{instance}}"),
                ),
            ),
            TimeSeries(
                title="Triton inference requests/s",
                width=8,
                unit="reqps",
                description="Triton's own metrics, when services run with the Triton backend.",
                targets=tuple(
                    Target(
                        f"sum by (model, version) (rate(nv_inference_request_{outcome}[$__rate_interval]))",
                        f"{label} {{{{model}}}} v{{{{version}}}}",
                    )
                    for outcome, label in (("success", "ok"), ("failure", "failed"))
                ),
            ),
            TimeSeries(
                title="Triton queue / compute time per request",
                width=8,
                unit="s",
                description="Time per successful request spent in Triton's queue and computing, on average.",
                targets=tuple(
                    Target(
                        f"sum by (model) (rate(nv_inference_{metric}_duration_us[$__rate_interval])) "
                        f"/ sum by (model) (rate(nv_inference_request_success[$__rate_interval])) / 1e6",
                        f"{label} {{{{model}}}}",
                    )
                    for metric, label in (("queue", "queue"), ("compute_infer", "compute"))
                ),
            ),
        ),
    )
    admission = Row(
        "Admission and decoders",
        (
            TimeSeries(
                title="Calls refused by admission, by method and reason",
                width=8,
                unit="reqps",
                stacked=True,
                description="Calls refused before running, per second: reason full (gate and its "
                "queue full: RESOURCE_EXHAUSTED) or deadline (passed, or unmeetable, while queued: "
                "DEADLINE_EXCEEDED) (tessera_admission_rejected_total).",
                targets=(
                    Target(
                        f"sum by (job, method, reason) (rate(tessera_admission_rejected_total"
                        f"{{{ADMISSION}}}[$__rate_interval]))",
                        "{{job}} {{method}} {{reason}}",
                    ),
                ),
            ),
            TimeSeries(
                title="Calls waiting for a slot, by gate",
                width=8,
                unit="short",
                description="Calls queued for a slot right now, per gate: unary, stream, or a method "
                "of its own (tessera_admission_queued). A steady queue means the process is at its "
                "limits: the HorizontalPodAutoscalers scale on it.",
                targets=(
                    Target('sum by (job, gate) (tessera_admission_queued{job=~"$job"})', "{{job}} {{gate}}"),
                ),
            ),
            TimeSeries(
                title="Image decoder warnings by library",
                width=8,
                unit="cps",
                description="Warnings libpng and libjpeg printed, per second (tessera_decoder_warnings_total): "
                "damaged or odd images; each image's own answer already reports a bad image.",
                targets=(
                    Target(
                        'sum by (job, library) (rate(tessera_decoder_warnings_total{job=~"$job"}'
                        "[$__rate_interval]))",
                        "{{job}} {{library}}",
                    ),
                ),
            ),
        ),
    )
    return requests, stages, models, shards, targets, admission


def with_sources(panel: Panel, rules: Rules) -> Panel:
    """The panel, its description naming the recording rules it reads and what they record."""
    read = sorted({name for t in panel.targets for name in series_names(t.expr) if name in rules.exprs})
    if not read:
        return panel
    sources = sorted({name for r in read for name in series_names(rules.exprs[r])})
    note = f"Recording rules ({rules.path.name}): {', '.join(read)}; from {', '.join(sources)}."
    return replace(panel, description=f"{panel.description} {note}".strip())


def build(alerts: Path = ALERTS) -> dict[str, Any]:
    """The dashboard's JSON model, reading the recording rules of `alerts`."""
    rules = Rules(alerts)
    dashboard = Dashboard(
        uid="tessera-overview",
        title="tessera",
        description="tessera serving suite: requests, latency, errors, stages, models, shard jobs, "
        "admission, decoders (docs/operations.md#metrics).",
        tags=("tessera", "grpc"),
        variables=VARIABLES,
        rows=tuple(Row(row.title, tuple(with_sources(p, rules) for p in row.panels)) for row in rows(rules)),
    )
    return dashboard.model()


def main(argv: list[str] | None = None, out: Path = OUT) -> int:
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    parser = argparse.ArgumentParser(
        prog="python -m tools.codegen.dashboards", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when {shown} differs from what this writes"
    )
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(
                f"{shown} is out of date with tools/codegen/dashboards.py: run make dashboards",
                file=sys.stderr,
            )
            return 1
        return 0
    out.write_text(text)
    print(f"generated {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
