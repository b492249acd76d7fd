"""LLaVA-OneVision: ``LlavaOnevisionForConditionalGeneration`` (llava-hf checkpoints, transformers >= 5).

HF module tree::

    LlavaOnevisionForConditionalGeneration
    ├── model: LlavaOnevisionModel
    │   ├── vision_tower: SiglipVisionModel        (no CLS: vision_feature_select_strategy="full")
    │   ├── multi_modal_projector: LlavaOnevisionMultiModalProjector   (linear_1, act, linear_2)
    │   ├── image_newline: Parameter [d_model]
    │   └── language_model: Qwen2Model (embed_tokens, layers[i], norm; q/k/v biases)
    └── lm_head

Quirks:
- Anyres tiling as LLaVA-NeXT (llava_next.py: thumbnail, then rows of tile patches each ending in the learned
  newline; same fine roles and two grids per image, from the same helpers). OneVision adds ``anyres_max_N``
  (``vision_aspect_ratio``): a tile grid over N tiles' worth of features is downscaled (bilinear) first.
- A sample with several images is not tiled: each image (padded to a square) is one view of ``side²`` features and
  one newline: roles ``patch k`` x side², ``newline k``; grids ``(side, side)`` then ``(1, 1)``. The processor returns
  ``batch_num_images`` (images per sample), which the forward reads to know; batched samples concatenate it.
- The tiny model: as LLaVA-NeXT's (32 px image, 16 px tiles, patch 8: 4 + 4 x 5 = 24 image tokens; 2 x 2 tiles are
  below anyres_max_9, so no downscale).
- ``LlavaOnevisionProcessor`` demands a video processor, which needs torchvision: :func:`image_only_processor_class`
  drops it (its ``__init__`` names the processor's settings so ``save_pretrained`` keeps them); saved folders without
  a video processor load through it (:func:`load_image_only_processor`).
- TransformerLens 4.3 ships the bridge adapter (LLaVA's module map with a SigLIP tower).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.adapters.llava import SPECIAL_TOKENS as LLAVA_TOKENS
from vlm_lens.adapters.llava_next import (
    IMAGE_PLACEHOLDER,
    anyres_grids,
    anyres_parts,
    anyres_size,
    pinpoints,
    tile_size,
)
from vlm_lens.processors import image_only_loader

VIDEO_PLACEHOLDER = "<video>"
SPECIAL_TOKENS = (*LLAVA_TOKENS, VIDEO_PLACEHOLDER)
ASPECT = "anyres_max_9"


@lru_cache(maxsize=None)
def image_only_processor_class() -> Any:
    """``LlavaOnevisionProcessor`` without a video processor (which would need torchvision); built on first use."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        """``LlavaOnevisionProcessor`` without a video processor (which would need torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token=IMAGE_PLACEHOLDER,
                     video_token=VIDEO_PLACEHOLDER, vision_aspect_ratio=ASPECT, **kwargs):  # fmt: skip
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             num_image_tokens=num_image_tokens,
                             vision_feature_select_strategy=vision_feature_select_strategy,
                             chat_template=chat_template, image_token=image_token, video_token=video_token,
                             vision_aspect_ratio=vision_aspect_ratio, **kwargs)  # fmt: skip

    return LlavaOnevisionImageOnlyProcessor


load_image_only_processor = image_only_loader(image_only_processor_class)


def random_llava_onevision(tokenizer, size: ModelSize, text: dict):
    """An untrained ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower over one tile and a Qwen2 text model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})
    vision = SiglipVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_width * 4,
                                num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                                image_size=tile_size(size), patch_size=size.patch_size, vision_use_head=False)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER),
        image_grid_pinpoints=pinpoints(size),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
        tie_word_embeddings=size.tie_embeddings,
    )
    return LlavaOnevisionForConditionalGeneration(config)


def llava_onevision_processor(words: Iterable[str], size: ModelSize):
    """An image-only OneVision processor over a word-level vocabulary: tiles and base image of ``tile_size``."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tile = tile_size(size)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                      image_grid_pinpoints=pinpoints(size))  # fmt: skip
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        num_image_tokens=(tile // size.patch_size) ** 2,
                                        vision_feature_select_strategy="full", chat_template=tokenizer.chat_template,
                                        vision_aspect_ratio=ASPECT)  # fmt: skip


ADAPTER = AdapterSpec(
    family="llava-onevision",
    hf_classes=("LlavaOnevisionForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    video_token_keys=("video_token_id",),
    processor_classes=("LlavaOnevisionImageOnlyProcessor", "LlavaOnevisionProcessor"),
    load_processor=load_image_only_processor,
    random_model=random_llava_onevision,
    word_processor=llava_onevision_processor,
    adapt_size=anyres_size,
    image_grids=anyres_grids,
    image_parts=anyres_parts,
)
