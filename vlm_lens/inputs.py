"""Inputs of one sample (:class:`VLMInputs`) and how a model prepares them: chat template, image placeholders,
family inputs from the adapter, the token layout, and a warning for words outside the vocabulary."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from vlm_lens.batch import VLMBatch
from vlm_lens.errors import InputError, InputTypeError, NotFoundError
from vlm_lens.layout import TokenLayout


@dataclass
class VLMInputs:
    """Inputs of one sample: the tensors handed to the HF forward and the token layout."""

    model_inputs: dict[str, Tensor]
    layout: TokenLayout
    prompt: str
    n_images: int
    family: str | None = None  # the family and name of the model that prepared them (checked at every forward)
    prepared_by: str | None = None

    @property
    def input_ids(self) -> Int[Tensor, "1 pos"]:
        return self.model_inputs["input_ids"]

    def __repr__(self) -> str:
        layout = self.layout
        return (f"VLMInputs({layout.n_positions} positions: {int(layout.image.sum())} image, {int(layout.text.sum())} "
                f"text, {int(layout.generated.sum())} generated; {self.n_images} image(s); prompt={self.prompt[-60:]!r})")


def run_processor(processor, image_list: list, texts: list[str], named: Any = None, **kwargs):
    """``processor(images=..., text=...)``, with the processor's refusal of an image (e.g. Qwen's "absolute aspect
    ratio must be smaller than 200") raised as one :class:`InputError` that names the image, its size and the limit."""
    try:
        return processor(images=image_list or None, text=texts, return_tensors="pt", **kwargs)
    except ValueError as error:
        if not image_list:
            raise
        sizes = ", ".join(f"{im.size[0]}x{im.size[1]}" for im in image_list if hasattr(im, "size"))
        where = f"{named} " if isinstance(named, (str, Path)) else ""
        raise InputError(f"the processor refused the image {where}({sizes} px): {error}; resize, crop or pad it to a "
                         "shape the model's processor accepts") from None


def prepare(model, images: Any, prompt: str | Sequence[str]) -> VLMInputs | VLMBatch:
    """Model inputs for ``images`` (PIL images or paths; one, a list, or none) and ``prompt``.

    ``prompt`` is the user's question: the chat template with one image placeholder per image is applied.
    A raw string that already contains the processor's image token is used as it is.

    A list of prompts gives a :class:`~vlm_lens.batch.VLMBatch` (one padded forward, per-sample layouts):
    ``images`` is then one entry per prompt (an image, a list of images, or None), or a single image shared by
    all of them.
    """
    if isinstance(prompt, (list, tuple)):
        return prepare_batch(model, images, list(prompt))
    image_list = load_images(images)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty: pass the question to ask about the image(s), e.g. 'what is this ?'")
    placeholder = getattr(model.processor, "image_token", None)
    if placeholder and placeholder in prompt:
        n_placeholders = prompt.count(placeholder)
        if n_placeholders != len(image_list):
            raise InputError(
                f"the prompt has {n_placeholders} image placeholder(s) {placeholder!r} but {len(image_list)} "
                "image(s) were given: pass one image per placeholder, or pass the bare question and let "
                "prepare() apply the chat template"
            )
        text = prompt
    else:
        if not getattr(model.processor, "chat_template", None):
            raise InputError(
                "this processor has no chat template: pass a pre-templated prompt containing "
                f"{placeholder!r} once per image"
            )
        content = [{"type": "image"} for _ in image_list] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        text = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = run_processor(model.processor, image_list, [text], images)
    model_inputs = {k: v for k, v in encoded.items() if isinstance(v, Tensor)}
    if model.adapter.derive_inputs is not None:
        model_inputs = model.adapter.derive_inputs(model_inputs, model.image_token_id)
    model_inputs = {k: v.to(model.device) for k, v in model_inputs.items()}
    if model_inputs["input_ids"].shape[0] != 1:
        raise InputError("prepare() builds one sample; call it once per sample")
    check_positions(model, model_inputs["input_ids"].shape[1])
    layout = TokenLayout.from_ids(model_inputs["input_ids"][0].cpu(), model.adapter.feature_token_id(model.hf_model.config))
    warn_unknown_words(model, prompt, model_inputs["input_ids"])
    if image_list and not bool(torch.isin(model_inputs["input_ids"].cpu(), torch.tensor(model.placeholder_ids)).any()):
        raise InputError("the processor produced no image tokens; check that the prompt template keeps them")
    cross = model.adapter.cross_layers(model.hf_model.config)
    if cross and not image_list:  # HF skips those layers without image states: nothing would record them
        raise InputError(f"{model.family} reads images through its cross-attention layers {cross}, which it skips "
                         "entirely for a prompt without an image (they record nothing, so the residual stack has "
                         "holes): give every sample an image")  # fmt: skip
    return VLMInputs(model_inputs, layout, text, len(image_list), model.family, model.name)


def position_limit(model) -> int | None:
    """The language model's ``max_position_embeddings`` (None when the config does not say)."""
    config = model.hf_model.config
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_positions(model, n_positions: int, max_new_tokens: int = 0) -> None:
    """Refuse a prompt longer than the position limit; warn when prompt + generation may run past it."""
    limit = position_limit(model)
    if limit is None:
        return
    if n_positions > limit:
        from vlm_lens.errors import PositionLimitError

        raise PositionLimitError(f"the prompt is {n_positions} positions (image tokens included) but {model.name} has "
                                 f"{limit} (max_position_embeddings): shorten the question or use fewer/smaller images")  # fmt: skip
    if max_new_tokens and n_positions + max_new_tokens > limit:
        warnings.warn(f"prompt ({n_positions}) + max_new_tokens ({max_new_tokens}) may run past {model.name}'s "
                      f"{limit} positions, beyond which its outputs are untrained: lower max_new_tokens to "
                      f"{max(1, limit - n_positions)}", stacklevel=3)  # fmt: skip


def unknown_words(model, text: str) -> list[str]:
    """The words of ``text`` the model's tokenizer reads as its unknown token (empty when it knows them all, or has
    no unknown token); ``["?"]`` when some are unknown but a slow tokenizer cannot say which."""
    unk = model.tokenizer.unk_token_id
    if unk is None:
        return []
    try:
        encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[a:b] for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk]
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizers have no offsets
        return ["?"] if unk in model.tokenizer(text, add_special_tokens=False)["input_ids"] else []


def warn_unknown_words(model, prompt: str, input_ids: Tensor) -> None:
    """Warn, naming the words, when part of the prompt becomes the unknown token (the model never saw it)."""
    unk = model.tokenizer.unk_token_id
    if unk is None or not bool((input_ids == unk).any()):
        return
    words = [w for w in unknown_words(model, prompt) if w != "?"]
    warnings.warn(
        f"{model.name}: {', '.join(repr(w) for w in words) or 'part of the prompt'} not in the vocabulary, read as "
        f"{model.tokenizer.unk_token}; rephrase with words the model knows",
        stacklevel=3,
    )


def prepare_batch(model, images: Any, prompts: list[str]) -> VLMBatch:
    if not prompts:
        raise InputError("the prompt list is empty: pass one question per sample")
    per_sample = isinstance(images, (list, tuple)) and len(images) == len(prompts)
    if isinstance(images, (list, tuple)) and not per_sample:
        raise InputError(f"{len(images)} image entries for {len(prompts)} prompts: pass one entry per prompt (an "
                         "image, a list of images, or None), or one image for all")  # fmt: skip
    samples = [prepare(model, images[i] if per_sample else images, p) for i, p in enumerate(prompts)]
    return VLMBatch.pad(samples, model.pad_token_id)


def load_images(images: Any) -> list:
    from PIL import Image, UnidentifiedImageError

    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise InputTypeError(f"images must be PIL images or paths (one, or a list), got {type(images).__name__}")
    loaded = []
    for image in images:
        if isinstance(image, Image.Image):
            loaded.append(image.convert("RGB"))
            continue
        if not isinstance(image, (str, Path)):
            raise InputTypeError(f"images must be PIL images or paths, got {type(image).__name__}")
        path = Path(image)
        if path.is_dir():
            raise InputError(f"{path} is a folder: pass an image file (or a list of files); the CLI's --image takes "
                             "folders")  # fmt: skip
        if not path.is_file():
            raise NotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                loaded.append(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InputError(f"cannot read {path} as an image ({error}); pass a PNG/JPEG file or a PIL image") from error
    return loaded


def extend(model, inputs: VLMInputs, new_ids: Int[Tensor, " step"]) -> VLMInputs:
    """``inputs`` followed by ``new_ids`` (marked ``generated`` in the layout): the family extends its own forward
    inputs (``AdapterSpec.extend_inputs``: Qwen's ``mm_token_type_ids`` grow with text types)."""
    new_ids = new_ids.to(model.device).reshape(1, -1)
    model_inputs = model.adapter.extend_inputs(dict(inputs.model_inputs), new_ids)
    layout = inputs.layout
    if new_ids.shape[1]:
        layout = TokenLayout.from_ids(model_inputs["input_ids"][0].cpu(), model.adapter.feature_token_id(model.hf_model.config),
                                      n_prompt=layout.n_prompt)  # fmt: skip
    return VLMInputs(model_inputs, layout, inputs.prompt, inputs.n_images, inputs.family, inputs.prepared_by)
