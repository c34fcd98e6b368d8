"""Hostile input on every public RPC, both hops (the gateway, and each service called directly),
generated with hypothesis:

- message level: random messages built from the request descriptors (every field type, unknown
  enum values, NaN and infinite floats, boundary integers, hostile strings and image bytes), and
  valid requests mutated a few fields at a time (a field set to a random value, cleared, a repeated
  field emptied or an element copied many times; stream messages dropped, repeated, reordered);
- wire level: raw request bytes. tests/runtime/test_wire.py sends one undecodable message to every RPC;
  here the bytes are valid requests with bits flipped, cut short, spliced or followed by junk, and
  hand-built protobuf records (field keys with every wire type, lengths that lie), which may or may
  not parse;
- metadata: random `authorization` values on a gateway that has tokens configured.

Every call must end within its deadline with a documented status (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE, UNAUTHENTICATED,
PERMISSION_DENIED), never UNKNOWN or INTERNAL, and so must every item status in its answer. A
small request that runs into its deadline (DEADLINE_EXCEEDED, the deadline being far longer than
any valid request takes) is a hang and fails. After every example each process must still run
(`popen.poll()`) and its VmRSS stay under its size at the start plus RSS_HEADROOM_MIB.

`make test` runs a short form (a few examples per RPC); `make bench` (`-m slow`) the long one.
A failure prints the example and hypothesis's reproduction blob; there is no example database.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from skimage import data as skdata

from bench import loadgen, results
from launcher.suite import ROOT, Suite, command_path, wait_serving
from tessera.common.v1 import common_pb2
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.engagement.v1 import engagement_service_pb2 as engagement_pb
from tessera.gateway.v1 import gateway_service_pb2 as gateway_pb
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb
from tests.helpers.wire import METHODS

# Hypothesis's own files (its cache of constants) under .cache/, not in the checkout's root.
set_hypothesis_home_dir(str(ROOT / ".cache" / "hypothesis"))

FD = pbd.FieldDescriptor
DOCUMENTED = {
    grpc.StatusCode[name]
    for name in (
        "OK",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    )
}
DOCUMENTED_VALUES = {c.value[0] for c in DOCUMENTED}
CALL_DEADLINE = 30.0  # seconds; a valid request of these sizes takes well under one
RSS_HEADROOM_MIB = 768
PROCESSES = ("gateway", "emotion", "engagement", "proxylabel")
# Examples per test: (message level, wire level) in the short form; the long form (slow) runs more.
SHORT = {"message": 25, "wire": 12}
LONG = {"message": 300, "wire": 150}
IDS = [f"{p}.{m.name}" for p, m in METHODS]


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
    )


# ------------------------------------------------------------------------------------------------
# Material: real images, frames, a shard under the suite's roots
def _jpeg(bgr: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", bgr)[1].tobytes()


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


ASTRONAUT = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
FACE = cv2.resize(ASTRONAUT[60:280, 150:370], (112, 112))
SMALL_JPEG = _jpeg(cv2.resize(ASTRONAUT, (160, 160)))
FACE_JPEG = _jpeg(FACE)
FACE_PNG = _png(FACE)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width × height, then a truncated IDAT: a tiny 'bomb'."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


IMAGE_BYTES = [
    SMALL_JPEG,
    FACE_JPEG,
    FACE_PNG,
    SMALL_JPEG[: len(SMALL_JPEG) // 2],
    SMALL_JPEG[:20],
    _png_header(30000, 30000),
    _png_header(1, 1),
    _png_header(0, 5),
    b"GIF89a\x01\x00\x01\x00",
    b"\xff\xd8\xff\xe0",
    b"",
    b"\x00" * 100,
    _png(np.zeros((4, 4), np.uint16)),
]
BOUNDARY_INTS = [0, 1, -1, 2, 7, 31, 32, 33, 50, 384, 899, 900, 901, 4096, 4097, 2**31 - 1, -(2**31)]
HOSTILE_STRINGS = [
    "",
    " ",
    "..",
    "../../../../etc/passwd",
    "/etc/hostname",
    "/proc/self/mem",
    "/dev/zero",
    "nul\x00l",
    "é中🙂",
    "a" * 2000,
    "%s%n",
    "emotion_student",
    "emotion_rn18",
    "text_embedder",
    "proxylabel_knn",
    "*",
    "emotion_*",
    "sentence-transformers/all-MiniLM-L6-v2",
    "0" * 32,
    "f" * 32,
    "0" * 31,
    "G" * 32,
]


def _frames() -> list[bytes]:
    from tools.modeller.engagement.generate import make_clip

    return [_jpeg(f) for f in make_clip(loadgen.CLIP_LEVELS, n_frames=4, size=(240, 320), seed=2)]


# ------------------------------------------------------------------------------------------------
# Message-level strategies from the descriptors
def message_class(descriptor: pbd.Descriptor) -> type[Message]:
    return GetMessageClass(descriptor)


class Material:
    """Values that let fuzzed requests reach deep: a real shard under the suite's roots, an output
    root beside it, real video frames."""

    def __init__(self, shard: Path, out_root: Path, frames: list[bytes]) -> None:
        self.shard, self.out_root, self.frames = shard, out_root, frames

    def paths(self) -> st.SearchStrategy[str]:
        return st.one_of(
            st.sampled_from(
                [
                    str(self.shard),
                    str(self.out_root),
                    str(self.shard.parent),
                    str(self.shard) + ".x",
                    str(self.out_root / ".." / ".." / ".." / "etc"),
                    str(self.shard.parent / "missing.parquet"),
                    "relative/shard.parquet",
                ]
            ),
            st.builds(
                lambda s: str(self.out_root / s),
                st.text(st.characters(codec="ascii", exclude_characters="\0/"), min_size=1, max_size=12),
            ),
            st.text(max_size=40),
        )


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(
        st.sampled_from([v for v in BOUNDARY_INTS if lo <= v <= hi] + [lo, hi]),
        st.integers(lo, hi),
        st.integers(max(lo, -10), min(hi, 1000)),
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]),
        st.floats(width=width),
        st.floats(-10, 100, width=width),
    )


def value_strategy(field: pbd.FieldDescriptor, material: Material, depth: int) -> st.SearchStrategy[Any]:
    """One value of a field (an element, for repeated fields)."""
    name, t = field.name, field.type
    if t == FD.TYPE_MESSAGE:
        return messages(field.message_type, material, depth + 1)
    if t == FD.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]),
            st.integers(-3, 40),
            st.sampled_from([2**31 - 1, -(2**31)]),
        )
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return _floats(32 if t == FD.TYPE_FLOAT else 64)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(32, True)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _ints(64, True)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _ints(32, False)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _ints(64, False)
    if t == FD.TYPE_BYTES:
        frames = material.frames if name in ("encoded", "data") else []
        return st.one_of(st.sampled_from(IMAGE_BYTES + frames), st.binary(max_size=300))
    if name.endswith("_path"):
        return material.paths()
    return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=30))


def repeated_strategy(
    field: pbd.FieldDescriptor, material: Material, depth: int
) -> st.SearchStrategy[list[Any]]:
    element = value_strategy(field, material, depth)
    if field.name == "embedding":  # the dimension the services check, and its neighbours
        return st.one_of(
            st.integers(0, 3).flatmap(lambda n: st.lists(element, min_size=n, max_size=n)),
            st.sampled_from([383, 384, 385]).flatmap(lambda n: st.lists(_floats(32), min_size=n, max_size=n)),
        )
    return st.lists(element, max_size=3 if depth < 2 else 1)


@st.composite
def _message(draw: st.DrawFn, descriptor: pbd.Descriptor, material: Material, depth: int) -> Message:
    msg = message_class(descriptor)()
    if descriptor.full_name == "tessera.common.v1.RawImage" and draw(st.booleans()):
        return draw(raw_images())
    in_oneof = {f.name for o in descriptor.oneofs for f in o.fields}
    chosen = [draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs]
    fields = [f for f in descriptor.fields if f.name not in in_oneof] + [f for f in chosen if f is not None]
    for field in fields:
        if field.name not in {f.name for f in chosen if f} and not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE and depth >= 4:
            continue
        set_field(
            msg,
            field,
            draw(
                repeated_strategy(field, material, depth)
                if _repeated(field)
                else value_strategy(field, material, depth)
            ),
        )
    return msg


def messages(descriptor: pbd.Descriptor, material: Material, depth: int = 0) -> st.SearchStrategy[Message]:
    return _message(descriptor, material, depth)


@st.composite
def raw_images(draw: st.DrawFn) -> common_pb2.RawImage:
    """Raw pixels whose size agrees with height × width × channels, or lies about it."""
    fmt = draw(st.sampled_from(list(common_pb2.PixelFormat.values())))
    channels = {common_pb2.PIXEL_FORMAT_GRAY8: 1, common_pb2.PIXEL_FORMAT_RGBA8: 4}.get(fmt, 3)
    h, w = draw(st.integers(0, 48)), draw(st.integers(0, 48))
    if draw(st.booleans()):
        data = draw(st.binary(min_size=h * w * channels, max_size=h * w * channels))
    else:
        data = draw(st.binary(max_size=64))
        h, w = draw(st.sampled_from([(h, w), (100000, 100000), (2**32 - 1, 1), (1, 2**32 - 1), (0, 10)]))
    return common_pb2.RawImage(height=h, width=w, format=fmt, data=data)


def _repeated(field: pbd.FieldDescriptor) -> bool:
    return field.is_repeated


def set_field(msg: Message, field: pbd.FieldDescriptor, value: Any) -> None:
    """Set a field of msg (a list for repeated fields); values the runtime refuses are skipped."""
    target = getattr(msg, field.name)
    try:
        if _repeated(field):
            del target[:]
            if field.type == FD.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif field.type == FD.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, field.name, value)
    except (ValueError, TypeError):
        pass  # e.g. an out-of-range enum on a closed enum: not sendable by any client either


# ------------------------------------------------------------------------------------------------
# Mutations of valid requests
@st.composite
def mutated_message(draw: st.DrawFn, seed: Message, material: Material) -> Message:
    msg = copy.deepcopy(seed)
    if not msg.DESCRIPTOR.fields:  # an empty request: only the wire level can vary it
        return msg
    for _ in range(draw(st.integers(1, 3))):
        node = msg
        for _level in range(5):  # walk down at most a few levels, then change something there
            if not node.DESCRIPTOR.fields:
                break
            field = draw(st.sampled_from(list(node.DESCRIPTOR.fields)))
            if (
                field.type == FD.TYPE_MESSAGE
                and not _repeated(field)
                and node.HasField(field.name)
                and draw(st.booleans())
            ):
                node = getattr(node, field.name)
                continue
            items = getattr(node, field.name) if _repeated(field) else None
            if items is not None and len(items) and field.type == FD.TYPE_MESSAGE and draw(st.booleans()):
                node = items[draw(st.integers(0, len(items) - 1))]
                continue
            action = draw(
                st.sampled_from(
                    ["set", "clear", "copies"] if items is not None and len(items) else ["set", "clear"]
                )
            )
            if action == "clear":
                node.ClearField(field.name)
            elif action == "copies":
                element = items[draw(st.integers(0, len(items) - 1))]
                n = draw(st.sampled_from([1, 2, 31, 33, 40]))
                if field.type == FD.TYPE_MESSAGE:
                    for _ in range(n):
                        items.add().CopyFrom(element)
                else:
                    items.extend([element] * n)
            else:
                set_field(
                    node,
                    field,
                    draw(
                        repeated_strategy(field, material, 2)
                        if _repeated(field)
                        else value_strategy(field, material, 2)
                    ),
                )
            break
    return msg


@st.composite
def mutated_stream(draw: st.DrawFn, seed: list[Message], material: Material) -> list[Message]:
    stream = [copy.deepcopy(m) for m in seed]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["mutate", "drop", "repeat", "swap", "insert"]))
        i = draw(st.integers(0, max(0, len(stream) - 1)))
        if not stream:
            action = "insert"
        if action == "mutate":
            stream[i] = draw(mutated_message(stream[i], material))
        elif action == "drop":
            del stream[i]
        elif action == "repeat":
            stream[i:i] = [copy.deepcopy(stream[i])] * draw(st.integers(1, 4))
        elif action == "swap":
            j = draw(st.integers(0, len(stream) - 1))
            stream[i], stream[j] = stream[j], stream[i]
        else:
            stream.insert(i, draw(messages(seed[0].DESCRIPTOR, material)))
    return stream


def request_streams(
    method: pbd.MethodDescriptor, seeds: list[list[Message]], material: Material
) -> st.SearchStrategy[list[Message]]:
    """Lists of request messages (one for unary requests): random ones, or mutated seeds."""
    random_one = messages(method.input_type, material)
    if method.client_streaming:
        random = st.lists(random_one, max_size=5)
        mutated = st.sampled_from(seeds).flatmap(lambda s: mutated_stream(s, material))
    else:
        random = random_one.map(lambda m: [m])
        mutated = st.sampled_from(seeds).flatmap(lambda s: mutated_message(s[0], material).map(lambda m: [m]))
    return st.one_of(random, mutated, mutated)


# ------------------------------------------------------------------------------------------------
# Wire-level strategies: raw bytes
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def records(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Hand-built protobuf records: any field number, any wire type (groups and the invalid 6 and 7
    too), varints, fixed values, and lengths that are true, short or far too long."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        number = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 15, 16, 2**29 - 1, 0]))
        wire = draw(st.integers(0, 7))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1])))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            body = draw(st.binary(max_size=40) if depth >= 2 or draw(st.booleans()) else records(depth + 1))
            length = draw(
                st.sampled_from([len(body), len(body) + 1, max(0, len(body) - 1), 2**31 - 1, 2**32])
            )
            out += _varint(length) + body
        else:
            out += draw(st.binary(max_size=8))
    return bytes(out)


@st.composite
def corrupted(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "junk", "splice"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "junk":
            data += draw(st.one_of(records(), st.binary(max_size=20)))
        else:
            j = draw(st.integers(0, max(0, len(data) - 1)))
            data[i:i] = data[j : j + draw(st.integers(1, 64))]
    return bytes(data)


def wire_streams(method: pbd.MethodDescriptor, seeds: list[list[Message]]) -> st.SearchStrategy[list[bytes]]:
    valid = [m.SerializeToString() for s in seeds for m in s]
    one = st.one_of(st.binary(max_size=200), records(), st.sampled_from(valid).flatmap(corrupted))
    if not method.client_streaming:
        return one.map(lambda b: [b])
    return st.sampled_from(seeds).flatmap(
        lambda s: st.lists(
            st.one_of(st.sampled_from([m.SerializeToString() for m in s]), one), min_size=1, max_size=5
        )
    )


# ------------------------------------------------------------------------------------------------
# Seeds: a valid request (stream) per RPC, both hops
def seed_requests(material: Material) -> dict[tuple[str, str], list[list[Message]]]:
    image = common_pb2.Image(encoded=SMALL_JPEG)
    crop = common_pb2.Image(encoded=FACE_JPEG, is_face_crop=True)
    boxed = common_pb2.Image(
        encoded=SMALL_JPEG, faces=[common_pb2.BoundingBox(x=40, y=10, width=60, height=60)]
    )
    raw = common_pb2.Image(
        raw=common_pb2.RawImage(
            height=112, width=112, format=common_pb2.PIXEL_FORMAT_BGR8, data=FACE.tobytes()
        ),
        is_face_crop=True,
    )
    rows = [
        proxylabel_pb.TextRow(id="a", text="How do I boil an egg?", response="Simmer it nine minutes."),
        proxylabel_pb.TextRow(id="b", text="hello", embedding=[0.05] * 384),
    ]
    knn = proxylabel_pb.KnnOptions(
        k=10,
        tau=0.1,
        weighting=proxylabel_pb.KNN_WEIGHTING_SOFTMAX,
        aggregation=proxylabel_pb.KNN_AGGREGATION_VOTE,
    )
    rules = proxylabel_pb.FusionRules(
        version="fuzz", mode=proxylabel_pb.PROXY_MODE_ENSEMBLE, alpha=0.5, knn=knn
    )
    job = "0" * 32

    def clip(cls: Any, header: Any) -> list[Message]:
        return [cls(header=header)] + [
            cls(frame=common_pb2.VideoFrame(timestamp_us=i * 33_333, image=common_pb2.Image(encoded=f)))
            for i, f in enumerate(material.frames)
        ]

    out = material.out_root
    g, e, n, p = gateway_pb, emotion_pb, engagement_pb, proxylabel_pb
    return {
        ("gateway", "ClassifyEmotion"): [
            [g.ClassifyEmotionRequest(images=[image, crop], mode=g.EMOTION_MODE_STUDENT)],
            [g.ClassifyEmotionRequest(images=[boxed, raw], return_member_logits=True)],
        ],
        ("gateway", "ScoreClip"): [clip(g.ScoreClipRequest, g.ClipHeader(clip_id="c", fps=30))],
        ("gateway", "StreamVideo"): [clip(g.StreamVideoRequest, g.ClipHeader(clip_id="s", fps=30))],
        ("gateway", "ScoreTexts"): [[g.ScoreTextsRequest(rows=rows)]],
        ("gateway", "ScoreShard"): [
            [g.ScoreShardRequest(input_path=str(material.shard), output_path=str(out / "g"), batch_rows=16)]
        ],
        ("gateway", "GetShardJob"): [[g.GetShardJobRequest(job_id=job)]],
        ("gateway", "ListShardJobs"): [[g.ListShardJobsRequest()]],
        ("gateway", "CancelShardJob"): [[g.CancelShardJobRequest(job_id=job)]],
        ("gateway", "GetStatus"): [[g.GetStatusRequest()]],
        ("emotion", "InferFaces"): [
            [e.InferFacesRequest(images=[image, crop], models=["emotion_student"])],
            [e.InferFacesRequest(images=[boxed, raw], models=["emotion_student"])],
        ],
        ("emotion", "ListModels"): [[e.ListModelsRequest()]],
        ("engagement", "ScoreClip"): [clip(n.ScoreClipRequest, n.ClipHeader(clip_id="c", fps=30))],
        ("engagement", "StreamVideo"): [clip(n.StreamVideoRequest, n.ClipHeader(clip_id="s", fps=30))],
        ("engagement", "ListModels"): [[n.ListModelsRequest()]],
        ("proxylabel", "ScoreTexts"): [[p.ScoreTextsRequest(rows=rows, knn=knn, run_knn=True, run_mlp=True)]],
        ("proxylabel", "ScoreShard"): [
            [
                p.ScoreShardRequest(
                    input_path=str(material.shard), output_path=str(out / "p"), rules=rules, batch_rows=16
                )
            ]
        ],
        ("proxylabel", "GetShardJob"): [[p.GetShardJobRequest(job_id=job)]],
        ("proxylabel", "ListShardJobs"): [[p.ListShardJobsRequest()]],
        ("proxylabel", "CancelShardJob"): [[p.CancelShardJobRequest(job_id=job)]],
        ("proxylabel", "ListModels"): [[p.ListModelsRequest()]],
    }


# ------------------------------------------------------------------------------------------------
# Examples as hypothesis prints them: short (image bytes cut), the reproduction blob for the rest
def _short(b: bytes) -> str:
    return repr(b[:24]) + (f"…({len(b)} B)" if len(b) > 24 else "")


def describe(msg: Message) -> str:
    parts = []
    for field, value in msg.ListFields():
        values = list(value) if _repeated(field) else [value]
        shown = [
            ("{" + describe(v) + "}")
            if field.type == FD.TYPE_MESSAGE
            else _short(v)
            if isinstance(v, bytes)
            else repr(v)[:60]
            for v in values[:4]
        ]
        more = f" …+{len(values) - 4}" if len(values) > 4 else ""
        parts.append(f"{field.name}: " + (", ".join(shown) + more if _repeated(field) else shown[0]))
    return "; ".join(parts)


class Case:
    """One example: request messages (message level) or raw request bytes (wire level)."""

    def __init__(self, items: Sequence[Message] | Sequence[bytes]) -> None:
        self.items = list(items)

    def payloads(self) -> list[bytes]:
        return [i if isinstance(i, bytes) else i.SerializeToString() for i in self.items]

    def __repr__(self) -> str:
        return (
            "["
            + ", ".join(
                _short(i) if isinstance(i, bytes) else f"{type(i).__name__}({describe(i)})"
                for i in self.items
            )
            + "]"
        )


# ------------------------------------------------------------------------------------------------
# Bugs found by this module, each with its minimal reproducer (a test below, xfail strict: it
# passes while the bug is there and fails once it is fixed, so the mark comes off). The fuzz tests
# skip examples that only hit a known bug, so they go on looking for others.
def _parse(method: pbd.MethodDescriptor, payloads: Sequence[bytes]) -> list[Message] | None:
    cls = message_class(method.input_type)
    try:
        return [cls.FromString(p) for p in payloads]
    except DecodeError:
        return None


# Bug name -> a predicate on (process, method, parsed requests) telling which examples hit it.
# Empty: the one found so far (a model named twice in InferFaces) is fixed.
KNOWN_BUGS: dict[str, Callable[[str, pbd.MethodDescriptor, list[Message]], bool]] = {}


def known_bug(process: str, method: pbd.MethodDescriptor, payloads: Sequence[bytes]) -> str | None:
    requests = _parse(method, payloads)
    if requests is None:
        return None
    return next((name for name, hits in KNOWN_BUGS.items() if hits(process, method, requests)), None)


# ------------------------------------------------------------------------------------------------
# Calling and judging
def invoke(
    channel: grpc.Channel,
    method: pbd.MethodDescriptor,
    payloads: Sequence[bytes],
    timeout: float,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send raw request bytes; (status, details, raw answers)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    kw: dict[str, Any] = {"timeout": timeout, "metadata": tuple(metadata)}
    answers: list[bytes] = []
    try:
        if kind == (False, False):
            answers.append(channel.unary_unary(path)(payloads[0], **kw))
        elif kind == (False, True):
            answers.extend(channel.unary_stream(path)(payloads[0], **kw))
        elif kind == (True, False):
            answers.append(channel.stream_unary(path)(iter(payloads), **kw))
        else:
            for answer in channel.stream_stream(path)(iter(payloads), **kw):
                answers.append(answer)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", answers
    return grpc.StatusCode.OK, "", answers


def item_codes(msg: Message) -> Iterator[tuple[str, int, str]]:
    """(field path, code, message) of every ItemStatus (and job error) in an answer."""
    for field, value in msg.ListFields():
        if field.type != FD.TYPE_MESSAGE:
            continue
        for v in value if _repeated(field) else [value]:
            if v.DESCRIPTOR.full_name == "tessera.common.v1.ItemStatus":
                yield field.name, v.code, v.message
            else:
                yield from item_codes(v)


def rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return 0.0


class Judge:
    """Runs one example against a process and checks everything the module promises."""

    def __init__(self, suite: Suite, baseline: dict[str, float]) -> None:
        self.suite = suite
        self.baseline = baseline
        self.channels: dict[str, grpc.Channel] = {}
        self.codes: dict[str, dict[str, int]] = {}
        self.peak: dict[str, float] = dict(baseline)
        self.forms: set[str] = set()  # "short", "long": which forms ran

    def channel(self, process: str) -> grpc.Channel:
        target = self.suite.processes[process].target
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(
                target,
                options=[
                    ("grpc.max_send_message_length", 64 << 20),
                    ("grpc.max_receive_message_length", 64 << 20),
                ],
            )
        return self.channels[target]

    def check(
        self,
        process: str,
        method: pbd.MethodDescriptor,
        payloads: Sequence[bytes],
        metadata: Sequence[tuple[str, str]] = (),
        target_channel: grpc.Channel | None = None,
    ) -> None:
        if known_bug(process, method, payloads):
            assume(False)  # a known bug (its own test below): look for others
        channel = target_channel or self.channel(process)
        code, details, answers = invoke(channel, method, payloads, CALL_DEADLINE, metadata)
        key = f"{process}.{method.name}"
        self.codes.setdefault(key, {}).setdefault(code.name, 0)
        self.codes[key][code.name] += 1
        assert code in DOCUMENTED, f"{key}: {code.name}: {details}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (
            f"{key}: a hang: no answer within {CALL_DEADLINE:g} s"
        )
        reply_cls = message_class(method.output_type)
        for raw in answers:
            try:
                reply = reply_cls.FromString(raw)
            except DecodeError as exc:
                raise AssertionError(f"{key}: an answer that does not parse: {exc}") from None
            for field, item_code, message in item_codes(reply):
                assert item_code in DOCUMENTED_VALUES, f"{key}: item {field} has code {item_code}: {message}"
        self.check_processes()

    def check_processes(self) -> None:
        for name in PROCESSES:
            proc = self.suite.processes[name]
            assert proc.popen.poll() is None, (
                f"{name} died (exit {proc.popen.returncode}):\n{proc.log_tail()}"
            )
            rss = rss_mib(proc.popen.pid)
            self.peak[name] = max(self.peak[name], rss)
            assert rss < self.baseline[name] + RSS_HEADROOM_MIB, (
                f"{name}: VmRSS {rss:.0f} MiB, {self.baseline[name]:.0f} at the start"
            )

    def close(self) -> None:
        for c in self.channels.values():
            c.close()


# ------------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    root = tmp_path_factory.getbasetemp() / "fuzz"  # under the module suite's data roots
    return Material(loadgen.write_shard(root / "shard.parquet", rows=32), root / "out", _frames())


@pytest.fixture(scope="module")
def seeds(material: Material) -> dict[tuple[str, str], list[list[Message]]]:
    s = seed_requests(material)
    missing = {(p, m.name) for p, m in METHODS} - set(s)
    assert not missing, f"no seed request for {sorted(missing)}"
    return s


@pytest.fixture(scope="module")
def judge(suite: Suite) -> Iterator[Judge]:
    j = Judge(suite, {n: rss_mib(suite.processes[n].popen.pid) for n in PROCESSES})
    yield j
    print("\nfuzz statuses:", {k: v for k, v in sorted(j.codes.items())})
    print("VmRSS MiB at the start → peak:", {n: f"{j.baseline[n]:.0f} → {j.peak[n]:.0f}" for n in PROCESSES})
    j.close()
    if os.environ.get("TESSERA_BENCH_RECORD") == "1" and j.codes:
        totals: dict[str, int] = {}
        for codes in j.codes.values():
            for code, n in codes.items():
                totals[code] = totals.get(code, 0) + n
        bad = sum(n for code, n in totals.items() if grpc.StatusCode[code] not in DOCUMENTED)
        results.record(
            "fuzzing (tests/suite/test_fuzz.py)",
            [
                results.row(
                    f"calls with fuzzed messages and bytes, {len(j.codes)} RPCs on both hops",
                    sum(totals.values()),
                    "calls",
                    note=", ".join(f"{k} {v}" for k, v in sorted(totals.items())),
                ),
                results.row(
                    "calls ending UNKNOWN, INTERNAL or another undocumented status",
                    bad,
                    "calls",
                    target="0",
                    meets_target=bad == 0,
                    note="known bugs are skipped: see KNOWN_BUGS in tests/suite/test_fuzz.py",
                ),
                *(
                    results.row(
                        f"{n} VmRSS peak vs at the start",
                        j.peak[n],
                        "MiB",
                        baseline=round(j.baseline[n], 1),
                        target=f"< start + {RSS_HEADROOM_MIB} MiB",
                        meets_target=j.peak[n] < j.baseline[n] + RSS_HEADROOM_MIB,
                    )
                    for n in PROCESSES
                ),
            ],
            quick="long" not in j.forms,
            settings="examples per RPC: "
            + "; ".join(
                f"{form} form: message level {n['message']}, wire level {n['wire']}"
                for form, n in (("short", SHORT), ("long", LONG))
                if form in j.forms
            ),
        )


@pytest.fixture(autouse=True)
def _revive(suite: Suite, judge: Judge) -> None:
    """A process killed by an earlier example fails that test; the next ones get it back."""
    for name in PROCESSES:
        if suite.processes[name].popen.poll() is not None:
            suite.restart(name)
            judge.baseline[name] = rss_mib(suite.processes[name].popen.pid)
            judge.channels.clear()


def _params() -> list[Any]:
    params = []
    for (process, method), test_id in zip(METHODS, IDS, strict=True):
        params.append(pytest.param(process, method, "short", id=f"{test_id}-short"))
        params.append(
            pytest.param(
                process,
                method,
                "long",
                id=f"{test_id}-long",
                marks=[pytest.mark.slow, pytest.mark.timeout(1200)],
            )
        )
    return params


# ------------------------------------------------------------------------------------------------
# The tests
@pytest.mark.parametrize(("process", "method", "form"), _params())
def test_fuzzed_messages_end_with_a_documented_status(
    judge: Judge, seeds: dict, material: Material, process: str, method: pbd.MethodDescriptor, form: str
) -> None:
    judge.forms.add(form)

    @fuzz_settings((SHORT if form == "short" else LONG)["message"])
    @given(request_streams(method, seeds[(process, method.name)], material).map(Case))
    def run(case: Case) -> None:
        judge.check(process, method, case.payloads())

    run()


@pytest.mark.parametrize(("process", "method", "form"), _params())
def test_fuzzed_bytes_end_with_a_documented_status(
    judge: Judge, seeds: dict, process: str, method: pbd.MethodDescriptor, form: str
) -> None:
    judge.forms.add(form)

    @fuzz_settings((SHORT if form == "short" else LONG)["wire"])
    @given(wire_streams(method, seeds[(process, method.name)]).map(Case))
    def run(case: Case) -> None:
        judge.check(process, method, case.payloads())

    run()


# ------------------------------------------------------------------------------------------------
# Metadata on a gateway with tokens
TOKEN = "s3cret-token"
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@pytest.fixture(scope="module")
def guarded_gateway(
    suite: Suite, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A second gateway in front of the same services, with a bearer token configured."""
    work = tmp_path_factory.mktemp("guarded")
    ready = work / "gateway.ready.json"
    env = {
        **os.environ,
        "TESSERA_GATEWAY__AUTH__TOKENS": f'["{TOKEN}"]',
        "TESSERA_GATEWAY__RULES_PATH": str(ROOT / "config" / "fusion_rules.yaml"),
        **{
            f"TESSERA_GATEWAY__TARGETS__{n.upper()}": suite.processes[n].target
            for n in ("emotion", "engagement", "proxylabel")
        },
    }
    with (work / "gateway.log").open("wb") as log:
        popen = subprocess.Popen(
            [
                command_path("tessera-gateway"),
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--ready-file",
                str(ready),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert popen.poll() is None, (work / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the guarded gateway did not start"
            time.sleep(0.05)
        target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        wait_serving(target, timeout=60)
        yield target, popen
    finally:
        popen.terminate()
        try:
            popen.wait(20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


@st.composite
def auth_metadata(draw: st.DrawFn) -> list[tuple[str, str]]:
    value = draw(
        st.one_of(
            st.sampled_from(
                [
                    f"Bearer {TOKEN}",
                    f"bearer {TOKEN}",
                    f"Bearer  {TOKEN}",
                    TOKEN,
                    f"Bearer {TOKEN[:-1]}",
                    f"Bearer {TOKEN} ",
                    "Bearer ",
                    "Basic czNjcmV0",
                    "",
                ]
            ),
            _HEADER_TEXT,
            _HEADER_TEXT.map(lambda s: f"Bearer {s}"),
        )
    )
    md = [] if draw(st.booleans()) and value == "" else [("authorization", value)]
    if draw(st.booleans()):
        md.append(
            (
                draw(st.sampled_from(["authorization", "x-request-id", "x-api-key", "grpc-timeout-x"])),
                draw(_HEADER_TEXT),
            )
        )
    return md


GATEWAY_METHODS = [(p, m) for p, m in METHODS if p == "gateway"]


@pytest.mark.parametrize("examples", [20, pytest.param(300, marks=pytest.mark.slow)], ids=["short", "long"])
def test_fuzzed_credentials_end_with_a_documented_status(
    judge: Judge, seeds: dict, guarded_gateway: tuple, examples: int
) -> None:
    target, popen = guarded_gateway
    with grpc.insecure_channel(target) as channel:

        @fuzz_settings(examples)
        @given(st.sampled_from(GATEWAY_METHODS), auth_metadata())
        def run(pm: tuple[str, pbd.MethodDescriptor], metadata: list[tuple[str, str]]) -> None:
            process, method = pm
            stream = seeds[(process, method.name)][0]
            payloads = [m.SerializeToString() for m in stream]
            code, details, _ = invoke(channel, method, payloads, CALL_DEADLINE, metadata)
            assert code in DOCUMENTED and code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{code.name}: {details}"
            maybe_valid = any(
                k == "authorization"
                and v.strip().partition(" ")[0].lower() == "bearer"
                and v.strip().partition(" ")[2].strip() == TOKEN
                for k, v in metadata
            )
            if not maybe_valid:
                assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                    f"{method.name} with {metadata}: {code.name}"
                )
            assert popen.poll() is None
            judge.check_processes()

        run()


# ------------------------------------------------------------------------------------------------
# Minimal reproducers of the bugs found (KNOWN_BUGS)
def test_a_model_named_twice_is_not_an_internal_error(suite: Suite) -> None:
    """Found by this module: InferFaces with a model named twice ended INTERNAL (every row's logits
    zipped twice); now INVALID_ARGUMENT naming it."""
    request = emotion_pb.InferFacesRequest(
        images=[common_pb2.Image(encoded=FACE_JPEG, is_face_crop=True)],
        models=["emotion_student", "emotion_student"],
    )
    method = emotion_pb.DESCRIPTOR.services_by_name["EmotionService"].methods_by_name["InferFaces"]
    with grpc.insecure_channel(suite.processes["emotion"].target) as channel:
        code, details, _ = invoke(channel, method, [request.SerializeToString()], CALL_DEADLINE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "named more than once" in details, (
        f"{code.name}: {details}"
    )
