"""What PromQL reads: the recording rules of a Prometheus rules file, and the series names an
expression selects, so a query can be checked against the rules and metrics that exist.

The names are found by reading past what is not a series name: strings, label matchers, range
windows (Grafana's `$__rate_interval` among them), the label lists of `by`/`on`/... and function
calls. That is enough for the expressions the suite writes; it is not a PromQL parser.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_WINDOW = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Preceded by neither a word character nor a dot: `e6` of `1e6` is no name.
_NAME = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    }
)


def recording_rules(path: Path) -> dict[str, str]:
    """record name -> expression, for every recording rule of a rules file (alerts are skipped)."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"] if "record" in rule}


def series_names(expr: str) -> set[str]:
    """The metric and recording-rule names an expression selects."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _WINDOW.sub("", text)
    text = _LABEL_LIST.sub("", text)
    names: set[str] = set()
    for match in _NAME.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function (or an aggregation): sum, rate, histogram_quantile, ...
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names
