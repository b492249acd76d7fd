"""Qwen2-VL and Qwen2.5-VL: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``.

HF module tree (both)::

    Qwen2(_5)VLForConditionalGeneration
    ├── model: Qwen2(_5)VLModel
    │   ├── visual: vision transformer
    │   │   ├── patch_embed                         (Conv3d over temporal_patch x patch x patch)
    │   │   ├── blocks[i]                           (norm1, attn.qkv/proj, norm2, mlp)
    │   │   │     Qwen2-VL: LayerNorm + mlp.fc1/fc2;  Qwen2.5-VL: RMSNorm + gated mlp, window attention
    │   │   └── merger                              (2 x 2 spatial merge -> d_model)
    │   └── language_model: Qwen2 decoder (embed_tokens, layers[i], norm), 3-section mRoPE
    └── lm_head

Quirks:
- ``mm_token_type_ids`` (0 text, 1 image, 2 video) drives the mRoPE position ids. Qwen2-VL raises without it;
  **Qwen2.5-VL silently computes wrong positions and logits**. It is derived from ``input_ids`` when a processor
  does not return it, and always forwarded.
- The model keeps ``model.rope_deltas`` (text positions after the image are offset by it) from the last forward over
  a whole prompt, and cached generation reads it: ``position_state`` names it, so a generation continuing a KV cache
  built earlier restores it.
- ``image_grid_thw`` must accompany ``pixel_values`` (pixel_values are flattened patches, not an image tensor).
- The image is wrapped as ``<|vision_start|><|image_pad|>...<|vision_end|>``; ``<|image_pad|>`` is repeated
  t*h*w / merge² times.
- TransformerLens 4.3 has no Qwen2-VL adapter; :func:`qwen2_vl_tl_adapter` derives one from its Qwen2.5-VL adapter
  (vision MLP ``fc1``/``fc2``). Both drop the ``torchvision`` requirement the upstream adapter declares (the PIL
  image processors need none).
- ``Qwen2VLProcessor`` derives its attributes from its ``__init__`` signature and demands a video processor, which
  needs torchvision: :func:`image_only_processor_class` drops that parameter; saved Qwen2-VL / Qwen2.5-VL processor
  folders without a video processor load through it (:func:`load_image_only_processor`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize, placeholder_types, without_torchvision
from vlm_lens.errors import InputError
from vlm_lens.processors import image_only_loader

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>")  # fmt: skip
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_MARKERS = (r"<\|vision_start\|>", r"<\|vision_end\|>")  # around each image's pads, no image features


# mm_token_type_ids (0 text, 1 image) drives mRoPE: derived from input_ids when missing, zeros for generated tokens
derive_mm_token_type_ids, extend_with_text_types = placeholder_types("mm_token_type_ids")


qwen2_5_vl_tl_adapter = without_torchvision("qwen2_5_vl", "Qwen2_5_VLArchitectureAdapter")


def qwen2_vl_tl_adapter() -> type:
    """A TransformerLens adapter for Qwen2-VL: the Qwen2.5-VL one with the vision MLP as ``fc1``/``fc2``."""
    from transformer_lens.model_bridge.generalized_components import LinearBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.qwen3_5_vision_encoder import (
        Qwen3_5VisionBlockBridge,
        Qwen3_5VisionEncoderBridge,
    )

    base: Any = qwen2_5_vl_tl_adapter()

    class Qwen2VLAdapter(base):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            mlp = GeneralizedComponent(
                name="mlp", submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")}
            )
            self.component_mapping["vision_encoder"] = Qwen3_5VisionEncoderBridge(
                name="model.visual",
                config=self.cfg,
                submodules={
                    "pos_embed": GeneralizedComponent(name="rotary_pos_emb"),
                    "blocks": Qwen3_5VisionBlockBridge(name="blocks", submodules={"mlp": mlp}),
                },
            )

    return Qwen2VLAdapter


@lru_cache(maxsize=None)
def image_only_processor_class() -> Any:
    """``Qwen2VLProcessor`` without a video processor (which would need torchvision); built on first use (importing
    transformers is slow)."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without a video processor (which would need torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)  # fmt: skip

    return Qwen2VLImageOnlyProcessor


load_image_only_processor = image_only_loader(image_only_processor_class)


def qwen_processor(words: Iterable[str], size: ModelSize, *, merge_size: int = 2, temporal_patch_size: int = 2):
    """An image-only Qwen2-VL processor over a word-level vocabulary whose image processor keeps ``image_size``²
    images unresized: ``image_size`` must be a multiple of ``patch_size * merge_size``; the image then yields
    ``(image_size / patch_size / merge_size)²`` language-model tokens. Serves Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    factor = size.patch_size * merge_size
    if size.image_size % factor:
        raise InputError(f"image_size {size.image_size} must be a multiple of patch_size*merge_size = {factor}")
    pixels = size.image_size * size.image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=size.patch_size,
                                               merge_size=merge_size, temporal_patch_size=temporal_patch_size)  # fmt: skip
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template)  # fmt: skip


def qwen_size(size: ModelSize, name: str) -> ModelSize:
    """The Qwen version of a size spec: the 2 x 2 merge keeps LLaVA's token count (tiny: patch halved; medium:
    672 px / patch 14 / merge 2 = 24 x 24 = 576 tokens, like LLaVA-1.5)."""
    from dataclasses import replace

    if name == "medium":
        return replace(size, patch_size=14, image_size=672)
    return replace(size, patch_size=size.patch_size // 2)


def mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies over (temporal, height, width) as Qwen does (sum must match)."""
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def qwen_text(tokenizer, size: ModelSize, text: dict) -> tuple[dict, dict]:
    """The Qwen text settings (mRoPE) and the vision special-token ids, read from the tokenizer."""
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": size.rope_theta, "mrope_section": mrope_section(size.head_dim)}
    return dict(text, rope_parameters=rope), ids


def qwen_vision(size: ModelSize) -> dict:
    """Vision settings shared by the Qwen2.5-VL and Qwen3-VL towers (2 x 2 merge to ``d_model``)."""
    return dict(depth=size.vision_layers, hidden_size=size.vision_width, out_hidden_size=size.d_model,
                intermediate_size=size.vision_width * 2, num_heads=size.vision_heads, patch_size=size.patch_size,
                spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip


def random_qwen2_vl(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Qwen2VLForConditionalGeneration`` of ``size``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text, ids = qwen_text(tokenizer, size, text)
    vision = dict(depth=size.vision_layers, embed_dim=size.vision_width, hidden_size=size.d_model,
                  num_heads=size.vision_heads, mlp_ratio=4, patch_size=size.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
    return Qwen2VLForConditionalGeneration(config)


def random_qwen2_5_vl(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Qwen2_5_VLForConditionalGeneration`` of ``size`` (window attention but in the last block)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, ids = qwen_text(tokenizer, size, text)
    vision = dict(qwen_vision(size), window_size=size.patch_size * 4, fullatt_block_indexes=[size.vision_layers - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
    return Qwen2_5_VLForConditionalGeneration(config)


def merged_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """Each image's token grid: its ``image_grid_thw`` (patches) divided by the spatial merge (one frame per image)."""
    if model_inputs is None or "image_grid_thw" not in model_inputs:
        raise InputError("the image grid of a Qwen-VL input comes from its image_grid_thw: pass the prepared inputs (or a "
                         "trace, which keeps them)")  # fmt: skip
    merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in model_inputs["image_grid_thw"].tolist()]
    if sum(r * c for r, c in grids) != n_image_tokens:
        raise InputError(f"image_grid_thw describes {sum(r * c for r, c in grids)} image tokens, the sequence has "
                         f"{n_image_tokens}: prepare the inputs with this model's processor")  # fmt: skip
    return grids


_COMMON: dict[str, Any] = dict(
    vision_tower="model.visual",
    projector="model.visual.merger",
    video_token_keys=("video_token_id",),
    derive_inputs=derive_mm_token_type_ids,
    extend_inputs=extend_with_text_types,
    processor_classes=("Qwen2VLImageOnlyProcessor", "Qwen2VLProcessor", "Qwen2_5_VLProcessor"),
    load_processor=load_image_only_processor,
    word_processor=qwen_processor,
    adapt_size=qwen_size,
    image_grids=merged_grids,
    position_state="model.rope_deltas",
    marker_tokens=QWEN_MARKERS,
)

QWEN2_VL = AdapterSpec(
    family="qwen2-vl",
    hf_classes=("Qwen2VLForConditionalGeneration",),
    tl_adapter=qwen2_vl_tl_adapter,
    random_model=random_qwen2_vl,
    **_COMMON,
)
QWEN2_5_VL = AdapterSpec(
    family="qwen2.5-vl",
    hf_classes=("Qwen2_5_VLForConditionalGeneration",),
    tl_adapter=qwen2_5_vl_tl_adapter,
    random_model=random_qwen2_5_vl,
    **_COMMON,
)
