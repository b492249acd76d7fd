"""Gemma 3: ``Gemma3ForConditionalGeneration`` (gemma-3-4b/12b/27b, MedGemma; transformers >= 5).

HF module tree::

    Gemma3ForConditionalGeneration
    ├── model: Gemma3Model
    │   ├── vision_tower: SiglipVisionModel         (patch embed + encoder layers + post-LN; no pooling head)
    │   ├── multi_modal_projector: Gemma3MultiModalProjector
    │   │     (patch grid average-pooled to mm_tokens_per_image, mm_soft_emb_norm, x @ mm_input_projection_weight)
    │   └── language_model: Gemma3TextModel
    │       ├── embed_tokens: Gemma3TextScaledWordEmbedding   (multiplies by sqrt(d_model) itself)
    │       ├── layers[i]: Gemma3DecoderLayer
    │       │     input_layernorm -> self_attn (q_norm, k_norm) -> post_attention_layernorm -> + residual
    │       │     pre_feedforward_layernorm -> mlp (gated) -> post_feedforward_layernorm -> + residual
    │       └── norm: Gemma3RMSNorm                 (every Gemma norm scales by 1 + weight)
    └── lm_head

Quirks:
- The processor's placeholder is ``<start_of_image>`` (``processor.image_token``); it expands each one into
  ``<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>``. The soft token is the
  image token (``config.image_token_id``); start/end of image are ``marker_tokens`` (text embeddings, no image
  features). Pan-and-scan (extra crops per image) is off in the processor built here.
- **Bidirectional image attention**: the forward reads ``token_type_ids`` (1 at image soft tokens) and lets the soft
  tokens of one image attend to each other in both directions (HF's ``blockwise_overlay``); without it the mask is
  plain causal and the logits differ. The processor returns it; :func:`derive_token_type_ids` fills it from
  ``input_ids`` when missing, generated tokens extend it with zeros (text), and batches pad it per position
  (``vlm_lens.batch.PER_POSITION_PAD``). Cached decoding steps need none (HF passes it on the prefill only).
- **Sliding-window layers**: ``config.text_config.layer_types`` mixes ``sliding_attention`` (local, window
  ``sliding_window``) and ``full_attention`` layers, each with its own mask (sliding: causal or same-image-block,
  AND inside the window) and its own rotary base. The tiny model keeps real Gemma's pattern (local layers, a global
  last layer) with a window (12) shorter than its prompts (16+ tokens), so every test exercises the window. HF's
  cache keeps only a local layer's last keys: forwards whose cache vlm-lens cuts or forks by position (prefix skips,
  shared image prefixes) use a cache that keeps every position (``vlm_lens.capture.full_cache``; the mask still
  applies the window), and questions sharing an image prefix generate together only at equal length (the window
  would count pads between prefix and question).
- **Attention blocking** (:mod:`vlm_lens.attention_block`) edits the 4-D mask each chosen layer receives, which is
  already that layer's type of mask with the bidirectional image block: blocking only removes edges, so it composes
  with both (an image query may still see later soft tokens of its own image unless those keys are blocked too).
- ``hook_embed`` reads ``embed_tokens``' output, already scaled by sqrt(d_model): what the decoder receives at text
  positions (at image positions the decoder receives the projector's output instead, as for every family).
- TransformerLens 4.3 ships ``Gemma3MultimodalArchitectureAdapter`` (used as is).
"""

from __future__ import annotations

from typing import Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize, placeholder_types

BOI, IMAGE_SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", BOI, IMAGE_SOFT, EOI)
GEMMA_MARKERS = ("<start_of_image>", "<end_of_image>")  # around each image's soft tokens, no image features
POOL = 2  # the projector average-pools 2 x 2 vision patches into one language token (Gemma 3: 4 x 4)
SLIDING_WINDOW = 12  # tokens: shorter than a tiny prompt (16+), so local layers drop the first keys of its last positions


# token_type_ids (1 at image soft tokens) drives the bidirectional image mask: derived when missing, zeros after
derive_token_type_ids, extend_with_text_types = placeholder_types("token_type_ids")


def gemma3_size(size: ModelSize, name: str) -> ModelSize:
    """Gemma's version of a size spec: patches pooled 2 x 2, so the patch is halved to keep the token count (tiny:
    32 px / patch 8 = 4 x 4 patches -> 2 x 2 = 4 tokens; medium: 672 px / patch 14 = 48 x 48 -> 24 x 24 = 576)."""
    from dataclasses import replace

    if name == "medium":
        return replace(size, patch_size=14, image_size=672)
    return replace(size, patch_size=size.patch_size // POOL)


def tokens_per_image(size: ModelSize) -> int:
    side = size.image_size // size.patch_size // POOL
    return side * side


def random_gemma3(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Gemma3ForConditionalGeneration`` of ``size``: a SigLIP tower, a pooling projector (initialised
    at random: HF's init zeroes it, which would blank every image), a Gemma 3 text model with local layers and a
    global last layer."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    layers = ["sliding_attention"] * (size.n_layers - 1) + ["full_attention"]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": size.rope_theta},
            "full_attention": {"rope_type": "default", "rope_theta": size.rope_theta * 100}}  # fmt: skip
    text_config = Gemma3TextConfig(**text, head_dim=size.head_dim, query_pre_attn_scalar=size.head_dim,
                                   sliding_window=SLIDING_WINDOW, layer_types=layers, rope_parameters=rope)  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_width * 4,
                                num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                                image_size=size.image_size, patch_size=size.patch_size, vision_use_head=False)  # fmt: skip
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("boi_token_index", BOI), ("eoi_token_index", EOI), ("image_token_index", IMAGE_SOFT))}  # fmt: skip
    config = Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=tokens_per_image(size),
                          tie_word_embeddings=size.tie_embeddings, **ids)  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, size.vision_width**-0.5)
    return model


def gemma3_processor(words: Iterable[str], size: ModelSize):
    """A ``Gemma3Processor`` over a word-level vocabulary whose tokenizer names Gemma's image tokens, with the PIL
    image processor resizing to ``image_size`` (no pan-and-scan): one image = ``tokens_per_image(size)`` soft tokens."""
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    words_only = build_word_tokenizer(words, SPECIAL_TOKENS)
    # Gemma3Processor reads boi_token / eoi_token / image_token (and their ids) from the tokenizer: named tokens.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words_only.backend_tokenizer, **words_only.init_kwargs,
                                        boi_token=BOI, eoi_token=EOI, image_token=IMAGE_SOFT)  # fmt: skip
    tokenizer.padding_side = "right"
    tokenizer.chat_template = chat_template(BOI)
    image_processor = Gemma3ImageProcessorPil(size={"height": size.image_size, "width": size.image_size},
                                              do_pan_and_scan=False)  # fmt: skip
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                           image_seq_length=tokens_per_image(size))  # fmt: skip


def pooled_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """Each image's token grid: ``mm_tokens_per_image`` tokens, a square of pooled patches (row-major)."""
    from vlm_lens.errors import InputError

    per_image = int(config.mm_tokens_per_image)
    side = int(round(per_image**0.5))
    if n_image_tokens % per_image:
        raise InputError(f"gemma3: {n_image_tokens} image tokens are not whole images of {per_image} tokens")
    return [(side, side)] * (n_image_tokens // per_image)


def gemma3_tl_adapter() -> type:
    """TransformerLens's Gemma 3 multimodal adapter."""
    from transformer_lens.model_bridge.supported_architectures.gemma3_multimodal import (
        Gemma3MultimodalArchitectureAdapter,
    )

    return Gemma3MultimodalArchitectureAdapter


ADAPTER = AdapterSpec(
    family="gemma3",
    hf_classes=("Gemma3ForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    attn_out="post_attention_layernorm",  # what the attention adds to the residual (TransformerLens's ln1_post)
    mlp_out="post_feedforward_layernorm",  # what the MLP adds (ln2_post)
    mlp_norm="pre_feedforward_layernorm",  # its input is hook_resid_mid (post_attention_layernorm norms the attention)
    derive_inputs=derive_token_type_ids,
    extend_inputs=extend_with_text_types,
    tl_adapter=gemma3_tl_adapter,
    random_model=random_gemma3,
    word_processor=gemma3_processor,
    adapt_size=gemma3_size,
    image_grids=pooled_grids,
    marker_tokens=GEMMA_MARKERS,
)
