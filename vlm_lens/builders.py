"""Build random models of the real HF vision-language classes, with offline processors, from a size spec.

Used by :mod:`vlm_lens.testing` (tiny and medium random models) and :mod:`vlm_lens.zoo` (the embedded shapes-world
models, trained from these initialisations). Token ids (image, pad, eos ...) are read from the tokenizer and written
into the config, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of a built model. Qwen families use ``patch_size`` with a 2 x 2 spatial merge."""

    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 128
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 16
    max_positions: int = 256
    # Text-model rotary base. Qwen's mRoPE gives the image-width axis the lowest frequencies: at 1e4 a one-column
    # step rotates by < 0.004 rad, too little to read a column from (docs/zoo.md); the shapes-world Qwen uses 10.
    rope_theta: float = 10000.0
    # Tied input/output embeddings: the lens at the embedding output then reads each token as itself instead of a
    # learned prior over answers (docs/zoo.md: the untied shapes-llava put p > 0.1 on three answer words there).
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies over (temporal, height, width) as Qwen does (sum must match)."""
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def _qwen_vision(size: ModelSize) -> dict:
    """Vision settings shared by the Qwen2.5-VL and Qwen3-VL towers (2 x 2 merge to ``d_model``)."""
    return dict(
        depth=size.vision_layers,
        hidden_size=size.vision_width,
        out_hidden_size=size.d_model,
        intermediate_size=size.vision_width * 2,
        num_heads=size.vision_heads,
        patch_size=size.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def build_model(family: str, tokenizer, size: ModelSize, *, seed: int = 0):
    """A randomly initialised model of ``family`` whose vocabulary and special ids come from ``tokenizer``."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=size.d_model,
        intermediate_size=size.d_mlp,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        max_position_embeddings=size.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=size.tie_embeddings,
    )
    if family == "llava":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": size.rope_theta}
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=size.vision_width,
            intermediate_size=size.vision_width * 4,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=size.image_size,
            patch_size=size.patch_size,
            projection_dim=size.vision_width,
        )
        n_image_tokens = (size.image_size // size.patch_size) ** 2
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=n_image_tokens,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=size.tie_embeddings,
        )
        model = LlavaForConditionalGeneration(config)
    else:
        ids = {
            "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        }
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": size.rope_theta,
            "mrope_section": _mrope_section(size.head_dim),
        }
        if family == "qwen2-vl":
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

            vision = dict(
                depth=size.vision_layers,
                embed_dim=size.vision_width,
                hidden_size=size.d_model,
                num_heads=size.vision_heads,
                mlp_ratio=4,
                patch_size=size.patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
            model = Qwen2VLForConditionalGeneration(config)
        elif family == "qwen3-vl":
            from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

            text["head_dim"] = size.head_dim
            text["rope_parameters"]["mrope_interleaved"] = True
            vision = dict(
                _qwen_vision(size),
                num_position_embeddings=max(4, (size.image_size // size.patch_size) ** 2),
                deepstack_visual_indexes=list(range(min(2, size.vision_layers))),  # adds to decoder layers 0 and 1
            )
            config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
            model = Qwen3VLForConditionalGeneration(config)
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            vision = dict(
                _qwen_vision(size), window_size=size.patch_size * 4, fullatt_block_indexes=[size.vision_layers - 1]
            )
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_embeddings, **ids)
            model = Qwen2_5_VLForConditionalGeneration(config)
    # TransformerLens and nnsight read the architecture name from the config.
    model.config.architectures = [type(model).__name__]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_processor(family: str, words: Iterable[str], size: ModelSize, folder: str | Path):
    """An offline processor for ``family`` over ``words``, saved to ``folder`` and reloaded from it."""
    from vlm_lens import processors as P

    if family == "llava":
        tokenizer = P.build_word_tokenizer(words, P.LLAVA_SPECIAL_TOKENS)
        processor = P.build_llava_processor(tokenizer, image_size=size.image_size, patch_size=size.patch_size)
    elif family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        tokenizer = P.build_word_tokenizer(words, P.QWEN_SPECIAL_TOKENS)
        processor = P.build_qwen2_vl_processor(tokenizer, image_size=size.image_size, patch_size=size.patch_size)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return P.save_and_reload(processor, folder)
