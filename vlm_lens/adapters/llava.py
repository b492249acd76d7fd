"""LLaVA-1.5 layout: ``LlavaForConditionalGeneration`` (llava-hf checkpoints, transformers >= 5).

HF module tree::

    LlavaForConditionalGeneration
    ├── model: LlavaModel
    │   ├── vision_tower: CLIPVisionModel          (patch embed + pre-LN + encoder layers)
    │   ├── multi_modal_projector: LlavaMultiModalProjector   (linear_1, act, linear_2)
    │   └── language_model: LlamaModel
    │       ├── embed_tokens
    │       ├── layers[i]: LlamaDecoderLayer       (returns a plain Tensor)
    │       └── norm: LlamaRMSNorm
    └── lm_head

Quirks: the processor expands ``<image>`` into (image_size / patch_size)² copies (CLS dropped with
``vision_feature_select_strategy="default"``); the id is ``config.image_token_id`` (``image_token_index`` in older
configs). No extra forward inputs. TransformerLens 4.3 ships the bridge adapter.
"""

from vlm_lens.adapters.base import AdapterSpec

ADAPTER = AdapterSpec(
    family="llava",
    hf_classes=("LlavaForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
)
