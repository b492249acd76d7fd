"""vlm-lens: how knowledge evolves layer by layer inside vision-language models.

``vlm_lens`` is the hooked model (adapters, TransformerLens hook names, token layout, caches, generation traces);
``probes`` and ``experiments`` build on it. Heavy libraries are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.cache import VLMCache
    from vlm_lens.hooked import HookedVLM
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.layout import TokenLayout
    from vlm_lens.loading import load
    from vlm_lens.trace import GenerationTrace

_LAZY = {
    "load": "vlm_lens.loading",
    "HookedVLM": "vlm_lens.hooked",
    "VLMInputs": "vlm_lens.inputs",
    "GenerationTrace": "vlm_lens.trace",
    "VLMCache": "vlm_lens.cache",
    "TokenLayout": "vlm_lens.layout",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm_lens' has no attribute {name!r}")


__all__ = ["GenerationTrace", "HookedVLM", "TokenLayout", "VLMCache", "VLMInputs", "load", "__version__"]
