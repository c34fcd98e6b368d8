"""Tensors out of a PyTorch checkpoint without torch and without running its pickle's code.

A torch checkpoint is a pickle whose tensors point at raw storages. Unpickling it with `pickle`
(or `torch.load` without `weights_only`) runs whatever callables the file names. This reader
allows exactly what a state dict needs and refuses everything else:

- `collections.OrderedDict`, and `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`, replaced
  by a function of ours that only records (storage, offset, size, stride);
- the storage types (`torch.FloatStorage`, …), replaced by inert markers that say the dtype;
- any other global is an error naming it, before anything is built from it.

Both of torch's formats are read: the zip format of torch ≥ 1.6 (`<archive>/data.pkl` and one
file per storage under `<archive>/data/`), and the legacy format before it (magic number, protocol
version and system info pickles, the object pickle, the storage keys, then each storage as a
little-endian int64 element count followed by its bytes). Tensors come back as numpy arrays.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader accepts (or would need code run to load)."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.name]


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise CheckpointError("a tensor whose storage is not a storage record")
    return _TensorRef(
        storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    )


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, storages: dict[str, _Storage], legacy: bool) -> None:
        super().__init__(file)
        self.storages = storages
        self.legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"the checkpoint names {module}.{name}: only tensors and dicts are read, no code is run"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent id {pid!r:.80}")
        if self.legacy:
            storage_type, key, _location, numel, view = pid[1:6]
            if view is not None:
                raise CheckpointError("storage views (legacy checkpoints of torch < 0.4) are not supported")
        else:
            storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r:.80}")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return storage


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        data = obj.storage.data
        if data is None:
            raise CheckpointError(f"storage {obj.storage.key} has no data")
        if obj.size:
            last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True) if n > 0)
            if obj.offset < 0 or any(s < 0 for s in obj.stride) or last >= data.size:
                raise CheckpointError(f"a tensor reaches outside its storage {obj.storage.key}")
        elif obj.offset >= data.size:
            raise CheckpointError(f"a scalar outside its storage {obj.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            data[obj.offset :], shape=obj.size, strides=[s * data.itemsize for s in obj.stride]
        )
        return np.array(view)  # a copy: the storage may be shared
    if isinstance(obj, dict):
        out = obj.__class__()
        for k, v in obj.items():
            out[k] = _materialise(v)
        return out
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def load_checkpoint(content: bytes) -> Any:
    """The checkpoint's object with every tensor as a numpy array (CheckpointError otherwise)."""
    storages: dict[str, _Storage] = {}
    try:
        if zipfile.is_zipfile(io.BytesIO(content)):
            obj = _load_zip(content, storages)
        else:
            obj = _load_legacy(content, storages)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"not a readable torch checkpoint: {exc}") from None
    return _materialise(obj)


def _load_zip(content: bytes, storages: dict[str, _Storage]) -> Any:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        names = zf.namelist()
        (pkl,) = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        prefix = pkl[: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and zf.read(byteorder).strip() != b"little":
            raise CheckpointError("big-endian checkpoints are not supported")
        obj = _Unpickler(io.BytesIO(zf.read(pkl)), storages, legacy=False).load()
        for key, storage in storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            if len(raw) != storage.numel * storage.dtype.itemsize:
                raise CheckpointError(f"storage {key}: {len(raw)} bytes for {storage.numel} elements")
            storage.data = np.frombuffer(raw, storage.dtype)
    return obj


def _load_legacy(content: bytes, storages: dict[str, _Storage]) -> Any:
    f = io.BytesIO(content)

    def plain() -> Any:
        return _Unpickler(f, storages, legacy=True).load()

    if plain() != LEGACY_MAGIC:
        raise CheckpointError("not a torch checkpoint (neither a zip archive nor the legacy magic number)")
    if plain() != LEGACY_PROTOCOL:
        raise CheckpointError("unsupported legacy protocol version")
    info = plain()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise CheckpointError("big-endian checkpoints are not supported")
    obj = plain()
    keys = plain()
    if not isinstance(keys, list):
        raise CheckpointError("the storage key list is missing")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"storage {key} is listed but no tensor uses it")
        numel = int.from_bytes(f.read(8), "little", signed=True)
        if numel != storage.numel:
            raise CheckpointError(f"storage {key}: {numel} elements on disk, {storage.numel} expected")
        raw = f.read(numel * storage.dtype.itemsize)
        if len(raw) != numel * storage.dtype.itemsize:
            raise CheckpointError(f"storage {key} is cut short")
        storage.data = np.frombuffer(raw, storage.dtype)
    return obj
