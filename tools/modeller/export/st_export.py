"""Export a sentence-transformers checkpoint directory as the repository's text-embedding model.

The torch counterpart of `tools.builders.minilm` (which rebuilds all-MiniLM-L6-v2 without torch):
any checkpoint whose modules the graph can reproduce is traced with torch's ONNX exporter, with the
checkpoint's own pooling, Dense/LayerNorm layers and normalisation inside the graph, so the served
output is the sentence embedding itself, as `services.proxylabel.embedder` expects. Written:

    <repo>/<name>/config.pbtxt              onnxruntime_onnx, dynamic batching (minilm's spec)
    <repo>/<name>/<version>/model.onnx      (input_ids, attention_mask) int64 [N, L] -> sentence_embedding
    <repo>/<name>/<version>/tokenizer.json  the tokenizer sentence-transformers runs, truncating at
                                            max_seq_length, unpadded (the service pads to its buckets)
    <repo>/<name>/<version>/embedder.json   services.proxylabel.embedder.EmbedderInfo (+ what it records)

Nothing is written unless the service's own offline code path (`embed_offline`: its tokenisation,
bucket padding and batching, then ONNX Runtime) reproduces `SentenceTransformer.encode` on a few
sentences, one longer than max_seq_length: cosine >= 0.9999 and the same norm, row by row. The
version directory is assembled under a hidden name and renamed into place.

With a cache directory the verified files are kept under a key of the checkpoint's content, the
exporter options and the library versions; a rerun with the same key installs them without
importing torch or re-checking them (about a second instead of ~20 s for MiniLM, byte-identical).

    tessera-export sentence-transformers --checkpoint DIR --name text_embedder --repo model_repository

Over 500 lines on purpose: each supported sentence-transformers module (pooling, Dense, LayerNorm,
Normalize) has its graph and its refusal next to the parity check that proves them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from services.proxylabel.embedder import EMBEDDER_FILE, EmbedderInfo, Tokenization, embed_offline
from services.runtime.model_files import OPSET, ModelSpec, write_atomic
from tools.builders import minilm
from tools.modeller.export import versions
from tools.modeller.export.versions import ExportError

if TYPE_CHECKING:  # torch and sentence-transformers load only when a graph is really exported
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Bump when the written files change for the same checkpoint, so cached exports are redone.
EXPORTER_VERSION = "1"
MIN_COSINE = 0.9999
# |served norm / sentence-transformers norm - 1|: cosine alone would pass a missing normalisation.
NORM_TOLERANCE = 1e-3
CHECK_BATCH = 8
META_FILE = "export.json"
_FILES = ("model.onnx", "tokenizer.json", EMBEDDER_FILE)
# Modules the graph reproduces by running the checkpoint's own module in the trace. Anything else
# (Router/Asym, WordWeights, StaticEmbedding, CNN, LSTM, custom code …) changes what the service
# would have to do around the graph, or cannot be traced: refused.
_SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize", "LayerNorm", "Dropout")
_LIBRARIES = ("torch", "transformers", "sentence-transformers", "tokenizers", "onnxruntime")

_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and trailing whitespace,\ttabs and a newline\n  ",
    "Ünïcödé, accents (café, naïve), CJK 東京は日本の首都です and emoji 🎉😀 on one line.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)  # <code> & symbols",
    "",
    "A",
    "Summarise the arguments for and against a four-day working week, citing two studies.",
)
_LONG_PARAGRAPH = (
    "Woodblock printing was used in China as early as the seventh century, and movable type made "
    "of ceramic was invented by Bi Sheng around 1040. In Europe, Gutenberg combined a screw press, "
    "an oil-based ink and a hand mould for casting type; within fifty years presses operated in more "
    "than two hundred cities, literacy spread and results could be reproduced exactly. "
)


@dataclass(frozen=True)
class Parity:
    """How the service's embeddings compare with SentenceTransformer.encode, row by row."""

    min_cosine: float
    max_norm_error: float
    worst_text: str
    rows: int

    @property
    def ok(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.max_norm_error <= NORM_TOLERANCE

    def __str__(self) -> str:
        return (
            f"min cosine {self.min_cosine:.7f} (needs >= {MIN_COSINE}), max |norm ratio - 1| "
            f"{self.max_norm_error:.2g} (needs <= {NORM_TOLERANCE:g}) over {self.rows} texts; "
            f"worst: {self.worst_text[:60]!r}"
        )


# ---------------------------------------------------------------------------------------------
# The checkpoint before loading it: refuse early, and key the cache


def module_types(checkpoint_dir: Path) -> list[str]:
    """The module classes modules.json lists (ExportError when it is missing or unusable)."""
    path = Path(checkpoint_dir) / "modules.json"
    if not Path(checkpoint_dir).is_dir():
        raise ExportError(f"checkpoint {checkpoint_dir} is not a directory")
    try:
        return [str(m["type"]) for m in json.loads(path.read_text())]
    except FileNotFoundError:
        raise ExportError(
            f"{checkpoint_dir} is not a sentence-transformers checkpoint (no modules.json)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path} cannot be read: {exc}") from None


def check_module_types(types: list[str]) -> None:
    """Refuse, before any code of the checkpoint is loaded, modules the graph cannot reproduce."""
    names = [t.rsplit(".", 1)[-1] if t.startswith("sentence_transformers.") else t for t in types]
    unsupported = [t for t, n in zip(types, names, strict=True) if n not in _SUPPORTED]
    if unsupported:
        raise ExportError(
            f"the checkpoint has module(s) {unsupported} that the exported graph cannot "
            f"reproduce (supported: {', '.join(_SUPPORTED)})"
        )
    if names[:1] != ["Transformer"] or names.count("Transformer") != 1:
        raise ExportError(f"the checkpoint's modules {names} do not start with its one Transformer")
    if "Pooling" not in names:
        raise ExportError(
            f"the checkpoint's modules {names} have no Pooling: they give token embeddings, "
            f"not one sentence embedding"
        )


def checkpoint_digest(checkpoint_dir: Path) -> str:
    """sha256 over every file's relative path and content (hidden files aside): the checkpoint's
    identity, since any of them (tokenizer config, module configs, weights) can change the output."""
    root = Path(checkpoint_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0".encode())
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _version_of(project: str) -> str:
    try:
        return importlib.metadata.version(project)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key(checkpoint_dir: Path, opset: int = OPSET, digest: str | None = None) -> tuple[str, dict]:
    """(directory name, fields) of one export: the same key gives the same, already verified, files.

    Library versions are part of it (read without importing them) because they decide the graph
    and the reference the files were checked against.
    """
    fields = {
        "checkpoint_sha256": digest or checkpoint_digest(checkpoint_dir),
        "opset": opset,
        "exporter": EXPORTER_VERSION,
        **{p: _version_of(p) for p in _LIBRARIES},
    }
    digest16 = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"st-{Path(checkpoint_dir).resolve().name}-{digest16}", fields


# ---------------------------------------------------------------------------------------------
# Loading with sentence-transformers and reading what the service must reproduce


def load_model(checkpoint_dir: Path) -> SentenceTransformer:
    """The checkpoint in float32 on the CPU, from local files only, without remote code."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        # float32 because the service serves FP32: a half-precision config must not round the
        # weights on the way in (transformers 5 loads in the config's dtype by default).
        model = SentenceTransformer(
            str(checkpoint_dir),
            device="cpu",
            local_files_only=True,
            trust_remote_code=False,
            model_kwargs={"dtype": torch.float32},
        )
    except Exception as exc:
        raise ExportError(
            f"sentence-transformers cannot load {checkpoint_dir}: {type(exc).__name__}: {exc}"
        ) from None
    return model.float().eval()


def _transformer(model: SentenceTransformer) -> Transformer:
    """The checkpoint's first module: its one Transformer."""
    from sentence_transformers.base.modules.transformer import Transformer

    transformer = model[0]
    if not isinstance(transformer, Transformer):
        raise ExportError(f"the first module is {type(transformer).__name__}, not a Transformer")
    return transformer


def _tokenizer(transformer: Transformer) -> tuple[PreTrainedTokenizerBase, int]:
    """The Transformer's tokenizer and max_seq_length (check_loaded refuses a checkpoint without them)."""
    tokenizer, max_seq_length = transformer.tokenizer, transformer.max_seq_length
    if tokenizer is None or max_seq_length is None:
        raise ExportError("the checkpoint has no tokenizer or no max_seq_length")
    return tokenizer, max_seq_length


def check_loaded(model: SentenceTransformer) -> None:
    """Refuse what the module list does not show: prompts, chat templates, other tasks."""
    classes = [type(m).__name__ for m in model.children()]
    check_module_types(classes)
    transformer = _transformer(model)
    if transformer.transformer_task != "feature-extraction":
        raise ExportError(
            f"the Transformer's task is {transformer.transformer_task!r}, not feature-extraction"
        )
    if "text" not in transformer.modality_config or "message" in transformer.modality_config:
        raise ExportError(
            f"the Transformer takes {list(transformer.modality_config)}: the service sends "
            f"plain text through the tokenizer, without a chat template"
        )
    tokenizer = transformer.tokenizer
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ExportError("the checkpoint has no fast (HF tokenizers) tokenizer to write as tokenizer.json")
    prompt = model.prompts.get(model.default_prompt_name or "", "")
    if prompt:
        raise ExportError(
            f"the checkpoint prepends the default prompt {prompt!r} to every text; the service has no prompts"
        )
    if not transformer.max_seq_length:
        raise ExportError("the checkpoint has no max_seq_length")


def pooling_mode(model: SentenceTransformer) -> str:
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    pooling = next(m for m in model.children() if isinstance(m, Pooling))
    mode = pooling.pooling_mode
    return mode if isinstance(mode, str) else "+".join(mode)


def normalizes(model: SentenceTransformer) -> bool:
    """Whether the sentence embedding leaves the model L2-normalised (a Normalize last, no truncation)."""
    from sentence_transformers.base.modules.normalize import Normalize

    last = list(model.children())[-1]
    return (
        isinstance(last, Normalize)
        and last.module_output_name == "sentence_embedding"
        and model.truncate_dim is None
    )


def serving_tokenizer(model: SentenceTransformer) -> str:
    """The tokenizer sentence-transformers runs, as tokenizer.json.

    Taken from the loaded fast tokenizer rather than the checkpoint's file: that is what encode()
    uses, including tokenizer_config.json's changes and sentence-transformers' own do_lower_case
    (which it adds to the normaliser). minilm's helper then truncates at max_seq_length and drops
    the file's padding.
    """
    tokenizer, max_seq_length = _tokenizer(_transformer(model))
    raw = tokenizer.backend_tokenizer.to_str()
    return minilm.serving_tokenizer(raw, int(max_seq_length))


def _lowercases(normalizer: dict | None) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Lowercase" or normalizer.get("lowercase"):
        return True
    return any(_lowercases(n) for n in normalizer.get("normalizers") or [])


def _st_token_ids(model: SentenceTransformer, texts: list[str]) -> list[list[int]]:
    """Token ids as sentence-transformers prepares them for encode(), padding removed."""
    features = _transformer(model).preprocess(list(texts))
    ids, mask = features["input_ids"].tolist(), features["attention_mask"].tolist()
    return [
        [t for t, m in zip(row, row_mask, strict=True) if m] for row, row_mask in zip(ids, mask, strict=True)
    ]


def _strips(model: SentenceTransformer, tokenizer_json: str) -> bool:
    """Whether the service must strip texts to tokenise like sentence-transformers.

    Older sentence-transformers stripped every text, current ones do not. For most tokenizers
    (BERT's whitespace split) it makes no difference; then True, as tools.builders.minilm writes.
    """
    probe = "  Surrounding whitespace  "
    tokenizer = Tokenizer.from_str(tokenizer_json)
    (expected,) = _st_token_ids(model, [probe])
    if tokenizer.encode(probe.strip()).ids == expected:
        return True
    if tokenizer.encode(probe).ids == expected:
        return False
    raise ExportError(
        "the tokenizer written for the service does not reproduce sentence-transformers' "
        "tokens, stripped or not"
    )


def embedder_info(
    model: SentenceTransformer, tokenizer_json: str, embedder_name: str, source: str
) -> dict[str, Any]:
    """embedder.json: minilm's fields, filled from the loaded checkpoint."""
    transformer = _transformer(model)
    tokenizer, max_seq_length = _tokenizer(transformer)
    dimension = model.get_embedding_dimension()
    if not dimension:
        raise ExportError("the checkpoint does not say its embedding dimension")
    tokenizer_lowercase = _lowercases(json.loads(tokenizer_json).get("normalizer"))
    checkpoint = minilm.Checkpoint(
        bert={"hidden_size": int(dimension)},
        max_seq_length=int(max_seq_length),
        # Lowercasing that the tokenizer already does must not be repeated by the service.
        do_lower_case=bool(transformer.do_lower_case) and not tokenizer_lowercase,
        pooling=pooling_mode(model),
        normalize=normalizes(model),
        tokenizer_json=tokenizer_json,
    )
    info = minilm.embedder_json(checkpoint, tokenizer_json)
    pad_id = tokenizer.pad_token_id
    info.update(
        name=embedder_name,
        strip=_strips(model, tokenizer_json),
        tokenizer_lowercase=tokenizer_lowercase,
        pad_id=int(pad_id or 0),
        source=source,
    )
    return info


# ---------------------------------------------------------------------------------------------
# The graph


def _encoder(model: SentenceTransformer, width: int | None) -> nn.Module:
    """(input_ids, attention_mask) -> sentence_embedding through the checkpoint's own modules, so
    pooling, Dense, LayerNorm and Normalize are traced exactly as encode() runs them."""
    import torch
    from torch import nn

    class SentenceEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(model.children())

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            for stage in self.stages:
                features = stage(features)
            embedding = features["sentence_embedding"]
            return embedding if width is None else embedding[:, :width]  # encode()'s truncate_dim

    return SentenceEncoder().eval()


def onnx_export(model: SentenceTransformer, opset: int = OPSET) -> bytes:
    """The ONNX graph with dynamic batch and sequence axes, as bytes.

    TorchScript's exporter (dynamo=False): it needs no onnxscript (not installed with the export
    extra) and traces a BERT in seconds. The example batch has a padded row, so the attention mask
    is traced as used (transformers drops an all-ones mask).
    """
    import torch

    features = _transformer(model).preprocess(
        ["A short probe.", "A longer probe sentence, so the first row is padded."]
    )
    args = (features["input_ids"].to(torch.int64), features["attention_mask"].to(torch.int64))
    axes = {n: {0: "N", 1: "L"} for n in minilm.INPUTS} | {minilm.OUTPUT: {0: "N"}}
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about shape-dependent Python branches: the parity check decides.
            warnings.simplefilter("ignore")
            # torch types f as a path; the TorchScript exporter (dynamo=False) also writes to a file object.
            torch.onnx.export(
                _encoder(model, model.truncate_dim),
                args,
                buffer,  # type: ignore[arg-type, unused-ignore]
                opset_version=opset,
                input_names=list(minilm.INPUTS),
                output_names=[minilm.OUTPUT],
                dynamic_axes=axes,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The parity check


def check_texts(max_seq_length: int) -> list[str]:
    """A few varied texts and one well past max_seq_length tokens (so truncation is exercised)."""
    repeats = max_seq_length // 25 + 2  # the paragraph is more than 50 tokens
    return [*_CHECK_TEXTS, " ".join([_LONG_PARAGRAPH] * repeats)]


def check_tokenisation(model: SentenceTransformer, bundle: Path, texts: list[str]) -> None:
    """The service's tokenisation (its Tokenization class on the written files) gives exactly
    sentence-transformers' token ids; a precise message beats a low cosine."""
    info = EmbedderInfo.from_file(bundle / EMBEDDER_FILE)
    served = Tokenization(bundle / info.tokenizer, info).encode(texts)
    for text, got, expected in zip(texts, served, _st_token_ids(model, texts), strict=True):
        if got != expected:
            raise ExportError(
                f"the service would tokenise {text[:60]!r} as {got[:12]}… ({len(got)} "
                f"tokens), sentence-transformers as {expected[:12]}… ({len(expected)})"
            )


def check_parity(model: SentenceTransformer, bundle: Path, texts: list[str]) -> Parity:
    """The service's offline path on the written files vs SentenceTransformer.encode."""
    reference = model.encode(texts, batch_size=CHECK_BATCH, convert_to_numpy=True, show_progress_bar=False)
    try:
        served = embed_offline(bundle, texts, batch_size=CHECK_BATCH)
    except Exception as exc:
        raise ExportError(f"the service cannot run the exported model: {type(exc).__name__}: {exc}") from None
    if served.shape != reference.shape:
        raise ExportError(f"the exported model gives {served.shape}, sentence-transformers {reference.shape}")
    served_norm, reference_norm = np.linalg.norm(served, axis=1), np.linalg.norm(reference, axis=1)
    cosine = (served * reference).sum(axis=1) / np.maximum(served_norm * reference_norm, 1e-12)
    norm_error = np.abs(served_norm / np.maximum(reference_norm, 1e-12) - 1.0)
    worst = int(np.argmin(cosine))
    return Parity(float(cosine.min()), float(norm_error.max()), texts[worst], len(texts))


# ---------------------------------------------------------------------------------------------
# Building the verified files


def build_files(
    checkpoint_dir: Path, out: Path, embedder_name: str, source: str, opset: int = OPSET
) -> dict[str, Any]:
    """Export into ``out`` (model.onnx, tokenizer.json, embedder.json) and verify them; returns the
    metadata to cache. ExportError when the service would not reproduce sentence-transformers."""
    started = time.perf_counter()
    model = load_model(checkpoint_dir)
    check_loaded(model)
    tokenizer_json = serving_tokenizer(model)
    info = embedder_info(model, tokenizer_json, embedder_name, source)
    write_atomic(out / "tokenizer.json", tokenizer_json.encode())
    write_atomic(out / EMBEDDER_FILE, (json.dumps(info, indent=2) + "\n").encode())
    texts = check_texts(info["max_seq_length"])
    check_tokenisation(model, out, texts)

    write_atomic(out / "model.onnx", onnx_export(model, opset))
    log.info("exported %s to ONNX in %.1fs", checkpoint_dir, time.perf_counter() - started)
    parity = check_parity(model, out, texts)
    if not parity.ok:
        raise ExportError(
            f"refusing to write: the service's embeddings differ from sentence-transformers': {parity}"
        )
    libraries = {p: _version_of(p) for p in ("sentence-transformers", "transformers", "torch")}
    return {
        "parity": asdict(parity),
        "exporter": "tools.modeller.export.st_export " + " ".join(f"{p}={v}" for p, v in libraries.items()),
    }


def _from_cache(cache_dir: Path | str | None, key: str) -> tuple[Path, dict] | None:
    entry = None if cache_dir is None else Path(cache_dir) / key
    if entry is None or not all((entry / f).is_file() for f in (*_FILES, META_FILE)):
        return None
    return entry, json.loads((entry / META_FILE).read_text())


def _store(cache_dir: Path | str | None, key: str, built: Path, meta: dict) -> Path:
    """Move verified files into the cache (one rename: a reader sees all of them or none)."""
    if cache_dir is None:
        return built
    write_atomic(built / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    os.chmod(built, 0o755)  # mkdtemp's 0700 would keep the cache from other users
    entry = Path(cache_dir) / key
    try:
        os.rename(built, entry)
    except OSError:  # another export stored the same key first: identical content, use theirs
        if _from_cache(cache_dir, key) is None:
            raise
        return entry
    return entry


# ---------------------------------------------------------------------------------------------
# The repository files


def model_spec(name: str, dimension: int, embedder_name: str, source: str, exporter: str) -> ModelSpec:
    """minilm's config (inputs, output, batching) under ``name``, with this export's parameters."""
    return replace(
        minilm.model_spec(dimension),
        name=name,
        parameters={"embedder": embedder_name, "source": source, "exporter": exporter},
    )


def write_version(repo: Path, version: int | None, files: Path, embedder_name: str, spec: ModelSpec) -> Path:
    """Put one version into the repository, whole or not at all; returns its directory."""

    def fill(staging: Path) -> None:
        shutil.copyfile(files / "model.onnx", staging / "model.onnx")
        shutil.copyfile(files / "tokenizer.json", staging / "tokenizer.json")
        info = json.loads((files / EMBEDDER_FILE).read_text()) | {"name": embedder_name}
        (staging / EMBEDDER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        EmbedderInfo.from_file(staging / EMBEDDER_FILE)  # what the service will read must parse

    return versions.write_version(repo, version, spec, fill)


# ---------------------------------------------------------------------------------------------
# The whole export


def export_sentence_transformer(
    checkpoint_dir: Path | str,
    name: str,
    repo: Path | str,
    *,
    version: int | None = None,
    cache_dir: Path | str | None = None,
    opset: int = OPSET,
    embedder_name: str | None = None,
) -> Path:
    """Export a sentence-transformers checkpoint into ``<repo>/<name>/<version>/``; returns that directory.

    ``version`` None takes one more than the highest existing. ``embedder_name`` is the identity
    the proxylabel models are matched on (default: the checkpoint directory's name). With
    ``cache_dir`` a checkpoint exported before with the same options and libraries is installed
    from the cache, already verified. Raises ExportError, with nothing written to the repository,
    for modules the graph cannot reproduce or when the service's embeddings would differ.
    """
    started = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    if version is not None and version < 1:
        raise ExportError(f"version must be >= 1, got {version}")
    if not name or Path(name).name != name or name.startswith("."):
        raise ExportError(f"model name {name!r} is not a plain directory name")
    check_module_types(module_types(checkpoint_dir))
    digest = checkpoint_digest(checkpoint_dir)
    key, _ = cache_key(checkpoint_dir, opset, digest)
    embedder_name = embedder_name or checkpoint_dir.resolve().name
    source = f"checkpoint {checkpoint_dir.resolve().name} sha256:{digest[:16]}"

    cached = _from_cache(cache_dir, key)
    if cached is not None:
        files, meta = cached
        log.info("%s: verified export found in the cache (%s)", checkpoint_dir, files)
        return _install(repo, name, version, files, embedder_name, source, meta, started)

    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # In the cache directory when there is one, so storing the result is a rename.
    work = Path(tempfile.mkdtemp(prefix=".st-export-", dir=cache_dir))
    try:
        meta = build_files(checkpoint_dir, work, embedder_name, source, opset)
        files = _store(cache_dir, key, work, meta)
        return _install(repo, name, version, files, embedder_name, source, meta, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(
    repo: Path | str,
    name: str,
    version: int | None,
    files: Path,
    embedder_name: str,
    source: str,
    meta: dict,
    started: float,
) -> Path:
    info = json.loads((files / EMBEDDER_FILE).read_text())
    spec = model_spec(name, int(info["dimension"]), embedder_name, source, meta["exporter"])
    final = write_version(Path(repo), version, files, embedder_name, spec)
    log.info(
        "exported %s (%s) to %s in %.1fs; %s",
        embedder_name,
        source,
        final,
        time.perf_counter() - started,
        Parity(**meta["parity"]),
    )
    return final
