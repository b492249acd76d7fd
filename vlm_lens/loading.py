"""Loading a vision-language model as a :class:`~vlm_lens.hooked.HookedVLM`, offline, on either backend."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm_lens.adapters import adapter_for
from vlm_lens.hooked import HookedVLM


def load(
    source: Any,
    *,
    processor: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "transformer_lens",
    remote: bool = False,
) -> HookedVLM:
    """Load a vision-language model as a :class:`HookedVLM`, offline.

    ``source``: an embedded model name (``vlm_lens.zoo.embedded_names()``), a local checkpoint folder with its
    processor files, a model id already in the local HF cache, or an in-memory ``PreTrainedModel`` (then
    ``processor`` is required). Nothing is downloaded; no subprocess is started.

    ``backend``: ``"transformer_lens"`` (default: a TransformerBridge, every TransformerLens hook name) or
    ``"nnsight"`` (:mod:`vlm_lens.nnsight_backend`: the same API through nnsight on the adapter's hook map, the HF
    model left unmodified; ``remote=True`` sends traces to NDIF, see docs/backends.md).
    """
    if backend not in ("transformer_lens", "nnsight"):
        raise ValueError(f"backend must be 'transformer_lens' or 'nnsight', got {backend!r}")
    if remote and backend != "nnsight":
        raise ValueError("remote=True runs on NDIF through nnsight: pass backend='nnsight'")
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{dtype} on CPU is ~250x slower than float32 on these machines: pass dtype=torch.float32 (the "
            "default), or device='cuda' for half precision"
        )
    keepalive = None
    if isinstance(source, (str, Path)):
        from vlm_lens.zoo import embedded_path

        name = str(source)
        folder = embedded_path(name) or (Path(source) if Path(source).is_dir() else None)
        architecture = _architecture_of(folder if folder is not None else name)
        spec = adapter_for(architecture)
        hf_model = _load_hf_model(folder if folder is not None else name, dtype)
        if processor is None:
            from vlm_lens.processors import load_processor

            processor = load_processor(folder if folder is not None else name)
    else:
        from transformers import PreTrainedModel

        if not isinstance(source, PreTrainedModel):
            raise TypeError(
                f"source must be a folder, a cached model id, an embedded name or a PreTrainedModel, "
                f"got {type(source).__name__}"
            )
        if processor is None:
            raise ValueError("an in-memory model needs its processor: load(model, processor=processor)")
        hf_model = source.to(dtype=dtype)
        spec = adapter_for(type(hf_model).__name__)
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(f"processor must be a multimodal processor with a .tokenizer, got {type(processor).__name__}")
    if backend == "nnsight":
        from vlm_lens.nnsight_backend import NNsightVLM

        return NNsightVLM(hf_model.to(device).eval(), processor, spec, name=name, remote=remote)
    if not getattr(tokenizer, "name_or_path", ""):
        # TransformerLens cannot boot on an in-memory tokenizer: give the bridge a copy that comes from a folder. The
        # user's processor stays the one they passed (it need not survive save_pretrained -> from_pretrained).
        from vlm_lens.processors import tokenizer_from_folder

        keepalive = tempfile.TemporaryDirectory(prefix="vlm-lens-tokenizer-")
        tokenizer = tokenizer_from_folder(tokenizer, keepalive.name)
    hf_model = hf_model.to(device).eval()
    from vlm_lens._boot import boot_bridge

    bridge = boot_bridge(hf_model, tokenizer, spec, name, str(device))
    return HookedVLM(hf_model, processor, spec, bridge, name=name, keepalive=keepalive)


def _architecture_of(source: str | Path) -> str:
    if isinstance(source, Path):
        config_path = source / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{source} has no config.json: is it a saved model folder?")
        config = json.loads(config_path.read_text())
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True).to_dict()
        except OSError as error:
            raise FileNotFoundError(
                f"{source!r} is neither an embedded model, a local folder, nor a model in the local HF cache "
                "(nothing is downloaded); pass a checkpoint folder or one of vlm_lens.zoo.embedded_names()"
            ) from error
    architectures = config.get("architectures") or [""]
    return architectures[0]


def _load_hf_model(source: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=dtype)
    model.config.architectures = [type(model).__name__]
    return model
