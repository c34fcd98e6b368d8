"""Export a timm classifier (checkpoint or seeded random init) into the model repository.

What gets written, per docs/architecture.md ("preprocessing lives with the model"):

    <repo>/<name>/config.pbtxt                  onnxruntime_onnx, dynamic batching, arch parameter
    <repo>/<name>/<version>/model.onnx          input `input` [N,3,H,W] -> output `logits` [N,C]
    <repo>/<name>/<version>/preprocess.json     services.vision.preprocess.PreprocessParams

Nothing is written unless ONNX Runtime reproduces PyTorch's logits on the same input. The
version directory is assembled under a hidden name and renamed into place, so a repository scan
sees a whole version or none of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from torch import nn

from services.fusion.emotion import CLASS_NAMES as CANON
from services.runtime.model_files import IR_VERSION, OPSET, Batching, ModelSpec, Tensor, write_atomic
from services.vision.preprocess import ClaheParams, PreprocessParams, load_params
from tools.modeller.export import versions
from tools.modeller.export.versions import ExportError

log = logging.getLogger(__name__)

# Bump when the exported graph changes for the same inputs, so cached exports are redone.
EXPORTER_VERSION = "1"
# Served logits must match PyTorch's within TOLERANCE × max(1, largest |logit|).
TOLERANCE = 1e-4
CHECK_BATCH = 2
MAX_BATCH_SIZE = 32
TESTED_ARCHS = ("resnet18", "tf_efficientnet_b3", "convnext_tiny", "mobilenetv3_large_100")
# The teachers' research preprocessing: CLAHE on the L channel, clip 2, 8×8 tiles.
DEFAULT_CLAHE = ClaheParams(clip_limit=2.0, tile_grid=(8, 8), space="lab_l")
DEFAULT_CACHE = Path(__file__).resolve().parents[3] / ".cache" / "exports"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Building the PyTorch model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint, loaded without executing code (no pickle of arbitrary objects)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        raise ExportError(
            f"checkpoint {path} holds Python objects that safe loading (weights_only=True) refuses "
            f"to unpickle ({_refused_global(exc)}). Save the weights alone: "
            f"torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise ExportError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(
            f"checkpoint {path} is not a state_dict (a mapping of names to tensors), "
            f"nor a dict with one under 'state_dict' or 'model'"
        )
    # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrap the names.
    out = {}
    for name, tensor in obj.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def _refused_global(exc: Exception) -> str:
    # torch's message is a page of advice, including "load with weights_only=False", which is
    # exactly what must not be done with a file of unknown origin: keep only what was refused.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it contains {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip() if found else type(exc).__name__


def strip_final_softmax(model: nn.Module) -> bool:
    """Replace a trailing nn.Softmax by Identity, so the graph outputs logits; True if it did.

    A trailing LogSoftmax is left alone: log-probabilities differ from logits by a per-row
    constant, which every softmax downstream (temperature, logit fusion) ignores.
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    if not leaves or not isinstance(leaves[-1][1], nn.Softmax):
        return False
    parent_name, _, child = leaves[-1][0].rpartition(".")
    setattr(model.get_submodule(parent_name), child, nn.Identity())
    return True


def build_model(
    arch: str, num_classes: int, checkpoint: Path | None = None, seed: int | None = None
) -> nn.Module:
    """The timm network in eval mode, from a checkpoint or (checkpoint None) a seeded random init."""
    if num_classes < 1:
        raise ExportError(f"num_classes must be positive, got {num_classes}")
    if not timm.is_model(arch):
        raise ExportError(f"timm {timm.__version__} has no architecture {arch!r}")
    if seed is not None:
        torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            # torch's message lists missing/unexpected keys and size mismatches (wrong num_classes).
            raise ExportError(
                f"checkpoint {checkpoint} does not fit {arch} with {num_classes} classes: {exc}"
            ) from None
    if strip_final_softmax(model):
        log.info("%s ends in a softmax: exporting the logits before it", arch)
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state_dict's names and values: identifies a checkpoint's content."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# ONNX export and the parity check


def onnx_export(model: nn.Module, input_size: tuple[int, int]) -> bytes:
    """The ONNX graph (opset 17, dynamic batch) of an eval-mode model, as bytes."""
    dummy = torch.zeros(1, 3, *input_size)
    buffer = io.BytesIO()
    try:
        # The TorchScript exporter handles these CNNs in about a second and needs no onnxscript.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # torch types f as a path; the TorchScript exporter (dynamo=False) also writes to a file object.
            torch.onnx.export(
                model,
                (dummy,),
                buffer,  # type: ignore[arg-type, unused-ignore]
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                do_constant_folding=True,
                dynamo=False,
            )
        data = buffer.getvalue()
    except Exception as legacy_error:
        log.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", legacy_error)
        data = _dynamo_export(model, dummy, legacy_error)
    return _stamp_ir_version(data)


def _dynamo_export(model: nn.Module, dummy: torch.Tensor, legacy_error: Exception) -> bytes:
    try:
        batch = torch.export.Dim("N", min=1, max=1024)
        program = torch.onnx.export(
            model,
            (dummy,),
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
        )
        if program is None:  # only the TorchScript exporter writes a file instead of returning a program
            raise ExportError("the dynamo exporter returned no ONNX program")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            program.save(str(path))
            return path.read_bytes()
    except Exception as exc:
        raise ExportError(
            f"ONNX export failed with both exporters: TorchScript: {legacy_error}; "
            f"dynamo: {type(exc).__name__}: {exc}"
        ) from None


def _stamp_ir_version(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    if model.ir_version > IR_VERSION:
        model.ir_version = IR_VERSION
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError:
            return data  # uses something newer than IR 8: keep the exporter's stamp
        return model.SerializeToString()
    return data


@dataclass(frozen=True)
class Parity:
    """How ONNX Runtime's logits compare with PyTorch's on one random batch."""

    max_abs_diff: float
    largest_logit: float
    tolerance: float

    @property
    def allowed(self) -> float:
        return self.tolerance * max(1.0, self.largest_logit)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed

    def __str__(self) -> str:
        return (
            f"max |onnx - torch| = {self.max_abs_diff:.3g} (allowed {self.allowed:.3g} = "
            f"{self.tolerance:g} × max(1, largest |logit| {self.largest_logit:.3g}))"
        )


def ort_session(data: bytes, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module, data: bytes, input_size: tuple[int, int], batch: int = CHECK_BATCH, seed: int = 0
) -> Parity:
    """Run PyTorch (eval) and ONNX Runtime (CPU) on the same random batch and compare logits."""
    x = np.random.default_rng(seed).standard_normal((batch, 3, *input_size)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    try:
        (got,) = ort_session(data).run(["logits"], {"input": x})
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported graph: {exc}") from None
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    rows = expected.sum(axis=1)
    if expected.min() >= 0 and np.allclose(rows, 1.0, atol=1e-4):
        # A softmax applied inside forward() (not a module we can cut) would be served as logits.
        raise ExportError(
            "the network's outputs are probabilities (rows sum to 1): it applies a "
            "softmax in forward(); export a model that returns logits"
        )
    return Parity(float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected))), TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Cache


def export_cache_key(
    arch: str,
    num_classes: int,
    seed: int | None,
    input_size: tuple[int, int] | int,
    torch_version: str | None = None,
    timm_version: str | None = None,
    weights_sha256: str | None = None,
) -> str:
    """A directory name for one export: same key, same ONNX graph.

    A seeded random init is identified by its seed; a checkpoint by the digest of its weights.
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if seed is None and weights_sha256 is None:
        raise ValueError("an export is cacheable only with a seed or a weights digest")
    fields = {
        "arch": arch,
        "num_classes": num_classes,
        "seed": seed,
        "weights": weights_sha256,
        "input_size": list(input_size),
        "torch": torch_version or torch.__version__,
        "timm": timm_version or timm.__version__,
        "opset": OPSET,
        "exporter": EXPORTER_VERSION,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{arch}-c{num_classes}-{input_size[0]}x{input_size[1]}-{digest}"


def _cached_or_export(
    model: nn.Module, input_size: tuple[int, int], cache_dir: Path | None, key: str | None
) -> bytes:
    if cache_dir is None or key is None:
        return onnx_export(model, input_size)
    cached = cache_dir / key / "model.onnx"
    if cached.is_file():
        return cached.read_bytes()  # still checked against PyTorch below, so a stale file is caught
    return onnx_export(model, input_size)


def _store_in_cache(cache_dir: Path | None, key: str | None, data: bytes, about: dict) -> None:
    if cache_dir is None or key is None or (cache_dir / key / "model.onnx").is_file():
        return
    write_atomic(cache_dir / key / "model.onnx", data)
    write_atomic(cache_dir / key / "key.json", (json.dumps(about, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# The repository files


def preprocess_params(
    model: nn.Module,
    input_size: tuple[int, int],
    clahe: ClaheParams | None,
    temperature: float,
    class_names: Sequence[str],
) -> PreprocessParams:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean") or _IMAGENET_MEAN)
    std = tuple(cfg.get("std") or _IMAGENET_STD)
    return PreprocessParams(
        input_name="input",
        output_name="logits",
        input_size=input_size,
        color="rgb",
        layout="NCHW",
        clahe=clahe,
        interpolation="linear",
        mean=mean,
        std=std,
        temperature=temperature,
        class_names=tuple(class_names),
    )


def model_spec(name: str, arch: str, input_size: tuple[int, int], num_classes: int, source: str) -> ModelSpec:
    """The classifier's config: an RGB crop in, `logits` out, dynamic batching, where it came from."""
    return ModelSpec(
        name=name,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[Tensor("input", (3, *input_size))],
        outputs=[Tensor("logits", (num_classes,))],
        batching=Batching(preferred=(4, 8, 16, 32), max_queue_delay_us=1000),
        parameters={
            "demo": "false",
            "arch": arch,
            "source": source,
            "exporter": f"tools.modeller.export timm={timm.__version__} torch={torch.__version__}",
        },
    )


def write_version(
    repo: Path, version: int | None, data: bytes, params: PreprocessParams, spec: ModelSpec
) -> Path:
    """Put one version into the repository: whole or not at all; returns its directory."""

    def fill(staging: Path) -> None:
        (staging / "model.onnx").write_bytes(data)
        (staging / "preprocess.json").write_text(json.dumps(params.model_dump(mode="json"), indent=2) + "\n")
        load_params(staging / "preprocess.json")  # what the service will read must validate

    return versions.write_version(repo, version, spec, fill)


# ---------------------------------------------------------------------------------------------
# The whole export


def export_timm(
    arch: str,
    checkpoint: Path | None,
    num_classes: int,
    name: str,
    repo: Path,
    version: int | None = None,
    input_size: int | tuple[int, int] | None = 224,
    clahe: ClaheParams | None = DEFAULT_CLAHE,
    temperature: float = 1.0,
    class_names: Sequence[str] | None = None,
    seed: int | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Export a timm classifier into ``<repo>/<name>/<version>/``; returns that directory.

    ``checkpoint`` None builds a random init from ``seed``. ``input_size`` None takes the one of
    timm's pretrained_cfg. ``class_names`` defaults to the canonical emotion order (7 classes).
    With ``cache_dir`` an export with the same key reuses the cached ONNX graph (still checked).
    Raises ExportError, with nothing written, when ONNX Runtime disagrees with PyTorch.
    """
    started = time.perf_counter()
    if class_names is None:
        if num_classes != len(CANON):
            raise ExportError(
                f"num_classes is {num_classes}: give the {num_classes} class names "
                f"(the default is the {len(CANON)} emotion classes)"
            )
        class_names = CANON
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for {num_classes} classes")
    if version is not None and version < 1:
        raise ExportError(f"version must be >= 1, got {version}")

    checkpoint = Path(checkpoint) if checkpoint is not None else None
    model = build_model(arch, num_classes, checkpoint, None if checkpoint else seed)
    if input_size is None:
        # timm models carry their pretrained config as a dict.
        pretrained_cfg = cast("dict[str, Any]", model.pretrained_cfg)
        size = tuple(pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(input_size)
    size = (int(size[0]), int(size[1]))
    try:
        params = preprocess_params(model, size, clahe, temperature, class_names)
    except ValueError as exc:  # pydantic's ValidationError: bad temperature, duplicate names …
        raise ExportError(f"invalid preprocessing parameters: {exc}") from None

    if checkpoint is not None:
        digest = weights_digest(model)
        source, key = f"checkpoint {checkpoint.name} sha256:{digest[:16]}", None
        if cache_dir is not None:
            key = export_cache_key(arch, num_classes, None, size, weights_sha256=digest)
    else:
        source = f"random init seed={seed}"
        key = export_cache_key(arch, num_classes, seed, size) if cache_dir and seed is not None else None

    data = _cached_or_export(model, size, cache_dir, key)
    parity = check_parity(model, data, size)
    if not parity.ok:
        raise ExportError(f"refusing to write {name}: ONNX Runtime disagrees with PyTorch: {parity}")
    _store_in_cache(
        cache_dir,
        key,
        data,
        {"arch": arch, "num_classes": num_classes, "seed": seed, "input_size": list(size), "source": source},
    )

    final = write_version(
        Path(repo), version, data, params, model_spec(name, arch, size, num_classes, source)
    )
    log.info(
        "exported %s (%s) to %s in %.1fs; %s", arch, source, final, time.perf_counter() - started, parity
    )
    return final
