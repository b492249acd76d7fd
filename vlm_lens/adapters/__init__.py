"""Adapter registry: one declarative file per vision-language family.

Adding a family = one new module with an :class:`AdapterSpec` and one line in :data:`ADAPTERS` (plus a test).
"""

from __future__ import annotations

from vlm_lens.adapters.base import AdapterSpec
from vlm_lens.adapters.llava import ADAPTER as LLAVA
from vlm_lens.adapters.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from vlm_lens.adapters.qwen3_vl import QWEN3_VL
from vlm_lens.errors import InputError

ADAPTERS: tuple[AdapterSpec, ...] = (LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL)
_BY_CLASS = {cls: spec for spec in ADAPTERS for cls in spec.hf_classes}


def supported_architectures() -> list[str]:
    """HF class names vlm-lens can hook."""
    return sorted(_BY_CLASS)


def adapter_for(architecture: str) -> AdapterSpec:
    """The adapter for an HF class name, or a ``ValueError`` naming the supported ones."""
    try:
        return _BY_CLASS[architecture]
    except KeyError:
        raise InputError(
            f"unsupported architecture {architecture!r}; vlm-lens supports {', '.join(supported_architectures())}. "
            "A new family needs one adapter file in vlm_lens/adapters/ (see docs/hooks.md)."
        ) from None


__all__ = ["ADAPTERS", "AdapterSpec", "adapter_for", "supported_architectures"]
