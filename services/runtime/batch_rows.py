"""Merging requests into one batch and splitting its outputs back: pure numpy, nothing else.

The in-process batcher (`services.runtime.batching`) and the development Triton's python-backend
model (`tools/devtriton/backend_model.py`, which runs in Triton's isolated stub and can import no
other module of the suite: the overlay copies this file beside it) batch with these same functions.
Keep this module free of imports beyond the standard library and numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Tensors = dict[str, np.ndarray]
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


class BatchOutputError(RuntimeError):
    """The model returned outputs whose rows do not match the rows it was given."""


def signature(inputs: Mapping[str, np.ndarray]) -> Signature:
    """What must agree for requests to be merged: input names, dtypes and trailing shapes."""
    return tuple(sorted((name, a.dtype.str, tuple(a.shape[1:])) for name, a in inputs.items()))


def merge(requests: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """Concatenate requests of one signature along axis 0, in order."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in requests[0]}


def split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[Tensors]:
    """Cut merged outputs back into one dict per request; checks every output has sum(rows) rows."""
    total = sum(rows)
    for name, array in outputs.items():
        got = array.shape[0] if np.ndim(array) else None
        if got != total:
            raise BatchOutputError(f"output '{name}' has {got} rows for {total} input rows")
    if len(rows) == 1:
        return [dict(outputs)]
    bounds = np.cumsum(rows)[:-1]
    parts: list[Tensors] = [{} for _ in rows]
    for name, array in outputs.items():
        for i, piece in enumerate(np.split(array, bounds, axis=0)):
            parts[i][name] = piece
    return parts
