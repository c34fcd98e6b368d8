"""Who may see and act on a shard job.

The gateway authenticates the caller and passes its identity in the job requests (`Caller`): the
proxylabel service trusts it, since only the gateway reaches it (mTLS or a service token,
docs/operations.md#authentication). A job records the name of the caller that started it
(`started_by` in its manifest).

- no caller (an open gateway, no tokens): every job is everyone's;
- an admin: every job;
- anyone else: the jobs it started. A job started without a caller (on an open gateway, or
  before jobs were owned) is an admin's only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool = False


def may_access(caller: Caller | None, started_by: str) -> bool:
    """Whether `caller` may see, watch, resume or cancel a job started by `started_by`."""
    if caller is None or caller.admin:
        return True
    return bool(caller.name) and caller.name == started_by


def started_by(caller: Caller | None) -> str:
    """What a job started by `caller` records as its owner ("" without a caller)."""
    return caller.name if caller is not None else ""
