"""A local Triton Inference Server for development and tests (see ``tools.devtriton.local``)."""

from __future__ import annotations

from typing import Any

__all__ = ["LocalTriton", "TritonPorts"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package eagerly would make `python -m tools.devtriton.local` run the
    # module twice (runpy warns about it).
    if name in __all__:
        from tools.devtriton import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
