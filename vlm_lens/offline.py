"""The offline guard: every hub, config, processor and weight resolution runs inside :func:`offline`.

Inside the block ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set both in the environment and in the
already-imported ``huggingface_hub`` constants (which read the environment once, at import), so no library can open a
socket: no download, no agent detection, no telemetry. Model ids that are not folders are looked up in the local HF
cache directly (:func:`cached_config`), never resolved against the hub. Everything is restored on exit.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "DO_NOT_TRACK": "1"}  # fmt: skip


@contextlib.contextmanager
def offline() -> Iterator[None]:
    saved_env = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    patched = []
    try:
        import huggingface_hub.constants as hub_constants

        for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            if hasattr(hub_constants, name):
                patched.append((hub_constants, name, getattr(hub_constants, name)))
                setattr(hub_constants, name, True)
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        pass
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cached_config(model_id: str) -> Path | None:
    """The ``config.json`` of ``model_id`` in the local HF cache, or None: a file lookup, no network."""
    if not model_id or model_id.count("/") > 1 or model_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        with offline():
            found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None
