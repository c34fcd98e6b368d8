"""The model repository, in Triton's layout, read by every backend.

    <root>/<model>/config.pbtxt                 ModelConfig in protobuf text format
    <root>/<model>/<version>/model.onnx         (or the platform's default file name)
    <root>/<model>/<version>/preprocess.json    anything else the service needs, beside the model

A model that cannot be served (config missing or unparsable, no model file, an ONNX file that is
corrupt or disagrees with its config) is kept as a broken entry whose error names the file, so one
bad model never stops the others from loading and the reason is visible in the model status.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.errors import NotFound

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
# (path, mtime in ns, size), or (path, None) for a file that cannot be read.
FileStamp = tuple[str, int, int] | tuple[str, None]
ONNX_PLATFORM = "onnxruntime_onnx"

# Triton's default model file names, by platform or backend.
_DEFAULT_FILENAMES: Mapping[str, str] = {
    ONNX_PLATFORM: "model.onnx",
    "onnxruntime": "model.onnx",
    "pytorch_libtorch": "model.pt",
    "tensorrt_plan": "model.plan",
    "tensorflow_savedmodel": "model.savedmodel",
    "tensorflow_graphdef": "model.graphdef",
    "python": "model.py",
}

_NP_DTYPES: Mapping[int, np.dtype] = {
    mc.TYPE_BOOL: np.dtype(np.bool_),
    mc.TYPE_UINT8: np.dtype(np.uint8),
    mc.TYPE_UINT16: np.dtype(np.uint16),
    mc.TYPE_UINT32: np.dtype(np.uint32),
    mc.TYPE_UINT64: np.dtype(np.uint64),
    mc.TYPE_INT8: np.dtype(np.int8),
    mc.TYPE_INT16: np.dtype(np.int16),
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_INT64: np.dtype(np.int64),
    mc.TYPE_FP16: np.dtype(np.float16),
    mc.TYPE_FP32: np.dtype(np.float32),
    mc.TYPE_FP64: np.dtype(np.float64),
    mc.TYPE_STRING: np.dtype(np.object_),
}


def numpy_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of a config ``DataType``; ValueError for types numpy cannot hold (BF16)."""
    try:
        return _NP_DTYPES[data_type]
    except KeyError:
        raise ValueError(f"data type {mc.DataType.Name(data_type)} has no numpy equivalent") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the model file declares it; None in shape = dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def check_signature(
    config: mc.ModelConfig, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> list[str]:
    """How a model's declared tensors disagree with its config (empty when they agree).

    With ``max_batch_size > 0`` the config's dims leave out the batch axis, which the model must
    have and leave dynamic. A config dim of -1 matches anything; a fixed config dim matches the
    same size or a dynamic model dim (the config may be stricter than the model).
    """
    problems: list[str] = []
    batched = config.max_batch_size > 0
    model_inputs = {t.name: t for t in inputs}
    model_outputs = {t.name: t for t in outputs}

    def compare(
        kind: str, declared: Iterable[mc.ModelInput | mc.ModelOutput], actual: Mapping[str, TensorSpec]
    ) -> None:
        for tensor in declared:
            spec = actual.get(tensor.name)
            if spec is None:
                problems.append(
                    f"{kind} '{tensor.name}' is in the config but not in the model "
                    f"(model has {sorted(actual)})"
                )
                continue
            try:
                want = numpy_dtype(tensor.data_type)
            except ValueError as exc:
                problems.append(f"{kind} '{tensor.name}': {exc}")
                continue
            if spec.dtype != want:
                problems.append(
                    f"{kind} '{tensor.name}': config says {mc.DataType.Name(tensor.data_type)}, "
                    f"model has {spec.dtype}"
                )
            if tensor.HasField("reshape"):
                continue  # the model sees the reshaped tensor; Triton checks that, not we
            dims = [-1, *tensor.dims] if batched else list(tensor.dims)
            shape = list(spec.shape)
            mismatch = len(dims) != len(shape) or any(
                d != -1 and s is not None and d != s for d, s in zip(dims, shape, strict=False)
            )
            if batched and shape and shape[0] is not None:
                mismatch = True  # a fixed batch axis cannot take merged batches
            if mismatch:
                shown = ["batch" if batched and i == 0 else d for i, d in enumerate(dims)]
                problems.append(
                    f"{kind} '{tensor.name}': config shape {shown} does not match model "
                    f"shape {[s if s is not None else -1 for s in shape]}"
                )

    compare("input", config.input, model_inputs)
    compare("output", config.output, model_outputs)
    declared_inputs = {t.name for t in config.input}
    extra = sorted(set(model_inputs) - declared_inputs)
    if extra and config.input:
        problems.append(f"model inputs {extra} are missing from the config")
    return problems


def onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs an ONNX file declares, read without running it (no code executes)."""
    import onnx  # only repositories that hold ONNX models pay for the import

    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version == 0 or not model.graph.output:
        # protobuf parses many garbage byte strings as an empty message rather than failing
        raise ValueError("no IR version or no graph outputs")
    initializers = {i.name for i in model.graph.initializer}

    def specs(values: Iterable[onnx.ValueInfoProto]) -> list[TensorSpec]:
        out: list[TensorSpec] = []
        for v in values:
            if v.name in initializers:
                continue  # old exporters list weights as graph inputs
            tt = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            out.append(
                TensorSpec(v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), shape)
            )
        return out

    return specs(model.graph.input), specs(model.graph.output)


@dataclass(frozen=True)
class ModelEntry:
    """One model directory as last scanned. ``error`` is set when it cannot be served."""

    name: str
    path: Path
    config: mc.ModelConfig | None
    versions: Mapping[int, Path] = field(default_factory=dict)
    version: int | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    fingerprint: tuple[object, ...] = ()  # compared for equality only: what changes on an edit

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def kind(self) -> str:
        """The platform (e.g. ``onnxruntime_onnx``) or else the backend name; "" if unknown."""
        if self.config is None:
            return ""
        kind: str = self.config.platform or self.config.backend
        return kind

    @property
    def model_filename(self) -> str | None:
        return None if self.config is None else model_filename(self.config)

    def version_dir(self, version: int | None = None) -> Path:
        """The directory of a version (default: the served one)."""
        v = self.version if version is None else version
        if v is None or v not in self.versions:
            raise NotFound(f"model '{self.name}' has no version {v} in {self.path}")
        return self.versions[v]

    def model_path(self, version: int | None = None) -> Path:
        """The model file of a version (default: the served one)."""
        name = self.model_filename
        if name is None:
            raise NotFound(f"model '{self.name}' has no default model file name")
        return self.version_dir(version) / name

    def file(self, filename: str, version: int | None = None) -> Path:
        """A file stored beside the model (e.g. ``preprocess.json``); it may not exist."""
        return self.version_dir(version) / filename


@dataclass(frozen=True)
class RepositoryChanges:
    """What one rescan found; ``versions`` maps each changed model to (old, new) served version."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    versions: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


# Triton's FIL backend names the model file after the `model_type` parameter ("xgboost" when unset).
FIL_FILENAMES: Mapping[str, str] = {
    "xgboost": "xgboost.model",
    "xgboost_json": "xgboost.json",
    "xgboost_ubj": "xgboost.ubj",
    "lightgbm": "model.txt",
    "treelite_checkpoint": "checkpoint.tl",
}


def model_filename(config: mc.ModelConfig) -> str | None:
    default: str = config.default_model_filename
    if default:
        return default
    if config.backend == "fil":
        model_type = config.parameters["model_type"].string_value if "model_type" in config.parameters else ""
        return FIL_FILENAMES.get(model_type or "xgboost")
    return _DEFAULT_FILENAMES.get(config.platform) or _DEFAULT_FILENAMES.get(config.backend)


def file_stamp(path: Path) -> FileStamp:
    """(path, mtime, size) of a file, or (path, None) when it cannot be read: what changes on an edit."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_mtime_ns, st.st_size)


def _version_dirs(model_dir: Path) -> dict[int, Path]:
    out = {}
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit():
            out[int(child.name)] = child
    return dict(sorted(out.items()))


def _has_model(version_dir: Path, filename: str | None) -> bool:
    if filename is None:  # a kind without a known file name: any content counts
        return any(version_dir.iterdir())
    return (version_dir / filename).exists()


def _policy_versions(config: mc.ModelConfig, usable: Sequence[int]) -> tuple[list[int], str | None]:
    """The versions the policy selects among the usable ones, and why none if it selects none."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in usable]
        if missing:
            return [], f"version_policy asks for versions {missing}"
        return wanted, None
    if which == "all":
        return list(usable), None
    n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions > 0 else 1
    return list(usable)[-n:], None


def load_entry(model_dir: Path) -> ModelEntry:
    """Read one model directory; never raises for a bad model (the entry carries the error)."""
    name = model_dir.name
    config_path = model_dir / CONFIG_FILE
    fingerprint: list[object] = [file_stamp(config_path)]

    def broken(
        error: str, config: mc.ModelConfig | None = None, versions: Mapping[int, Path] | None = None
    ) -> ModelEntry:
        return ModelEntry(
            name,
            model_dir,
            config,
            dict(versions or {}),
            None,
            _parameters(config),
            error,
            tuple(fingerprint),
        )

    if not config_path.is_file():
        return broken(f"{config_path}: missing")
    config = mc.ModelConfig()
    try:
        text_format.Parse(config_path.read_text(), config)
    except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
        return broken(f"{config_path}: cannot parse: {exc}")
    if config.name and config.name != name:
        return broken(f"{config_path}: names model '{config.name}' but its directory is '{name}'", config)
    if not config.name:
        config.name = name

    versions = _version_dirs(model_dir)
    filename = model_filename(config)
    shown = filename or "a model file"
    if not versions:
        return broken(f"{model_dir}: no version directory (expected {model_dir}/1/{shown})", config, versions)
    usable = [v for v, d in versions.items() if _has_model(d, filename)]
    for v in versions:
        if v not in usable:
            # A version being copied in is not yet complete: keep serving an older one.
            log.warning("model %s: %s/%s missing, version %d skipped", name, versions[v], shown, v)
    selected, why = _policy_versions(config, usable)
    if not selected:
        missing = [str(versions[v] / shown) for v in versions if v not in usable]
        detail = f" ({why})" if why else ""
        return broken(f"no model file: {', '.join(missing) or shown} missing{detail}", config, versions)
    version = max(selected)
    model_file = versions[version] / filename if filename else versions[version]
    fingerprint.append((version, file_stamp(model_file)))

    if config.platform == ONNX_PLATFORM or config.backend == "onnxruntime":
        error = _check_onnx(config, model_file)
        if error:
            return broken(error, config, versions)
    return ModelEntry(
        name, model_dir, config, versions, version, _parameters(config), None, tuple(fingerprint)
    )


@functools.lru_cache(maxsize=256)
def _signature_of(stamp: FileStamp) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """onnx_signature, once per file version: services rescan every few seconds, and parsing a
    large encoder each time would cost a core's worth of spikes."""
    return onnx_signature(Path(stamp[0]))


def _check_onnx(config: mc.ModelConfig, path: Path) -> str | None:
    try:
        inputs, outputs = _signature_of(file_stamp(path))
    except Exception as exc:  # any parse failure means a corrupt file
        return f"{path}: not a valid ONNX model: {type(exc).__name__}: {exc}"
    problems = check_signature(config, inputs, outputs)
    if problems:
        return f"{path}: does not match {CONFIG_FILE}: " + "; ".join(problems)
    return None


def _parameters(config: mc.ModelConfig | None) -> dict[str, str]:
    if config is None:
        return {}
    return {key: p.string_value for key, p in config.parameters.items()}


class ModelRepository:
    """A Triton-layout model repository; ``rescan()`` picks up new versions for hot reload.

    Scanning reads and parses files (ONNX models are parsed to check their signature): call it
    from a worker thread in async code.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._entries: dict[str, ModelEntry] = {}
        self.rescan()

    def _scan(self) -> dict[str, ModelEntry]:
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} does not exist")
        entries = {}
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                entry = load_entry(child)
                if entry.error:
                    log.error("model %s is broken: %s", entry.name, entry.error)
                entries[entry.name] = entry
        return entries

    def rescan(self) -> RepositoryChanges:
        """Read the repository again; returns the models added, removed or changed since last time."""
        old, new = self._entries, self._scan()
        added = tuple(n for n in new if n not in old)
        removed = tuple(n for n in old if n not in new)
        changed = tuple(
            n
            for n in new
            if n in old and (new[n].fingerprint != old[n].fingerprint or new[n].error != old[n].error)
        )
        versions = {
            n: (old[n].version if n in old else None, new[n].version if n in new else None)
            for n in (*added, *removed, *changed)
        }
        self._entries = new  # one assignment: readers see the old or the new scan, never a mix
        return RepositoryChanges(added, removed, changed, versions)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        """The entry of a model (possibly broken); NotFound when the repository has no such model."""
        try:
            return self._entries[name]
        except KeyError:
            raise NotFound(f"model '{name}' is not in the model repository {self.root}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries
