"""Boot a TransformerLens bridge on an HF model with the boot-time hazards neutralised, in one place.

TransformerLens 4.3 hazards (shared docs, environment.md), all handled here:
1. ``load_modality_processor`` tries ``AutoProcessor.from_pretrained`` and, when that fails, runs
   ``pip install torchvision`` in a subprocess. vlm-lens brings its own processor, so the loader is replaced by a
   no-op for the duration of the boot and ``_ensure_torchvision`` can never install anything.
2. The Qwen adapters require torchvision: vlm-lens registers subclasses that do not (adapters/qwen2_vl.py).
3. From-config models lack ``config.architectures``: set from the class name.
4. An in-memory tokenizer breaks the boot: the caller passes one loaded from a folder.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from vlm_lens.adapters import AdapterSpec

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def _never_install() -> bool:
    return False


@contextlib.contextmanager
def _no_processor_loading():
    import transformer_lens.model_bridge.sources.transformers.helpers as helpers
    import transformer_lens.model_bridge.sources.transformers.source as source

    saved = (source.load_modality_processor, helpers.load_modality_processor, helpers._ensure_torchvision)
    source.load_modality_processor = helpers.load_modality_processor = lambda *args, **kwargs: None
    helpers._ensure_torchvision = _never_install
    try:
        yield
    finally:
        source.load_modality_processor, helpers.load_modality_processor, _ = saved
        # _ensure_torchvision stays disabled: nothing in vlm-lens may ever run pip.


def register_adapter(spec: AdapterSpec) -> None:
    """Register ``spec``'s TransformerLens adapter for its HF classes (once per process)."""
    if spec.tl_adapter is None:
        return
    from transformer_lens.factories import architecture_adapter_factory as factory

    for cls in spec.hf_classes:
        if cls not in _REGISTERED:
            adapter: Any = spec.tl_adapter()  # an ArchitectureAdapter subclass
            factory.ArchitectureAdapterFactory.register_adapter(cls, adapter)
            # The boot looks the architecture up in this module-level table before asking the factory.
            factory.SUPPORTED_ARCHITECTURES.setdefault(cls, adapter)
            _REGISTERED.add(cls)


def boot_bridge(hf_model, tokenizer, spec: AdapterSpec, name: str, device: str):
    """A ``TransformerBridge`` over ``hf_model`` (mutated in place: wrapped layers, eager attention)."""
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    with _LOCK, _no_processor_loading():
        register_adapter(spec)
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
