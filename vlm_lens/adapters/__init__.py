"""Adapter registry: one declarative file per vision-language family, the only place that knows the family.

Adding a family = one new module with an :class:`AdapterSpec` (module paths, inputs, processor quirks, a small random
model) and one line in :data:`ADAPTERS`; every family test picks it up (docs/hooks.md, "Adding a model family").
:func:`register` adds one at run time (a plugin, or a test's throw-away family).
"""

from __future__ import annotations

from vlm_lens.adapters.base import AdapterSpec, HookPoint, ModelSize
from vlm_lens.adapters.gemma3 import ADAPTER as GEMMA3
from vlm_lens.adapters.glm4v import GLM4V
from vlm_lens.adapters.idefics3 import ADAPTER as IDEFICS3
from vlm_lens.adapters.internvl import ADAPTER as INTERNVL
from vlm_lens.adapters.llava import ADAPTER as LLAVA
from vlm_lens.adapters.llava_next import ADAPTER as LLAVA_NEXT
from vlm_lens.adapters.llava_onevision import ADAPTER as LLAVA_ONEVISION
from vlm_lens.adapters.mistral3 import ADAPTER as MISTRAL3
from vlm_lens.adapters.mllama import ADAPTER as MLLAMA
from vlm_lens.adapters.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from vlm_lens.adapters.qwen3_vl import QWEN3_VL
from vlm_lens.adapters.smolvlm import ADAPTER as SMOLVLM
from vlm_lens.errors import InputError

ADAPTERS: tuple[AdapterSpec, ...] = (
    LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, LLAVA_NEXT, LLAVA_ONEVISION, GEMMA3, INTERNVL, IDEFICS3, SMOLVLM, MISTRAL3,
    MLLAMA, GLM4V,
)  # fmt: skip
_REGISTRY: list[AdapterSpec] = list(ADAPTERS)


def register(spec: AdapterSpec) -> AdapterSpec:
    """Add ``spec`` to the registry (replacing a registered family of the same name); returns it."""
    if not isinstance(spec, AdapterSpec):
        raise InputError(f"register() takes an AdapterSpec, got {type(spec).__name__}")
    taken = {cls for other in _REGISTRY if other.family != spec.family for cls in other.hf_classes}
    clash = sorted(taken & set(spec.hf_classes))
    if clash:
        raise InputError(f"{clash} already belong to another family: give the new family its own HF classes")
    _REGISTRY[:] = [s for s in _REGISTRY if s.family != spec.family] + [spec]
    return spec


def registered() -> tuple[AdapterSpec, ...]:
    """Every family vlm-lens knows now: the built-in :data:`ADAPTERS`, then those added with :func:`register`."""
    return tuple(_REGISTRY)


def families(buildable: bool = False) -> list[str]:
    """Family names (``buildable``: only those with a small random model, which the family tests run on)."""
    return [s.family for s in _REGISTRY if not buildable or s.random_model is not None]


def adapter_by_family(family: str) -> AdapterSpec:
    """The adapter of a family name (``"llava"``, ``"qwen2-vl"``, ...)."""
    for spec in _REGISTRY:
        if spec.family == family:
            return spec
    raise InputError(f"unknown family {family!r}; choose one of {', '.join(families())}")


def supported_architectures() -> list[str]:
    """HF class names vlm-lens can hook."""
    return sorted(cls for spec in _REGISTRY for cls in spec.hf_classes)


def adapter_for(architecture: str) -> AdapterSpec:
    """The adapter for an HF class name, or an error naming the supported ones and how to add a family."""
    for spec in _REGISTRY:
        if architecture in spec.hf_classes:
            return spec
    raise InputError(
        f"unsupported architecture {architecture!r}; vlm-lens supports {', '.join(supported_architectures())}. "
        "A new family is one adapter file in vlm_lens/adapters/ (docs/hooks.md, 'Adding a model family')."
    )


def adapter_for_processor(processor_class: str | None) -> AdapterSpec | None:
    """The adapter whose processor quirks cover a saved ``processor_class`` (None: load it the generic way)."""
    for spec in _REGISTRY:
        if processor_class in spec.processor_classes and spec.load_processor is not None:
            return spec
    return None


__all__ = ["ADAPTERS", "AdapterSpec", "HookPoint", "ModelSize", "adapter_by_family", "adapter_for",
           "adapter_for_processor", "families", "register", "registered", "supported_architectures"]  # fmt: skip
