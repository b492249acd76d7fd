"""Loading a vision-language model as a :class:`~vlm_lens.hooked.HookedVLM`, offline, on either backend."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm_lens.adapters import adapter_for, adapter_for_processor
from vlm_lens.errors import InputError, InputTypeError, NotFoundError
from vlm_lens.hooked import HookedVLM


def load(
    source: Any,
    *,
    processor: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "transformer_lens",
    remote: bool = False,
    trust_remote_code: bool = False,
) -> HookedVLM:
    """Load a vision-language model as a :class:`HookedVLM`, offline.

    ``source``: an embedded model name (``vlm_lens.zoo.embedded_names()``), a local checkpoint folder with its
    processor files, a model id already in the local HF cache, or an in-memory ``PreTrainedModel`` (then
    ``processor`` is required). Nothing is downloaded; no subprocess is started.

    ``backend``: ``"transformer_lens"`` (default: a TransformerBridge, every TransformerLens hook name) or
    ``"nnsight"`` (:mod:`vlm_lens.nnsight_backend`: the same API through nnsight on the adapter's hook map, the HF
    model left unmodified; ``remote=True`` sends traces to NDIF, see docs/backends.md).

    Every resolution runs offline (:mod:`vlm_lens.offline`: no socket is opened). A checkpoint that ships its own
    Python code (``auto_map``) is refused unless ``trust_remote_code=True`` is passed: vlm-lens never asks and never
    runs it otherwise. ``dtype`` may be a torch dtype or its name (``"float32"``, ``"bfloat16"``).
    """
    dtype = _dtype(dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r} but CUDA is not available on this machine: pass device='cpu'")
    if backend not in ("transformer_lens", "nnsight"):
        raise InputError(f"backend must be 'transformer_lens' or 'nnsight', got {backend!r}")
    if remote and backend != "nnsight":
        raise InputError("remote=True runs on NDIF through nnsight: pass backend='nnsight'")
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        raise InputError(
            f"{dtype} on CPU is ~250x slower than float32 on these machines: pass dtype=torch.float32 (the "
            "default), or device='cuda' for half precision"
        )
    keepalive, folder = None, None
    if isinstance(source, (str, Path)):
        from vlm_lens.offline import offline
        from vlm_lens.zoo import embedded_path

        name = str(source)
        folder = embedded_path(name) or (Path(source) if Path(source).is_dir() else None)
        if folder is None:
            folder = _cached_folder(name)  # a hub id only if it is in the local cache; never resolved online
        _check_remote_code(folder, trust_remote_code)
        architecture = _architecture_of(folder)
        spec = adapter_for(architecture)
        with offline():
            hf_model = _load_hf_model(folder, dtype, trust_remote_code)
            if type(hf_model).__name__ != architecture:  # e.g. a plugin family's own class saved under a known model_type
                raise InputError(f"{folder}/config.json names {architecture}, but transformers builds "
                                 f"{type(hf_model).__name__} from it (its weights would not all fit): build the "
                                 f"{architecture} model yourself and pass it, vlm_lens.load(model, processor=...)")  # fmt: skip
            if processor is None:
                processor = load_processor(folder, trust_remote_code=trust_remote_code)
    else:
        from transformers import PreTrainedModel

        if not isinstance(source, PreTrainedModel):
            raise InputTypeError(
                f"source must be a folder, a cached model id, an embedded name or a PreTrainedModel, "
                f"got {type(source).__name__}"
            )
        if processor is None:
            raise InputError("an in-memory model needs its processor: load(model, processor=processor)")
        hf_model = source.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' own annotation of .to
        spec = adapter_for(type(hf_model).__name__)
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise InputTypeError(f"processor must be a multimodal processor with a .tokenizer, got {type(processor).__name__}")
    _check_pair(hf_model, processor, spec)
    if backend == "nnsight":
        from vlm_lens.nnsight_backend import NNsightVLM

        return with_fixture_block(NNsightVLM(hf_model.to(device).eval(), processor, spec, name=name, remote=remote), folder)
    if not getattr(tokenizer, "name_or_path", ""):
        # TransformerLens cannot boot on an in-memory tokenizer: give the bridge a copy that comes from a folder. The
        # user's processor stays the one they passed (it need not survive save_pretrained -> from_pretrained).
        from vlm_lens.processors import tokenizer_from_folder

        keepalive = tempfile.TemporaryDirectory(prefix="vlm-lens-tokenizer-")
        tokenizer = tokenizer_from_folder(tokenizer, keepalive.name)
    hf_model = hf_model.to(device).eval()
    from vlm_lens.bridge_boot import boot_bridge

    bridge = boot_bridge(hf_model, tokenizer, spec, name, str(device))
    return with_fixture_block(HookedVLM(hf_model, processor, spec, bridge, name=name, keepalive=keepalive), folder)


def with_fixture_block(model: HookedVLM, folder: Path | None) -> HookedVLM:
    """Attach the permanent attention block a fixture folder declares in ``attention_block.json`` (the late-image
    fixtures of :mod:`vlm_lens.zoo.recipe.gate`: part of the model, as its weights are); ``model.fixture_block`` is
    that :class:`~vlm_lens.attention_block.AttentionBlock`, or None."""
    import json

    from vlm_lens.attention_block import AttentionBlock

    model.fixture_block = None
    path = None if folder is None else Path(folder) / "attention_block.json"
    if path is not None and path.exists():
        model.fixture_block = AttentionBlock.from_config(model.hf_model, model.adapter, json.loads(path.read_text()))
    return model


def load_processor(folder: str | Path, *, trust_remote_code: bool = False):
    """Load a saved processor offline: through its family's quirk when the folder names a processor class an adapter
    handles (:attr:`~vlm_lens.adapters.AdapterSpec.load_processor`), else with ``AutoProcessor``."""
    from vlm_lens.processors import load_auto_processor, saved_processor_class

    folder = Path(folder)
    spec = adapter_for_processor(saved_processor_class(folder))
    if spec is not None and spec.load_processor is not None:
        processor = spec.load_processor(folder, trust_remote_code)
        if processor is not None:
            return processor
    return load_auto_processor(folder, trust_remote_code=trust_remote_code)


def save_and_reload(processor, folder: str | Path):
    """Save ``processor`` to ``folder`` and load it back from there (its tokenizer then has a ``name_or_path``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    return load_processor(folder)


def _check_pair(hf_model, processor, spec) -> None:
    """Refuse a processor from another checkpoint now, not at the first forward (a wrong image token id or a
    tokenizer larger than the model's vocabulary fail later with unrelated errors)."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", None)
    if image_token is not None:
        found = tokenizer.convert_tokens_to_ids(image_token)
        expected = spec.image_token_id(hf_model.config)
        # A processor whose placeholder text is not the image token (Gemma 3's <start_of_image> expands to soft
        # tokens) names the id of its image features in ``image_token_ids`` (transformers' ProcessorMixin).
        marked = [i for i in getattr(processor, "image_token_ids", None) or [] if i is not None]
        if found != expected and expected not in marked:
            raise InputError(f"the processor's image token {image_token!r} is id {found} but the model expects id "
                             f"{expected}: the processor belongs to another checkpoint; pass the processor saved with "
                             "this model")  # fmt: skip
    embeddings = hf_model.get_output_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary {embeddings.weight.shape[0]}: "
                         "the processor belongs to another checkpoint; pass the processor saved with this model")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    chosen = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(chosen, torch.dtype):
        raise InputError(f"dtype {dtype!r} is not a torch dtype: pass torch.float32 (or 'float32', 'bfloat16' on a GPU)")
    return chosen


def _cached_folder(name: str) -> Path:
    """The snapshot folder of a hub id in the local HF cache, or a :class:`NotFoundError` with suggestions."""
    from vlm_lens.offline import cached_config

    config = cached_config(name)
    if config is not None:
        return config.parent
    import difflib

    from vlm_lens import zoo

    close = difflib.get_close_matches(name, list(zoo.EMBEDDED), n=2)
    raise NotFoundError(
        f"{name!r} is neither an embedded model ({', '.join(zoo.EMBEDDED)}), a local folder, nor a model in the local "
        "HF cache (nothing is downloaded)" + (f"; did you mean {' or '.join(close)}?" if close else
                                             "; pass a checkpoint folder or one of vlm_lens.zoo.embedded_names()"))  # fmt: skip


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except (OSError, ValueError) as error:
        raise InputError(f"{config_path} is not valid JSON ({error}); restore the checkpoint's config.json") from None
    custom = bool(config.get("auto_map")) or any(folder.glob("*.py"))
    if custom and not trust_remote_code:
        from vlm_lens.errors import RemoteCodeError

        raise RemoteCodeError(f"{folder} ships its own Python code (auto_map / *.py), which vlm-lens does not run: use a "
                              "checkpoint of a supported architecture, or pass trust_remote_code=True if you have read "
                              "that code and trust it")  # fmt: skip


def _architecture_of(folder: Path) -> str:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise NotFoundError(f"{folder} has no config.json: is it a saved model folder?")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise InputError(f"{config_path} is not valid JSON ({error}); restore the checkpoint's config.json") from None
    architectures = config.get("architectures") or []
    if not architectures:
        raise InputError(f"{config_path} names no 'architectures'; add e.g. \"architectures\": "
                         "[\"LlavaForConditionalGeneration\"] (the class the checkpoint was saved from)")  # fmt: skip
    return architectures[0]


def _load_hf_model(source: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=dtype,
                                                            trust_remote_code=trust_remote_code)  # fmt: skip
    except Exception as error:  # truncated/zero-byte weights (SafetensorError), missing shards, mismatched shapes...
        if isinstance(error, (InputError, MemoryError)):
            raise
        raise InputError(f"cannot load the weights in {source} ({type(error).__name__}: {str(error)[:300]}); check "
                         "that the checkpoint is complete (re-save or re-copy its *.safetensors)") from error
    model.config.architectures = [type(model).__name__]
    return model
