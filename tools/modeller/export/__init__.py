"""The modeller's exporters: trained artefacts -> the Triton-layout model repository.

    tessera-export timm --arch resnet18 --checkpoint ckpt.pt --num-classes 7 \\
        --name emotion_rn18 --repo model_repository
    tessera-export sentence-transformers --checkpoint DIR --name text_embedder \\
        --repo model_repository [--embedder-name sentence-transformers/all-MiniLM-L6-v2]

torch and timm are imported here only (the ``export`` extra); nothing in the serving path imports
this package. The package itself stays import-light: the torch-heavy module loads on first use.
"""

from __future__ import annotations

from typing import Any

_TIMM = ("export_cache_key", "export_timm")
_SENTENCE_TRANSFORMERS = ("export_sentence_transformer",)
__all__ = ["ExportError", "export_cache_key", "export_sentence_transformer", "export_timm"]


def __getattr__(name: str) -> Any:
    # Lazy, so `tessera-export --help` answers before torch (several seconds) loads.
    if name == "ExportError":
        from tools.modeller.export.versions import ExportError

        return ExportError
    if name in _TIMM:
        from tools.modeller.export import timm_export

        return getattr(timm_export, name)
    if name in _SENTENCE_TRANSFORMERS:
        from tools.modeller.export import st_export

        return getattr(st_export, name)
    raise AttributeError(name)
