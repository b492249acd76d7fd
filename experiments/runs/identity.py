"""Identities that make two runs' numbers comparable: a fingerprint of settings and a model's identity (what a
store records, and what ``--resume`` checks before it continues a run)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys): stable identities for settings and models."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model) -> dict:
    """What makes two runs' numbers comparable: the model's name, shape and a checksum of its weights (every
    parameter, sampled at a stride of numel/4096 and summed in float64: changes with any fine-tune, and allocates a
    few KB, never a copy of a weight matrix)."""
    import torch

    with torch.no_grad():
        checksum = []
        for p in model.hf_model.parameters():
            flat = p.detach().reshape(-1)
            checksum.append(round(float(flat[:: max(1, flat.numel() // 4096)].double().sum()), 6))
    return {"name": model.name, "family": model.family, "n_layers": model.n_layers, "d_model": model.d_model,
            "d_vocab": model.d_vocab, "weights": fingerprint(checksum)}  # fmt: skip


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The paths (``a.b.c``) where two nested dicts differ, each as "value in the store, value now"."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} in the store, {b.get(k)!r} now")
    return out
