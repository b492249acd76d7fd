"""Qwen3-VL: ``Qwen3VLForConditionalGeneration``.

HF module tree::

    Qwen3VLForConditionalGeneration
    ├── model: Qwen3VLModel
    │   ├── visual: vision transformer
    │   │   ├── patch_embed, pos_embed (learned, interpolated)
    │   │   ├── blocks[i]
    │   │   ├── merger                              (2 x 2 spatial merge -> d_model)
    │   │   └── deepstack_merger_list[k]            (features of vision blocks deepstack_visual_indexes[k])
    │   └── language_model: Qwen3 decoder (embed_tokens, layers[i], norm), interleaved 3-section mRoPE
    └── lm_head

Quirks:
- **DeepStack**: after decoder layer k (k < len(deepstack_visual_indexes)) the k-th deepstack visual features are
  *added* to the residual at the image positions. So the output of layer k is not the input of layer k+1, and HF's
  ``hidden_states[k+1]`` is the output before that addition. The residual stack therefore reads every layer's
  *input* (``blocks.{l}.hook_resid_pre``; ``resid_read="input"``): stack index l is what decoder layer l reads.
  Patching ``resid_post`` of an early layer does not reach the next layer's input at image positions; patch
  ``resid_pre``.
- ``mm_token_type_ids``, ``image_grid_thw`` and ``model.rope_deltas`` (``position_state``) as for Qwen2.5-VL (derived from ``input_ids`` when missing).
- TransformerLens 4.3 has an adapter; it declares a ``torchvision`` requirement that the PIL image processors do not
  need, dropped here.
"""

from __future__ import annotations

from vlm_lens.adapters.base import AdapterSpec, ModelSize, without_torchvision
from vlm_lens.adapters.qwen2_vl import (
    QWEN_MARKERS,
    derive_mm_token_type_ids,
    extend_with_text_types,
    merged_grids,
    qwen_processor,
    qwen_size,
    qwen_text,
    qwen_vision,
)

qwen3_vl_tl_adapter = without_torchvision("qwen3_vl", "Qwen3VLArchitectureAdapter")


def random_qwen3_vl(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Qwen3VLForConditionalGeneration`` of ``size``; deepstack features add to decoder layers 0, 1."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text, ids = qwen_text(tokenizer, size, text)
    text["head_dim"] = size.head_dim
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(qwen_vision(size), num_position_embeddings=max(4, (size.image_size // size.patch_size) ** 2),
                  deepstack_visual_indexes=list(range(min(2, size.vision_layers))))  # fmt: skip
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
    return Qwen3VLForConditionalGeneration(config)


QWEN3_VL = AdapterSpec(
    family="qwen3-vl",
    hf_classes=("Qwen3VLForConditionalGeneration",),
    vision_tower="model.visual",
    projector="model.visual.merger",
    video_token_keys=("video_token_id",),
    derive_inputs=derive_mm_token_type_ids,
    extend_inputs=extend_with_text_types,
    tl_adapter=qwen3_vl_tl_adapter,
    resid_read="input",
    position_state="model.rope_deltas",
    random_model=random_qwen3_vl,
    word_processor=qwen_processor,
    adapt_size=qwen_size,
    image_grids=merged_grids,
    marker_tokens=QWEN_MARKERS,
)
