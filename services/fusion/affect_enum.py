"""The rules' affect names as the API's `tessera.common.v1.Affect` enum, both ways: the engagement
service answers with the enum, the gateway fuses by name and answers with the enum again."""

from __future__ import annotations

from typing import cast

from services.fusion.rules import AFFECTS, AffectName
from tessera.common.v1 import common_pb2

# The generated stubs type Value() as int and the enum's fields as Affect: the same numbers.
AFFECT_VALUES: dict[str, common_pb2.Affect] = {
    name: cast("common_pb2.Affect", common_pb2.Affect.Value(f"AFFECT_{name.upper()}")) for name in AFFECTS
}
AFFECT_NAMES: dict[int, AffectName] = {AFFECT_VALUES[name]: name for name in AFFECTS}
