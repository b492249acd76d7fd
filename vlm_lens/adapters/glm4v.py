"""GLM-4V (GLM-4.1V-Thinking, GLM-4.5V's dense sibling): ``Glm4vForConditionalGeneration``.

HF module tree::

    Glm4vForConditionalGeneration
    ├── model: Glm4vModel
    │   ├── visual: Glm4vVisionModel
    │   │   ├── patch_embed                         (Conv3d over temporal_patch x patch x patch)
    │   │   ├── post_conv_layernorm, embeddings     (learned position table, bicubically resampled to the grid)
    │   │   ├── blocks[i]                           (RMSNorm, attn.qkv/proj with 2-D axial rotary, gated mlp)
    │   │   ├── post_layernorm, downsample          (Conv2d: 2 x 2 spatial merge -> out_hidden_size = d_model)
    │   │   └── merger                              (proj, LayerNorm, GELU, gated MLP: the projector)
    │   └── language_model: Glm4vTextModel (embed_tokens, layers[i], norm), 3-section mRoPE over part of each head
    └── lm_head

Quirks:
- The decoder layer is a **sandwich**: ``post_self_attn_layernorm`` normalises the attention output and
  ``post_mlp_layernorm`` the MLP output *before* each is added to the residual (``post_attention_layernorm`` is the
  pre-MLP norm, despite its name). ``hook_attn_out`` / ``hook_mlp_out`` therefore read those two norms (``attn_out`` /
  ``mlp_out``), what is actually added, so ``decompose_resid`` sums to the residual; TransformerLens's block does the
  same (its ``ln1_post`` / ``ln2_post``). Attention blocking still works on ``self_attn``.
- ``mm_token_type_ids`` (0 text, 1 image, 2 video) drives the mRoPE positions: the model raises without it when
  ``image_grid_thw`` is given. The processor returns it; it is derived from ``input_ids`` otherwise (image-only: GLM
  marks video frames with the same ``<|image|>`` token, told apart only by the surrounding video markers).
- The model keeps ``model.rope_deltas`` from the last whole-prompt forward and cached generation reads it
  (``position_state``), as Qwen2-VL. An image of ``h x w`` merged tokens advances the text position by ``max(h, w)``.
- The image is ``<|begin_of_image|>`` + ``<|image|>`` x (t*h*w / merge²) + ``<|end_of_image|>``; the markers carry no
  image features (``marker_tokens``). ``image_grid_thw`` accompanies the flattened-patch ``pixel_values``.
- ``Glm4vProcessor`` demands a video processor (torchvision): :func:`image_only_processor_class` drops it, and saved
  folders without a video processor load through it (:func:`load_image_only_processor`). The PIL image processor's
  pixel bounds count the temporal patch too (``t_bar * h * w``, t_bar = 2 for an image).
- TransformerLens 4.3's adapter requires torchvision, which the PIL processor does not need: dropped here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize, without_torchvision
from vlm_lens.adapters.qwen2_vl import (
    derive_mm_token_type_ids,
    extend_with_text_types,
    merged_grids,
    mrope_section,
    qwen_size,
)
from vlm_lens.errors import InputError
from vlm_lens.processors import image_only_loader

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|video|>")  # fmt: skip
IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
GLM_MARKERS = (r"<\|begin_of_image\|>", r"<\|end_of_image\|>", r"<\|begin_of_video\|>", r"<\|end_of_video\|>")
MERGE = 2
TEMPORAL_PATCH = 2
ROTARY_FRACTION = 0.5  # GLM-4.1V rotates half of each head (partial_rotary_factor 0.5), the rest passes through


glm4v_tl_adapter = without_torchvision("glm4v", "Glm4vArchitectureAdapter")


@lru_cache(maxsize=None)
def image_only_processor_class() -> Any:
    """``Glm4vProcessor`` without a video processor (which would need torchvision); built on first use."""
    from transformers import Glm4vProcessor

    class Glm4vImageOnlyProcessor(Glm4vProcessor):
        """``Glm4vProcessor`` without a video processor (which would need torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)  # fmt: skip

    return Glm4vImageOnlyProcessor


load_image_only_processor = image_only_loader(image_only_processor_class)


def glm4v_processor(words: Iterable[str], size: ModelSize):
    """An image-only GLM-4V processor over a word-level vocabulary whose PIL image processor keeps ``image_size``²
    images unresized: ``(image_size / patch_size / 2)²`` language-model tokens (tiny: 32 px / 8 / 2 -> 2 x 2)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    factor = size.patch_size * MERGE
    if size.image_size % factor:
        raise InputError(f"image_size {size.image_size} must be a multiple of patch_size*merge_size = {factor}")
    # smart_resize bounds t_bar * h * w, with t_bar = temporal_patch_size for a still image
    pixels = TEMPORAL_PATCH * size.image_size * size.image_size
    # the GLM-specific options are typed on the processor's kwargs class, not on its __init__
    options: dict[str, Any] = dict(patch_size=size.patch_size, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH)
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, **options)
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template)  # fmt: skip


def random_glm4v(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Glm4vForConditionalGeneration`` of ``size``; token ids read from ``tokenizer``."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}  # fmt: skip
    rotary = int(size.head_dim * ROTARY_FRACTION)
    rope = {"rope_type": "default", "rope_theta": size.rope_theta, "partial_rotary_factor": ROTARY_FRACTION,
            "mrope_section": mrope_section(rotary)}  # fmt: skip
    text = dict(text, rope_parameters=rope)
    vision = dict(depth=size.vision_layers, hidden_size=size.vision_width, out_hidden_size=size.d_model,
                  intermediate_size=size.d_model * 2, num_heads=size.vision_heads, image_size=size.image_size,
                  patch_size=size.patch_size, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})  # fmt: skip
    config = Glm4vConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
    return Glm4vForConditionalGeneration(config)


GLM4V = AdapterSpec(
    family="glm4v",
    hf_classes=("Glm4vForConditionalGeneration",),
    vision_tower="model.visual",
    projector="model.visual.merger",
    attn_out="post_self_attn_layernorm",
    mlp_out="post_mlp_layernorm",
    video_token_keys=("video_token_id",),
    derive_inputs=derive_mm_token_type_ids,
    extend_inputs=extend_with_text_types,
    tl_adapter=glm4v_tl_adapter,
    position_state="model.rope_deltas",
    processor_classes=("Glm4vImageOnlyProcessor", "Glm4vProcessor"),
    load_processor=load_image_only_processor,
    random_model=random_glm4v,
    word_processor=glm4v_processor,
    adapt_size=qwen_size,
    image_grids=merged_grids,
    marker_tokens=GLM_MARKERS,
)
