"""The TransformerLens bridge's module surgery, undone where vlm-lens needs the plain HF modules."""

from __future__ import annotations

import contextlib


def get_module(model, dotted: str):
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def get_attribute(root, dotted: str):
    """``root.a.b.c`` for ``dotted = "a.b.c"`` (a module path, then an attribute)."""
    parent, _, name = dotted.rpartition(".")
    return getattr(get_module(root, parent) if parent else root, name)


def set_attribute(root, dotted: str, value) -> None:
    """``root.a.b.c = value`` for ``dotted = "a.b.c"``."""
    parent, _, name = dotted.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def is_library_hook(hook) -> bool:
    function = getattr(hook, "func", hook)
    return (getattr(function, "__module__", None) or "").split(".")[0] in ("transformers", "transformer_lens")


@contextlib.contextmanager
def unwrapped(root):
    """Within the block every TransformerLens wrapper under ``root`` is swapped for the HF module it wraps; the
    wrappers are put back on exit, also when the block raises."""
    swaps = []
    pending = [root]
    try:
        while pending:
            module = pending.pop()
            for name, child in list(module._modules.items()):
                inner = original(child) if child is not None else None
                if inner is not child:
                    swaps.append((module, name, child))
                    module._modules[name] = inner
                if inner is not None:
                    pending.append(inner)
        yield
    finally:
        for parent, name, wrapper in reversed(swaps):
            parent._modules[name] = wrapper


def original(module):
    """The HF module under a TransformerLens wrapper (calling it fires no hooks)."""
    return getattr(module, "original_component", module)
