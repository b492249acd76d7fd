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
- ``image_grid_thw`` must accompany ``pixel_values`` (pixel_values are flattened patches, not an image tensor).
- The image is wrapped as ``<|vision_start|><|image_pad|>...<|vision_end|>``; ``<|image_pad|>`` is repeated
  t*h*w / merge² times.
- TransformerLens 4.3 has no Qwen2-VL adapter; :func:`qwen2_vl_tl_adapter` derives one from its Qwen2.5-VL adapter
  (vision MLP ``fc1``/``fc2``). Both drop the ``torchvision`` requirement the upstream adapter declares (the PIL
  image processors need none).
"""

from __future__ import annotations

from vlm_lens.adapters.base import AdapterSpec


def derive_mm_token_type_ids(model_inputs: dict, image_token_id: int) -> dict:
    """Add ``mm_token_type_ids = (input_ids == image_token_id)`` when the processor did not return it."""
    if "mm_token_type_ids" not in model_inputs:
        model_inputs = dict(model_inputs)
        model_inputs["mm_token_type_ids"] = (model_inputs["input_ids"] == image_token_id).long()
    return model_inputs


def extend_with_text_types(model_inputs: dict, new_ids) -> dict:
    """Generated tokens are text: ``mm_token_type_ids`` grows with zeros beside ``input_ids``."""
    import torch

    from vlm_lens.adapters.base import _extend_ids

    out = _extend_ids(model_inputs, new_ids)
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = torch.cat([out["mm_token_type_ids"], torch.zeros_like(new_ids)], dim=1)
    return out


def qwen2_5_vl_tl_adapter() -> type:
    """TransformerLens's Qwen2.5-VL adapter without its ``torchvision`` requirement."""
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter

    class Qwen2_5_VLAdapter(Qwen2_5_VLArchitectureAdapter):
        required_libraries: list[str] = []

    return Qwen2_5_VLAdapter


def qwen2_vl_tl_adapter() -> type:
    """A TransformerLens adapter for Qwen2-VL: the Qwen2.5-VL one with the vision MLP as ``fc1``/``fc2``."""
    from transformer_lens.model_bridge.generalized_components import LinearBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.qwen3_5_vision_encoder import (
        Qwen3_5VisionBlockBridge,
        Qwen3_5VisionEncoderBridge,
    )

    base = qwen2_5_vl_tl_adapter()

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


_COMMON = dict(
    vision_tower="model.visual",
    projector="model.visual.merger",
    video_token_keys=("video_token_id",),
    derive_inputs=derive_mm_token_type_ids,
    extend_inputs=extend_with_text_types,
)

QWEN2_VL = AdapterSpec(
    family="qwen2-vl", hf_classes=("Qwen2VLForConditionalGeneration",), tl_adapter=qwen2_vl_tl_adapter, **_COMMON
)
QWEN2_5_VL = AdapterSpec(
    family="qwen2.5-vl",
    hf_classes=("Qwen2_5_VLForConditionalGeneration",),
    tl_adapter=qwen2_5_vl_tl_adapter,
    **_COMMON,
)
