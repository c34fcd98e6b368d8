"""A Grafana dashboard as data: template variables and rows of panels, each panel with its
Prometheus queries, laid out on Grafana's 24-column grid and rendered as the dashboard JSON model
(schemaVersion 39) that Grafana's file provisioning loads.

Panels flow left to right within their row and wrap at the grid's width; ids follow the order of
definition, so adding a panel renumbers only the ones after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

GRID_WIDTH = 24
PANEL_HEIGHT = 8
SCHEMA_VERSION = 39
# Every query goes to the data source the dashboard's `datasource` variable names.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and the legend of the series it returns."""

    expr: str
    legend: str


@dataclass(frozen=True, kw_only=True)
class Panel:
    """What every panel kind has: a title, a width on the grid, its queries."""

    title: str
    width: int
    targets: tuple[Target, ...]
    description: str = ""

    kind: ClassVar[str]
    # What a query asks for: a range of points (graphs) or the current value (tables).
    target_fields: ClassVar[dict[str, Any]] = {"range": True}

    def body(self) -> dict[str, Any]:
        """The kind's own part of the panel's JSON (fieldConfig, options, ...)."""
        raise NotImplementedError

    def model(self, panel_id: int, grid_pos: dict[str, int]) -> dict[str, Any]:
        targets = [
            {
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend,
                "refId": chr(ord("A") + i),
                **self.target_fields,
            }
            for i, t in enumerate(self.targets)
        ]
        return {
            "type": self.kind,
            "title": self.title,
            "id": panel_id,
            "datasource": DATASOURCE,
            "description": self.description,
            "gridPos": grid_pos,
            "targets": targets,
            **self.body(),
        }


@dataclass(frozen=True, kw_only=True)
class TimeSeries(Panel):
    """Lines over time; `stacked` stacks the series and fills under them (parts of a whole)."""

    unit: str
    stacked: bool = False

    kind = "timeseries"

    def body(self) -> dict[str, Any]:
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if self.stacked else 0,
            "stacking": {"mode": "normal" if self.stacked else "none"},
            "showPoints": "never",
        }
        return {
            "fieldConfig": {"defaults": {"unit": self.unit, "custom": custom}, "overrides": []},
            "options": {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
        }


@dataclass(frozen=True, kw_only=True)
class Heatmap(Panel):
    """Histogram buckets over time, as Prometheus computed them (Grafana does not re-bucket)."""

    unit: str

    kind = "heatmap"
    target_fields: ClassVar[dict[str, Any]] = {"range": True, "format": "heatmap"}

    def body(self) -> dict[str, Any]:
        return {
            "options": {
                "calculate": False,
                "yAxis": {"unit": self.unit},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                "tooltip": {"show": True, "yHistogram": True},
            }
        }


@dataclass(frozen=True, kw_only=True)
class Table(Panel):
    """The current value of each series, its labels as columns."""

    kind = "table"
    target_fields: ClassVar[dict[str, Any]] = {"range": False, "instant": True, "format": "table"}

    def body(self) -> dict[str, Any]:
        return {"options": {"showHeader": True}, "transformations": [{"id": "labelsToFields", "options": {}}]}


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class QueryVariable:
    """A multi-value variable listing the values of `label` on `series`, narrowed by the variables
    named in `narrowed_by` (e.g. the methods of the selected services)."""

    name: str
    label: str
    series: str
    narrowed_by: tuple[str, ...] = ()

    def model(self) -> dict[str, Any]:
        selector = ", ".join(f'{v}=~"${v}"' for v in self.narrowed_by)
        definition = (
            f"label_values({self.series}{{{selector}}}, {self.name})"
            if selector
            else f"label_values({self.series}, {self.name})"
        )
        return {
            "name": self.name,
            "label": self.label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": definition,
            "query": {"query": definition, "refId": f"{self.name}-query"},
            "refresh": 2,
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "regex": "",
        }


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    tags: tuple[str, ...]
    variables: tuple[QueryVariable, ...]
    rows: tuple[Row, ...]

    def panels(self) -> list[dict[str, Any]]:
        """Rows and their panels in order, with ids and grid positions."""
        out: list[dict[str, Any]] = []
        y = 0
        for row in self.rows:
            out.append(
                {
                    "type": "row",
                    "title": row.title,
                    "id": len(out) + 1,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            x = 0
            for panel in row.panels:
                if not 0 < panel.width <= GRID_WIDTH:
                    raise ValueError(
                        f"{panel.title!r}: width {panel.width} is not within the grid's {GRID_WIDTH}"
                    )
                if x + panel.width > GRID_WIDTH:
                    x, y = 0, y + PANEL_HEIGHT
                out.append(panel.model(len(out) + 1, {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y}))
                x += panel.width
            if row.panels:
                y += PANEL_HEIGHT
        return out

    def model(self) -> dict[str, Any]:
        datasource = {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
            "options": [],
            "hide": 0,
            "refresh": 1,
            "regex": "",
        }
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "timezone": "browser",
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "annotations": {"list": []},
            "links": [],
            "templating": {"list": [datasource, *(v.model() for v in self.variables)]},
            "panels": self.panels(),
        }


def render(dashboard: dict[str, Any]) -> str:
    """The JSON text as committed: sorted keys, so that a regeneration changes only what changed."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
