"""The manifest of a shard job's output directory: the job's state, kept with its output.

    <output>/manifest.json      job id, input fingerprint, rules, parts committed (rows, id range,
                                confusion counts), the job's state and runs; rewritten atomically
                                and durably after each part: the job's state lives here, not in a process
    <output>/.cancel            asks the job's owner to stop at the next part boundary

A run reopens the manifest of an interrupted run of the same job and refuses one of another job
(other input, rules or cut), so resuming never mixes two jobs in one directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.proxylabel.access import may_access, started_by
from services.proxylabel.shard_plan import ShardPlan
from services.runtime.errors import FailedPrecondition, PermissionDenied
from services.runtime.model_files import write_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # fields added since are optional: older manifests still resume
CANCEL_FILE = ".cancel"

# What the manifest records of a job's state. A job the manifest calls running is only running
# while its lock's holder is alive (services/proxylabel/jobs.py derives the state readers see).
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class Manifest:
    path: Path
    data: dict = field(default_factory=dict)
    fresh: bool = False  # made by this open: nothing of the job was written before

    @classmethod
    def open(cls, output: Path, plan: ShardPlan) -> Manifest:
        """The job's manifest: a new one, or the one of an interrupted run of the same job."""
        path = output / MANIFEST
        job = plan.job
        shown = job.shown_output
        fresh = {
            "format": MANIFEST_FORMAT,
            "job_id": job.job_id,
            "started_by": started_by(job.caller),
            "input": plan.fingerprint,
            "rules_version": job.rules_version,
            "mode": job.rules.mode,
            "rules": job.rules.model_dump(mode="json"),
            "batch_rows": job.batch_rows,
            "rows_total": plan.rows_total,
            "parts_total": len(plan.parts),
            "has_scores": plan.has_scores,
            "parts": [],
            "complete": False,
            "state": RUNNING,
            "error": None,
            "owner": "",
            "updated": time.time(),
            "runs": [],
        }
        if not path.exists():
            others = [
                p.name
                for p in output.iterdir()
                if not p.name.startswith(".") and not p.name.startswith("part-")
            ]
            if others:
                raise FailedPrecondition(
                    f"output directory {shown!r} is not empty and holds no shard job "
                    f"({', '.join(repr(o) for o in sorted(others)[:5])})"
                )
            return cls(path, fresh, fresh=True)
        old = read_manifest(output)
        if old is None:
            raise FailedPrecondition(
                f"the manifest of output directory {shown!r} is unreadable; remove the "
                "directory to start over"
            )
        if not may_access(job.caller, str(old.get("started_by") or "")):
            raise PermissionDenied(
                f"output directory {shown!r} holds a shard job of another caller; choose another output_path"
            )
        keys = ["format", "input", "rules_version", "mode", "batch_rows", "rows_total"]
        if "rules" in old:  # manifests written before it was recorded are checked without it
            keys.append("rules")
        for key in keys:
            if old.get(key) != fresh[key]:
                if key == "input":  # the fingerprint holds the server's path: say what differs instead
                    what = (
                        "another input shard"
                        if old.get(key, {}).get("path") != plan.fingerprint["path"]
                        else "an input shard that changed since (size or modification time)"
                    )
                else:
                    what = f"another {key} ({old.get(key)!r}, now {fresh[key]!r})"
                raise FailedPrecondition(
                    f"output directory {shown!r} holds a job with {what}; resuming would mix them: remove it "
                    "or choose another output_path"
                )
        # Fields a manifest of an older version lacks; the job id follows the request (a moved
        # output directory gets the id of its new place).
        for key in ("rules", "has_scores", "error", "owner", "runs"):
            old.setdefault(key, fresh[key])
        old.setdefault("started_by", "")  # a job of before ownership: nobody's (an admin's)
        old["job_id"] = job.job_id
        old.setdefault("state", SUCCEEDED if old.get("complete") else RUNNING)
        old.setdefault("updated", fresh["updated"])
        return cls(path, old)

    @property
    def parts(self) -> list[dict]:
        return self.data["parts"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def rows_done(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def rows_failed(self) -> int:
        return sum(p["rows_failed"] for p in self.parts)

    def start_run(self, owner: str) -> None:
        """A run begins (a new job, a resume, a take-over): who runs it, from which part."""
        self.data.update(state=RUNNING, error=None, owner=owner)
        self.data["runs"].append(
            {
                "owner": owner,
                "started": time.time(),
                "first_part": len(self.parts),
                "seconds": 0.0,
                "rows_per_second": 0.0,
            }
        )

    def finish(self, state: str, error: dict | None = None, run: dict | None = None) -> None:
        self.data.update(state=state, error=error)
        self.commit(complete=state == SUCCEEDED, run=run)

    def commit(self, part: dict | None = None, complete: bool = False, run: dict | None = None) -> None:
        if part is not None:
            self.parts.append(part)
        if run is not None and self.data["runs"]:
            self.data["runs"][-1].update(run)
        self.data["complete"] = complete
        self.data["updated"] = time.time()
        write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")


def read_manifest(output: Path) -> dict | None:
    """A job's manifest as written (None when there is none or it is unreadable)."""
    try:
        data = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
