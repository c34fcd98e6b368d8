"""A modeller's temporal engagement network, already in ONNX → the repository.

    tessera-export temporal --model net.onnx --preprocess preprocess.json \\
        [--name engagement_temporal] [--repo model_repository] [--version N]

The engagement service feeds the network one clip at a time: `[batch, frames, channels, height,
width]` face crops preprocessed as `preprocess.json` says (colour, CLAHE, size, mean/std), and
reads `[batch, 4, 4]` — per affect (engagement, boredom, confusion, frustration), the
probabilities of levels 0-3. The network may be any per-frame CNN + TCN/LSTM exported from
PyTorch; this checks that its signature is that one and that it answers probabilities (ONNX
Runtime on random clips), then writes it as a new version. A network that ends in logits must be
exported with its softmax over the levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from services.fusion.rules import AFFECTS
from services.runtime.model_files import Batching, ModelSpec, Tensor
from services.vision.preprocess import PreprocessParams
from tools.modeller.export import versions
from tools.modeller.export.versions import ExportError

LEVELS = 4
PREPROCESS_FILE = "preprocess.json"


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def clip_shape(model: onnx.ModelProto, params: PreprocessParams) -> tuple[int, int, int, int]:
    """(frames, channels, height, width) the network takes; ExportError when its signature is not
    a clip of preprocessed crops in, affect × level out."""
    inputs = {i.name: i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}}
    outputs = {o.name: o for o in model.graph.output}
    if params.input_name not in inputs or params.output_name not in outputs:
        raise ExportError(
            f"the network's input/output are {sorted(inputs)} / {sorted(outputs)}; preprocess.json "
            f"names {params.input_name!r} / {params.output_name!r}"
        )
    dims = _dims(inputs[params.input_name])
    if len(dims) != 5 or None in dims[1:]:
        raise ExportError(
            f"input {params.input_name!r} has shape {dims}; expected [batch, frames, channels, "
            "height, width] with fixed frames, channels and size"
        )
    frames, channels, height, width = dims[1:]
    want = (params.channels, *params.input_size) if params.layout == "NCHW" else None
    if want is None or (channels, height, width) != want:
        raise ExportError(
            f"input {params.input_name!r} takes frames of {[channels, height, width]}, but "
            f"preprocess.json makes {params.layout} crops of {[params.channels, *params.input_size]}"
        )
    out = _dims(outputs[params.output_name])
    if len(out) != 3 or out[1:] != [len(AFFECTS), LEVELS]:
        raise ExportError(
            f"output {params.output_name!r} has shape {out}; expected [batch, {len(AFFECTS)}, "
            f"{LEVELS}] (affect × level)"
        )
    return frames, channels, height, width  # type: ignore[return-value]


def check_probabilities(
    model: onnx.ModelProto, params: PreprocessParams, shape: tuple[int, ...], seed: int = 0
) -> None:
    """The network answers probabilities over the levels (non-negative, summing to 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    clips = np.random.default_rng(seed).standard_normal((2, *shape)).astype(np.float32)
    out = session.run([params.output_name], {params.input_name: clips})[0]
    if out.shape != (2, len(AFFECTS), LEVELS):
        raise ExportError(f"for 2 clips the network answered shape {list(out.shape)}")
    if not (np.all(out >= -1e-6) and np.allclose(out.sum(axis=-1), 1.0, atol=1e-4)):
        raise ExportError(
            "the network's outputs are not probabilities over the levels (negative, or not "
            "summing to 1): export it with its softmax over the last axis"
        )


def export_temporal(
    model_path: Path,
    params: PreprocessParams,
    name: str,
    repo: Path,
    *,
    version: int | None = None,
    max_batch: int = 8,
    demo: bool = False,
) -> Path:
    try:
        model = onnx.load(str(model_path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{model_path}: not a valid ONNX model: {exc}") from None
    shape = clip_shape(model, params)
    check_probabilities(model, params, shape)
    spec = ModelSpec(
        name=name,
        max_batch_size=max_batch,
        inputs=[Tensor(params.input_name, shape)],
        outputs=[Tensor(params.output_name, (len(AFFECTS), LEVELS))],
        batching=Batching(max_queue_delay_us=2000),
        parameters={"demo": "true"} if demo else {},
    )

    def fill(staging: Path) -> None:
        (staging / "model.onnx").write_bytes(model.SerializeToString())
        (staging / PREPROCESS_FILE).write_text(params.model_dump_json(indent=2) + "\n")

    return versions.write_version(repo, version, spec, fill)
