"""The rules' affect names as the API's `tessera.common.v1.Affect` enum, both ways: the engagement
service answers with the enum, the gateway fuses by name and answers with the enum again."""

from __future__ import annotations

from tessera.common.v1 import common_pb2

from services.fusion.rules import AFFECTS, AffectName

AFFECT_VALUES: dict[str, int] = {name: common_pb2.Affect.Value(f"AFFECT_{name.upper()}") for name in AFFECTS}
AFFECT_NAMES: dict[int, AffectName] = {AFFECT_VALUES[name]: name for name in AFFECTS}
