"""SmolVLM: ``SmolVLMForConditionalGeneration`` (HuggingFaceTB/SmolVLM-*, SmolVLM2-*; transformers >= 5).

HF module tree (the Idefics3 one, renamed)::

    SmolVLMForConditionalGeneration
    ├── model: SmolVLMModel
    │   ├── vision_model: SmolVLMVisionTransformer    (SigLIP: embeddings, encoder.layers[i], post_layernorm)
    │   ├── connector: SmolVLMConnector               (pixel shuffle by scale_factor, modality_projection.proj)
    │   └── text_model: LlamaModel                    (embed_tokens, layers[i], norm)
    └── lm_head

Quirks:
- Images exactly as Idefics3 (vlm_lens/adapters/idefics3.py): tiles plus a global image, ``pixel_values``
  ``[batch, n_frames, 3, tile, tile]`` with ``pixel_attention_mask``, the same marker tokens, roles and grids.
- ``SmolVLMProcessor`` derives its attributes from its ``__init__`` signature and demands a video processor (which
  needs torchvision), and its ``__init__`` refuses to run without ``num2words``, which only its video prompts use:
  :func:`image_only_processor_class` drops both (it sets the attributes ``SmolVLMProcessor.__init__`` would) and
  applies chat templates without the video defaults. Saved SmolVLM processor folders without a video processor load
  through it (:func:`load_image_only_processor`).
- TransformerLens 4.3 has no SmolVLM adapter; the module paths are Idefics3's, so :func:`smolvlm_tl_adapter`
  registers its ``Idefics3ArchitectureAdapter`` (a subclass, named for the family) for the SmolVLM class.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.adapters.idefics3 import (
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKENS,
    frame_tokens,
    idefics3_config_parts,
    idefics3_spec,
    image_processor_settings,
)
from vlm_lens.processors import image_only_loader


def smolvlm_tl_adapter() -> type:
    """TransformerLens's Idefics3 adapter, for the SmolVLM class (same module paths: model.vision_model,
    model.connector, model.text_model, lm_head)."""
    from transformer_lens.model_bridge.supported_architectures.idefics3 import Idefics3ArchitectureAdapter

    class SmolVLMArchitectureAdapter(Idefics3ArchitectureAdapter):
        """``SmolVLMForConditionalGeneration``: the Idefics3 layout."""

    return SmolVLMArchitectureAdapter


@lru_cache(maxsize=None)
def image_only_processor_class() -> Any:
    """``SmolVLMProcessor`` without a video processor (torchvision) and without ``num2words`` (video prompts only);
    built on first use (importing transformers is slow)."""
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
        """``SmolVLMProcessor`` for images only: no video processor, no ``num2words``."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
            # what SmolVLMProcessor.__init__ sets, without its num2words check (its own __init__ cannot be called)
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", IMAGE_PLACEHOLDER)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLMProcessor's version reads the video processor's frame defaults; images need none of them
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return SmolVLMImageOnlyProcessor


load_image_only_processor = image_only_loader(image_only_processor_class)


def smolvlm_processor(words: Iterable[str], size: ModelSize):
    """An image-only SmolVLM processor over a word-level vocabulary (PIL image processor, 2 x 2 tiles)."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return image_only_processor_class()(image_processor=SmolVLMImageProcessorPil(**image_processor_settings(size)),
                                        tokenizer=tokenizer, image_seq_len=frame_tokens(size),
                                        chat_template=tokenizer.chat_template)  # fmt: skip


def random_smolvlm(tokenizer, size: ModelSize, text: dict):
    """An untrained ``SmolVLMForConditionalGeneration`` of ``size``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration(SmolVLMConfig(**idefics3_config_parts(tokenizer, size, text)))


ADAPTER: AdapterSpec = idefics3_spec(
    "smolvlm",
    "SmolVLMForConditionalGeneration",
    tl_adapter=smolvlm_tl_adapter,
    processor_classes=("SmolVLMImageOnlyProcessor", "SmolVLMProcessor"),
    load_processor=load_image_only_processor,
    random_model=random_smolvlm,
    word_processor=smolvlm_processor,
)
