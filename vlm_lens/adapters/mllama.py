"""Llama 3.2 Vision: ``MllamaForConditionalGeneration``.

HF module tree::

    MllamaForConditionalGeneration
    ├── model: MllamaModel
    │   ├── vision_model: MllamaVisionModel     (tiled ViT: local transformer, then gated global transformer)
    │   ├── multi_modal_projector: nn.Linear    (vision_output_dim -> d_model: the cross-attention states)
    │   └── language_model: MllamaTextModel
    │       ├── embed_tokens                    (vocab_size + 8 rows)
    │       ├── layers[i]: MllamaSelfAttentionDecoderLayer   (self_attn, mlp), or, for i in
    │       │              MllamaCrossAttentionDecoderLayer  config.text_config.cross_attention_layers:
    │       │                  cross_attn (queries: the text; keys/values: the projected image features),
    │       │                  mlp, both residual adds gated by tanh(cross_attn_attn_gate / cross_attn_mlp_gate)
    │       └── norm
    └── lm_head

Quirks and the semantics vlm-lens gives them:
- **No image positions.** The image enters only through the cross-attention layers: the sequence holds one
  ``<|image|>`` token per image, an ordinary token embedding. The layout's ``image`` mask is therefore empty
  (``image_positions=False``), the ``<|image|>`` token's fine role is ``"marker"``, and everything that reads image
  positions (the image patch lens, ``positions="image"``, attention blocking of the ``"image"`` role) refuses with an
  InputError saying so (attention blocking: see :mod:`vlm_lens.attention_block`; the image marker's own position can
  still be blocked by index in the self-attention layers). The image's features are the cross-attention keys: read
  them at ``vision_projector.hook_out`` (``[batch, n_images, n_tiles, patches + 1, d_model]``).
- **Hook names of the cross-attention layers** (i in ``cross_attention_layers``): ``blocks.{i}.hook_cross_attn_out``
  is the cross-attention output (before its tanh gate), and ``blocks.{i}.hook_attn_out`` names the same tensor there
  (the layer's attention is its cross-attention); the self-attention layers have no ``hook_cross_attn_out``. Both
  backends offer exactly these names (``AdapterSpec.hook_map``, :func:`mllama_tl_adapter`).
- **Inputs**: ``pixel_values`` ``[batch, n_images, n_tiles, 3, H, W]``, ``aspect_ratio_ids`` ``[batch, n_images]``,
  ``aspect_ratio_mask`` ``[batch, n_images, n_tiles]`` and ``cross_attention_mask`` ``[batch, seq, n_images, n_tiles]``:
  the last is per position (``PER_POSITION_PAD``: padded along the sequence, dim 1) and grows with generated tokens by
  repeating its last row (:func:`extend_cross_attention_mask`, as HF's generation does).
- **Cached generation**: the cross-attention layers' KV cache holds the projected image features (its length is the
  number of image features, not of tokens), filled by the prompt forward and reused by every decoding step. A KV
  cache built elsewhere (shared image prefixes, prefix skips) keeps those layers whole (``AdapterSpec.cross_attention_layers``).
- A forward without an image skips the cross-attention layers entirely (HF's text-only path): their hooks do not fire.
  In a batch they run for every row, so samples with different numbers of images are refused in one batch.
- ``decompose_resid``: a cross-attention layer's residual adds are gated (and its MLP's masked on rows that see no
  image), so its parts are what it wrote (``resid_mid - resid_pre``, ``resid_post - resid_mid``; ``hook_resid_mid``
  is the input of ``post_attention_layernorm``).
- The processor prepends BOS to every prompt (``<s>`` here). ``tanh`` gates are zero in HF's initialisation (the
  image would have no effect): the random models set them to 1.
- TransformerLens 4.3 has no Mllama adapter: :func:`mllama_tl_adapter` is one, modelled on its LLaVA adapter, with
  the self- and cross-attention of a block as optional submodules (TransformerLens skips the absent one per layer,
  as for its hybrid attention/Mamba adapters).
- A prompt without an image is refused by ``prepare``: HF skips the cross-attention layers entirely then, so their
  hooks would never fire (holes in the residual stack).
"""

from __future__ import annotations

from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize, extend_ids
from vlm_lens.errors import InputError

IMAGE_TOKEN = "<|image|>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
LAYERS = "model.language_model.layers"


def cross_layers(config) -> list[int]:
    """The decoder layers whose attention is cross-attention to the image."""
    return sorted(int(i) for i in (config.get_text_config().cross_attention_layers or []))


def extend_cross_attention_mask(model_inputs: dict, new_ids) -> dict:
    """Generated tokens see the images the last prompt token sees: ``cross_attention_mask`` grows by its last row."""
    import torch

    out = extend_ids(model_inputs, new_ids)
    mask = out.get("cross_attention_mask")
    if mask is not None:
        out["cross_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, new_ids.shape[1], -1, -1)], dim=1)
    return out


def no_image_grid(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    raise InputError("mllama has no image positions in the residual stream: the image enters through cross-attention "
                     "layers (each image is one <|image|> marker token), so there is no patch grid to read; read the "
                     "image features at vision_projector.hook_out or the cross-attention output at "
                     "blocks.{i}.hook_cross_attn_out")  # fmt: skip


def mllama_tl_adapter() -> type:
    """A TransformerLens adapter for ``MllamaForConditionalGeneration``: LLaVA's, with a block's self- and
    cross-attention as optional submodules (each layer has one of them), the cross-attention wrapped as it is (HF's
    forward: it reads the image features from the KV cache while decoding) and its output aliased as both
    ``hook_attn_out`` and ``hook_cross_attn_out``."""
    from transformer_lens.model_bridge.generalized_components import (
        BlockBridge,
        EmbeddingBridge,
        LinearBridge,
        RMSNormalizationBridge,
        RotaryEmbeddingBridge,
        UnembeddingBridge,
        VisionProjectionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.supported_architectures.llava import LlavaArchitectureAdapter

    class MllamaArchitectureAdapter(LlavaArchitectureAdapter):
        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.supports_fold_ln = False  # heterogeneous blocks: no uniform attention weights to fold
            self.weight_processing_conversions = {}
            self_attn = PositionEmbeddingsAttentionBridge(
                name="self_attn", config=self.cfg, optional=True, requires_attention_mask=True,
                requires_position_embeddings=True,
                submodules={key: LinearBridge(name=f"{key}_proj") for key in "qkvo"},
            )  # fmt: skip
            cross_attn = GeneralizedComponent(name="cross_attn", optional=True)
            self.component_mapping = {
                "vision_encoder": GeneralizedComponent(name="model.vision_model"),
                "vision_projector": VisionProjectionBridge(name="model.multi_modal_projector"),
                "embed": EmbeddingBridge(name="model.language_model.embed_tokens"),
                "rotary_emb": RotaryEmbeddingBridge(name="model.language_model.rotary_emb"),
                "blocks": BlockBridge(
                    name=LAYERS,
                    submodules={
                        "ln1": RMSNormalizationBridge(name="input_layernorm", config=self.cfg),
                        "ln2": RMSNormalizationBridge(name="post_attention_layernorm", config=self.cfg),
                        "attn": self_attn,
                        "cross_attn": cross_attn,
                        "mlp": self._gated_mlp(),
                    },
                    # a list alias: TransformerLens keeps the target the layer has (its optional-submodule pruning)
                    hook_alias_overrides={"hook_attn_out": ["attn.hook_out", "cross_attn.hook_out"],  # type: ignore[dict-item]
                                          "hook_cross_attn_out": "cross_attn.hook_out"},  # fmt: skip
                ),
                "ln_final": RMSNormalizationBridge(name="model.language_model.norm", config=self.cfg),
                "unembed": UnembeddingBridge(name="lm_head", config=self.cfg),
            }

    return MllamaArchitectureAdapter


def random_mllama(tokenizer, size: ModelSize, text: dict):
    """An untrained ``MllamaForConditionalGeneration``: one-tile images of ``size.image_size`` px, a two-layer local and
    one-layer global vision transformer, cross-attention in decoder layers 1 and 3 (of 4; every other layer from 1)."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text = dict(text, cross_attention_layers=list(range(1, size.n_layers, 2)),
                rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})  # fmt: skip
    vision = dict(hidden_size=size.vision_width, intermediate_size=size.vision_width * 2,
                  num_hidden_layers=size.vision_layers, num_global_layers=1, attention_heads=size.vision_heads,
                  intermediate_layers_indices=[size.vision_layers - 1], vision_output_dim=size.vision_width * 2,
                  image_size=size.image_size, patch_size=size.patch_size, max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]])  # fmt: skip
    config = MllamaConfig(vision_config=vision, text_config=text,  # tie_word_embeddings: in text (text_settings)
                          image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # fmt: skip
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises the tanh gates at 0: the image would change nothing
        for i in cross_layers(config):
            layer = model.model.language_model.layers[i]
            layer.cross_attn_attn_gate.fill_(1.0)
            layer.cross_attn_mlp_gate.fill_(1.0)
    return model


def mllama_processor(words: Iterable[str], size: ModelSize):
    """An ``MllamaProcessor`` over a word-level vocabulary: one tile of ``size.image_size`` px per image."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_TOKEN)
    image_processor = MllamaImageProcessorPil(size={"height": size.image_size, "width": size.image_size},
                                              max_image_tiles=1)  # fmt: skip
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


ADAPTER = AdapterSpec(
    family="mllama",
    hf_classes=("MllamaForConditionalGeneration",),
    vision_tower="model.vision_model",
    projector="model.multi_modal_projector",
    image_token_keys=("image_token_id", "image_token_index"),
    extend_inputs=extend_cross_attention_mask,
    tl_adapter=mllama_tl_adapter,
    random_model=random_mllama,
    word_processor=mllama_processor,
    image_grids=no_image_grid,
    marker_tokens=(r"<\|image\|>",),
    image_positions=False,
    cross_attention_layers=cross_layers,
    vision_before_embed=True,
)
