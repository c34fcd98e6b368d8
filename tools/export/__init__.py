"""The modeller's exporters: trained artefacts -> the Triton-layout model repository.

    python -m tools.export timm --arch resnet18 --checkpoint ckpt.pt --num-classes 7 \\
        --name emotion_rn18 --repo model_repository

torch and timm are imported here only (the ``export`` extra); nothing in the serving path imports
this package. The package itself stays import-light: the torch-heavy module loads on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "export_cache_key", "export_timm"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m tools.export --help` answers before torch (several seconds) loads.
    if name in __all__:
        from tools.export import timm_export

        return getattr(timm_export, name)
    raise AttributeError(name)
