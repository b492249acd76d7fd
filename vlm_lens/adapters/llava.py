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

from __future__ import annotations

from typing import Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_PLACEHOLDER = "<image>"


def random_llava(tokenizer, size: ModelSize, text: dict):
    """An untrained ``LlavaForConditionalGeneration``: a CLIP tower of ``size`` and a Llama text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})
    vision = CLIPVisionConfig(
        hidden_size=size.vision_width,
        intermediate_size=size.vision_width * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_width,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=size.tie_embeddings,
    )
    return LlavaForConditionalGeneration(config)


def llava_processor(words: Iterable[str], size: ModelSize):
    """A ``LlavaProcessor`` over a word-level vocabulary, for a CLIP tower of ``size`` (CLS dropped: "default")."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


ADAPTER = AdapterSpec(
    family="llava",
    hf_classes=("LlavaForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    random_model=random_llava,
    word_processor=llava_processor,
)
