"""Mistral 3 (Mistral-Small-3.1 / 3.2, Ministral 3): ``Mistral3ForConditionalGeneration``, Pixtral vision tower.

HF module tree::

    Mistral3ForConditionalGeneration
    ├── model: Mistral3Model
    │   ├── vision_tower: PixtralVisionModel        (patch_conv, ln_pre, transformer.layers[i], 2D rotary)
    │   ├── multi_modal_projector: Mistral3MultiModalProjector
    │   │   ├── norm                                (RMSNorm over vision features)
    │   │   ├── patch_merger                        (spatial_merge_size² patches -> one, learned merging_layer)
    │   │   └── linear_1, act, linear_2             (-> d_model)
    │   └── language_model: MistralModel           (embed_tokens, layers[i], norm; Ministral3Model in Ministral 3)
    └── lm_head

Quirks:
- The forward needs ``image_sizes`` (height, width in pixels after resizing, one row per image): the vision tower
  crops each padded image to it and the patch merger reshapes each image's patches into its own grid. The processor
  returns it; it is per image, not per position (concatenated in batches).
- The processor writes one ``[IMG]`` per *merged* patch (``patch_size * spatial_merge_size`` pixels), row by row,
  with ``[IMG_BREAK]`` after each row and ``[IMG_END]`` instead of the last row's break. Breaks and end are text tokens
  (their own embeddings, no image features): ``marker_tokens``. An image's ``[IMG]`` tokens are therefore not one
  contiguous run, so :func:`pixtral_parts` assigns them to images by count (rows x cols from ``image_sizes``), and
  :func:`pixtral_grids` gives the patch lens rows x cols with no break column (breaks are not image tokens).
- The image processor resizes the longest edge to at most ``size["longest_edge"]`` and pads each side up to a
  multiple of ``patch_size * spatial_merge_size``: a square ``image_size`` px image gives
  ``(image_size / patch_size / merge)²`` image tokens.
- ``PixtralProcessor``'s module imports the torchvision image processor at import time (for one helper function), so
  ``transformers.PixtralProcessor`` is a placeholder without torchvision: :func:`pixtral_processor_class` imports the
  real class with that helper taken from the PIL image processor module, and saved ``PixtralProcessor`` folders load
  through it (:func:`load_pixtral_processor`).
- TransformerLens 4.3 ships the bridge adapter (the LLaVA one with the Pixtral tower delegated opaquely).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.errors import InputError

IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END)
SPATIAL_MERGE = 2  # every released Mistral 3 checkpoint merges 2 x 2 patches


@lru_cache(maxsize=None)
def pixtral_processor_class() -> Any:
    """The real ``PixtralProcessor`` class, importable without torchvision.

    Its module imports ``get_resize_output_image_size`` from the torchvision image processor module at import time;
    the PIL module defines the same function. That module name is bound to a stand-in holding the PIL function only
    while ``processing_pixtral`` imports, then restored, so nothing else sees the stand-in."""
    import importlib
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        return PixtralProcessor
    from transformers.models.pixtral import image_processing_pil_pixtral

    name = "transformers.models.pixtral.image_processing_pixtral"
    stand_in = types.ModuleType(name)
    stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size  # type: ignore[attr-defined]
    saved = sys.modules.get(name)
    sys.modules[name] = stand_in
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def load_pixtral_processor(folder: Path, trust_remote_code: bool = False):
    """A saved ``PixtralProcessor`` folder, loaded with the real class (its image processor falls back to PIL)."""
    return pixtral_processor_class().from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)


def pixtral_processor(words: Iterable[str], size: ModelSize):
    """A ``PixtralProcessor`` over a word-level vocabulary whose PIL image processor keeps ``image_size`` px images
    unresized: ``image_size`` must be a multiple of ``patch_size * 2`` (the merge)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    if size.image_size % (size.patch_size * SPATIAL_MERGE):
        raise InputError(f"image_size {size.image_size} must be a multiple of patch_size*merge = "
                         f"{size.patch_size * SPATIAL_MERGE}")  # fmt: skip
    patch = {"height": size.patch_size, "width": size.patch_size}
    image_processor = PixtralImageProcessorPil(size={"longest_edge": size.image_size}, patch_size=patch)
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_TOKEN)
    return pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=size.patch_size,
                                     spatial_merge_size=SPATIAL_MERGE, chat_template=tokenizer.chat_template,
                                     image_token=IMAGE_TOKEN, image_break_token=IMAGE_BREAK,
                                     image_end_token=IMAGE_END)  # fmt: skip


def mistral3_size(size: ModelSize, name: str) -> ModelSize:
    """The Mistral 3 version of a size spec: the 2 x 2 merge keeps LLaVA's token count (tiny: patch 8, 32 px ->
    2 x 2 tokens; medium: 672 px / patch 14 / merge 2 = 24 x 24 = 576 tokens, like LLaVA-1.5)."""
    from dataclasses import replace

    if name == "medium":
        return replace(size, patch_size=14, image_size=672)
    return replace(size, patch_size=size.patch_size // SPATIAL_MERGE)


def random_mistral3(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Mistral3ForConditionalGeneration``: a Pixtral tower of ``size`` and a Mistral text model (what
    ``Mistral3Config`` defaults to), full attention (no sliding window, as Mistral3Config's default text config)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    rope = {"rope_type": "default", "rope_theta": size.rope_theta}
    text = dict(text, head_dim=size.head_dim, sliding_window=None, rope_parameters=rope)
    vision = PixtralVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_width * 2,
                                 num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                                 image_size=size.image_size, patch_size=size.patch_size)  # fmt: skip
    config = Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        spatial_merge_size=SPATIAL_MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=size.tie_embeddings,
    )
    return Mistral3ForConditionalGeneration(config)


def pixtral_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """Each image's ``[IMG]`` grid: its ``image_sizes`` divided by ``patch_size * spatial_merge_size`` (rows x cols;
    the ``[IMG_BREAK]`` / ``[IMG_END]`` ending each row are markers, not image tokens, so no extra column)."""
    if model_inputs is None or "image_sizes" not in model_inputs:
        raise InputError("the image grid of a Mistral 3 input comes from its image_sizes: pass the prepared inputs (or "
                         "a trace, which keeps them)")  # fmt: skip
    step = int(config.vision_config.patch_size) * int(config.spatial_merge_size)
    grids = [(int(h) // step, int(w) // step) for h, w in model_inputs["image_sizes"].tolist()]
    if sum(r * c for r, c in grids) != n_image_tokens:
        raise InputError(f"image_sizes describe {sum(r * c for r, c in grids)} image tokens, the sequence has "
                         f"{n_image_tokens}: prepare the inputs with this model's processor")  # fmt: skip
    return grids


def pixtral_parts(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[str, int]]:
    """Every ``[IMG]`` is a patch; image k owns the next rows x cols of them (its rows are split by breaks)."""
    grids = pixtral_grids(config, model_inputs, n_image_tokens)
    return [("patch", k) for k, (rows, cols) in enumerate(grids) for _ in range(rows * cols)]


ADAPTER = AdapterSpec(
    family="mistral3",
    hf_classes=("Mistral3ForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    processor_classes=("PixtralProcessor",),
    load_processor=load_pixtral_processor,
    random_model=random_mistral3,
    word_processor=pixtral_processor,
    adapt_size=mistral3_size,
    image_grids=pixtral_grids,
    marker_tokens=(r"\[IMG_BREAK\]", r"\[IMG_END\]"),
    image_parts=pixtral_parts,
)
