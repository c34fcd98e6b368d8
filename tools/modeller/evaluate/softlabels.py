"""``export-softlabels``: every row of an emotion manifest with its members' raw logits, the served
(fused) probabilities, the temperature and the model versions, as parquet — the soft labels a
student is distilled on, with what made them.

One row per manifest row, in manifest order, scored or not:

| column | type | what |
|---|---|---|
| `line`, `path` | int32, string | where the row is in the manifest |
| `label`, `label_name` | int8, string | the manifest's label (canonical class index and name) |
| `source`, `split` | string | the manifest's columns, null when absent |
| `status`, `skip_reason`, `message` | string | `ok`, or `skipped` with why (`no_face`, `several_faces`, `unreadable`, a gRPC code) |
| `box`, `box_given` | list<int32>[4], bool | the face box (the manifest's, or the detector's with `--faces detect`) |
| `logits_<model>` | list<float32>[7] | each member's raw logits (null when skipped) |
| `probabilities` | list<float32>[7] | the served, fused probabilities |
| `predicted` | string | the served label |
| `temperature` | float64 | the temperature the gateway fused with (rules file precedence) |
| `mode`, `ensemble`, `rules_version` | string | how the gateway answered |
| `model_versions` | map<string, string> | every member's version |

The file's schema metadata `tessera.softlabels` (JSON) repeats the class names, the members and
weights, the fusion space, the temperature, the versions, the rules version and the manifest's
sha256. The members' logits come from the same cache as the other commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.fusion.emotion import CLASS_NAMES, fusion_space_for, members_for, resolve_temperature
from tools.modeller.evaluate.common import EvaluationError, Skipped, sha256_file, write_json
from tools.modeller.evaluate.emotion import (
    DEFAULT_RULES,
    ECE_BINS,
    fetch,
    load_rules,
    read_manifest,
    resolve_request,
)

METADATA_KEY = b"tessera.softlabels"
K = len(CLASS_NAMES)


@dataclass
class SoftLabelExport:
    path: str
    rows: int
    scored: int
    skipped: list[Skipped]
    members: list[str]
    temperature: float
    rules_version: str
    rules_match: bool
    model_versions: dict[str, str]
    from_cache: int

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["skipped"] = [s.__dict__ for s in self.skipped]
        return out


def _vectors(values: list[list[float] | None]) -> pa.Array:
    flat = np.zeros((len(values), K), np.float32)
    mask = np.ones(len(values), bool)
    for i, v in enumerate(values):
        if v is not None:
            flat[i] = v
            mask[i] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), K, mask=pa.array(mask))


def export(
    manifest: Path,
    target: str,
    output: Path,
    *,
    mode: str | None = None,
    ensemble: str | None = None,
    faces: str = "detect",
    batch: int = 16,
    token: str | None = None,
    rules_path: Path = DEFAULT_RULES,
    split: str | None = None,
    timeout: float = 60.0,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> SoftLabelExport:
    rows = read_manifest(manifest, split)
    rules, rules_version = load_rules(rules_path)
    request = resolve_request(rules, mode, ensemble, faces)
    answers, _ = fetch(
        manifest,
        target,
        rows=rows,
        rules=rules,
        request=request,
        batch=batch,
        token=token,
        timeout=timeout,
        progress=progress,
        cache_dir=cache_dir,
    )
    members = list(members_for(rules.emotion, request.mode, request.ensemble))
    weights = members_for(rules.emotion, request.mode, request.ensemble)
    er = rules.emotion
    stored = answers.models[er.student].temperature if er.student in answers.models else None
    temperature = resolve_temperature(er, request.mode, stored, request.ensemble)
    versions = {m: answers.models[m].version for m in members if m in answers.models}
    records = answers.records
    if not any(r["status"] == "ok" for r in records):
        raise EvaluationError(f"no image of the {len(rows)} rows could be scored")
    ok = [r["status"] == "ok" for r in records]
    columns: dict[str, pa.Array] = {
        "line": pa.array([r["line"] for r in records], pa.int32()),
        "path": pa.array([r["path"] for r in records], pa.string()),
        "label": pa.array([r["label_index"] for r in records], pa.int8()),
        "label_name": pa.array([CLASS_NAMES[r["label_index"]] for r in records], pa.string()),
        "source": pa.array([r.get("source") for r in records], pa.string()),
        "split": pa.array([r.get("split") for r in records], pa.string()),
        "status": pa.array(["ok" if o else "skipped" for o in ok], pa.string()),
        "skip_reason": pa.array(
            [None if o else r["skip_reason"] for r, o in zip(records, ok, strict=True)], pa.string()
        ),
        "message": pa.array(
            [None if o else r["message"] for r, o in zip(records, ok, strict=True)], pa.string()
        ),
        "box": pa.array(
            [r.get("box") if o else r.get("given_box") for r, o in zip(records, ok, strict=True)],
            pa.list_(pa.int32(), 4),
        ),
        "box_given": pa.array([r.get("given_box") is not None for r in records], pa.bool_()),
    }
    for m in members:
        columns[f"logits_{m}"] = _vectors(
            [r["members"].get(m) if o else None for r, o in zip(records, ok, strict=True)]
        )
    columns["probabilities"] = _vectors(
        [r["probabilities"] if o else None for r, o in zip(records, ok, strict=True)]
    )
    columns["predicted"] = pa.array(
        [r["label"] if o else None for r, o in zip(records, ok, strict=True)], pa.string()
    )
    columns["temperature"] = pa.array([temperature if o else None for o in ok], pa.float64())
    columns["mode"] = pa.array([request.mode] * len(records), pa.string())
    columns["ensemble"] = pa.array([request.ensemble] * len(records), pa.string())
    columns["rules_version"] = pa.array([r.get("rules_version") for r in records], pa.string())
    columns["model_versions"] = pa.array(
        [list(versions.items())] * len(records), pa.map_(pa.string(), pa.string())
    )
    gateway_rules = sorted(answers.rules_versions)
    meta = {
        "class_names": list(CLASS_NAMES),
        "members": members,
        "weights": {m: w / sum(weights.values()) for m, w in weights.items()},
        "fusion_space": fusion_space_for(er, request.mode, request.ensemble),
        "temperature": temperature,
        "model_versions": versions,
        "rules_version": gateway_rules,
        "rules_file": str(rules_path),
        "rules_file_version": rules_version,
        "mode": request.mode,
        "ensemble": request.ensemble,
        "faces": faces,
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
    }
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(output)
    return SoftLabelExport(
        str(output),
        len(records),
        sum(ok),
        answers.skipped,
        members,
        temperature,
        ", ".join(gateway_rules),
        gateway_rules == [rules_version],
        versions,
        answers.from_cache,
    )


def run(manifest: Path, target: str, out: Path, **kwargs: Any) -> SoftLabelExport:
    """``out`` is a folder (softlabels.parquet and report.json in it) or a .parquet path."""
    output = out if out.suffix == ".parquet" else out / "softlabels.parquet"
    result = export(manifest, target, output, **kwargs)
    write_json(
        output.with_name("softlabels.json") if out.suffix == ".parquet" else out / "report.json",
        result.to_dict(),
    )
    return result


def format_summary(result: SoftLabelExport) -> str:
    members = ", ".join(f"{m} v{result.model_versions.get(m, '?')}" for m in result.members)
    lines = [
        (
            f"{result.path}: {result.rows} rows, {result.scored} with soft labels, {len(result.skipped)} skipped; "
            f"members {members}; "
            f"T={result.temperature:g}; rules {result.rules_version}"
        )
    ]
    lines += [f"  not scored: line {s.line} {s.path}: {s.reason}: {s.message}" for s in result.skipped[:20]]
    if not result.rules_match:
        lines.append(
            "warning: the gateway's rules are not the rules file's: the temperature column is the file's"
        )
    return "\n".join(lines)


__all__ = ["ECE_BINS", "SoftLabelExport", "export", "format_summary", "run"]
