"""The benchmarks' results file, bench/results.json, which bench/report.py turns into docs/benchmarks.md.

Every benchmark (each bench/bench_*.py script, and the slow load tests) ends with one call,

    from bench import results
    results.record("bench_emotion", [
        results.row("gateway added p50 vs the echo floor", 4.58, "ms", baseline=1.95, ratio=2.35,
                    target="≤ 1.25", meets_target=False),
        ...], quick=args.quick)

which replaces every row that benchmark wrote before with these ones (a run never mixes with an
older run of the same benchmark) and stamps them with the run: date (UTC), whether it was a
`--quick` run, the command line, the git commit and the machine's cores. Rows: name, value, unit,
baseline, ratio, target, meets_target (True/False, or None when the row has no target), note.
Writes are atomic (a temporary file renamed over the old one) under an advisory lock (a file in
the temporary directory), so two benchmarks finishing at once both land. TESSERA_BENCH_RESULTS
names another results file (tests of this module use it).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("TESSERA_BENCH_RESULTS", ROOT / "bench" / "results.json"))
FIELDS = ("name", "value", "unit", "baseline", "ratio", "target", "meets_target", "note")
VERSION = 1


def _number(x: float | int | None) -> float | int | None:
    if x is None:
        return None
    if isinstance(x, bool):
        raise TypeError("a number, not a bool")
    x = float(x) if not isinstance(x, int) else x
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return round(x, 6) if isinstance(x, float) else x


def row(
    name: str,
    value: float | int | None,
    unit: str = "",
    *,
    baseline: float | int | None = None,
    ratio: float | None = None,
    target: str | None = None,
    meets_target: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One measured figure. `baseline` is what it is compared with in the same run (same unit);
    `ratio` value / baseline unless given; `target` as the targets table words it (e.g. "≤ 1.25")."""
    value, baseline = _number(value), _number(baseline)
    if ratio is None and value is not None and baseline not in (None, 0):
        ratio = value / baseline
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": _number(ratio),
        "target": target,
        "meets_target": None if meets_target is None else bool(meets_target),
        "note": note,
    }


def at_most(x: float | None, limit: float) -> bool | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x <= limit


def at_least(x: float | None, limit: float) -> bool | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x >= limit


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _program() -> str:
    """This process's program as its user typed it: `pytest` for `python -m pytest`."""
    path = Path(sys.argv[0])
    return path.parent.name if path.name == "__main__.py" else path.name


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The results file as a dict ({"version", "benchmarks": {name: {"run", "rows"}}}); empty if none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": VERSION, "benchmarks": {}}
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{path}: not a results file")
    return data


def record(
    benchmark: str,
    rows: Iterable[dict[str, Any]],
    *,
    quick: bool = False,
    path: Path | None = None,
    settings: str = "",
    argv: list[str] | None = None,
) -> Path:
    """Replace `benchmark`'s rows in the results file with `rows`, stamped with this run."""
    path = Path(path or RESULTS)
    rows = [{k: r.get(k) for k in FIELDS} for r in rows]
    for r in rows:
        if not r["name"]:
            raise ValueError("every row needs a name")
    run = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": bool(quick),
        "command": " ".join([_program(), *sys.argv[1:]] if argv is None else argv),
        "settings": settings,
        "commit": _git_commit(),
        "cpus": os.cpu_count(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = zlib.crc32(str(path.resolve()).encode())
    lock_file = Path(tempfile.gettempdir()) / f"tessera-bench-results-{tag:08x}.lock"
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        data["version"] = VERSION
        data["benchmarks"][benchmark] = {"run": run, "rows": rows}
        data["benchmarks"] = dict(sorted(data["benchmarks"].items()))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)
    print(f"{len(rows)} result rows of {benchmark} written to {path}", file=sys.stderr)
    return path
