"""InternVL (InternVL3 "-hf" checkpoints): ``InternVLForConditionalGeneration`` (transformers-native classes).

HF module tree::

    InternVLForConditionalGeneration
    ├── model: InternVLModel
    │   ├── vision_tower: InternVLVisionModel       (InternViT)
    │   │   ├── embeddings                           (CLS + conv patch embed + absolute positions)
    │   │   ├── encoder.layer[i]                     (layernorm_before, attention.{q,k,v}_proj/projection_layer,
    │   │   │                                          layernorm_after, mlp.fc1/fc2, layer scales lambda_1/2)
    │   │   └── layernorm                            (Identity with use_mean_pooling)
    │   ├── multi_modal_projector                    (layer_norm, linear_1, act, linear_2)
    │   └── language_model: Qwen2Model (embed_tokens, layers[i], norm)
    └── lm_head

Quirks:
- Dynamic high-resolution tiling: the GotOcr2 image processor (``crop_to_patches``, on by default in
  ``InternVLProcessor``) cuts an image into a grid of tiles of the vision tower's size, the grid's aspect ratio
  closest to the image's, plus a downscaled thumbnail of the whole image as the last tile when there is more than one
  tile. ``pixel_values`` is ``[tiles, 3, tile, tile]``, all images' tiles concatenated.
- Each tile becomes ``image_seq_length`` tokens: the vision features lose CLS, then a pixel shuffle
  (``downsample_ratio`` 0.5: 2 x 2 neighbours into one vector of 4x the width) inside ``get_image_features``, then the
  MLP projector. The pixel shuffle is no module: ``vision_projector.hook_out`` reads the projector (after it).
- The processor expands ``<IMG_CONTEXT>`` into ``<img>`` + tiles * image_seq_length ``<IMG_CONTEXT>`` + ``</img>``;
  ``<img>`` / ``</img>`` are markers (no image features). The tokenizer carries named tokens the processor reads
  (``start_image_token``, ``end_image_token``, ``context_image_token``, ``video_token``).
- The tiny model tiles: tiles are half the image side (:func:`tile_size`), so a square image gives 2 x 2 tiles plus
  the thumbnail: 5 tiles of 2 x 2 tokens (tiny: 32 px image, 16 px tiles, patch 4), 20 image tokens. The tile count
  per image is read from the run of ``<IMG_CONTEXT>`` between its markers; the image grids (:func:`tile_grids`) are
  one per tile in sequence order (the thumbnail last, the one that covers the whole image); the image parts
  (:func:`tile_parts`) label the thumbnail tile's tokens ``"thumbnail k"``.
- ``InternVLProcessor`` declares a video processor, which needs torchvision: :func:`image_only_processor_class`
  drops it (saved folders without one load through it, :func:`load_image_only_processor`).
- TransformerLens 4.3 has no InternVL adapter: :func:`internvl_tl_adapter` takes its LLaVA one (same
  ``model.vision_tower`` / ``model.multi_modal_projector`` / ``model.language_model`` / ``lm_head`` paths, a Llama- or
  Qwen2-shaped text model) with the vision encoder mapped onto InternViT's module names.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.errors import InputError
from vlm_lens.processors import image_only_loader

IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"  # what the chat template writes; the processor wraps and repeats it
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": IMAGE_PLACEHOLDER,
                "video_token": "<video>"}  # fmt: skip
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", *NAMED_TOKENS.values())
MARKERS = (r"<img>", r"</img>")  # around each image's tiles, no image features
DOWNSAMPLE = 0.5  # pixel shuffle: 2 x 2 patch features per token


def tile_size(size: ModelSize) -> int:
    """The vision tower's tile side: half the image side, so a square ``image_size`` image tiles 2 x 2 (+ thumbnail)."""
    return size.image_size // 2


def tokens_per_tile(size: ModelSize) -> int:
    side = tile_size(size) // size.patch_size
    if side % 2 or tile_size(size) % size.patch_size:
        raise InputError(f"InternVL: a {tile_size(size)} px tile must be an even number of {size.patch_size} px patches")
    return int((side * DOWNSAMPLE) ** 2)


def internvl_size(size: ModelSize, name: str) -> ModelSize:
    """The InternVL version of a size spec (tiles of half the image side). Tiny: patch 4, so a 16 px tile is 4 x 4
    patches, 2 x 2 tokens after the pixel shuffle. Medium: 672 px images, 336 px tiles / patch 14 = 12 x 12 tokens."""
    from dataclasses import replace

    if name == "medium":
        return replace(size, patch_size=14, image_size=672)
    return replace(size, patch_size=size.patch_size // 4)


def random_internvl(tokenizer, size: ModelSize, text: dict):
    """An untrained ``InternVLForConditionalGeneration``: an InternViT of ``size`` on tiles, a Qwen2 text model."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})
    vision = InternVLVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_width * 4,
                                  num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                                  image_size=tile_size(size), patch_size=size.patch_size)  # fmt: skip
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=tokens_per_tile(size),
        downsample_ratio=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=size.tie_embeddings,
    )
    return InternVLForConditionalGeneration(config)


@lru_cache(maxsize=None)
def image_only_processor_class() -> Any:
    """``InternVLProcessor`` without a video processor (which would need torchvision); built on first use."""
    from transformers import InternVLProcessor

    class InternVLImageOnlyProcessor(InternVLProcessor):
        """``InternVLProcessor`` without a video processor (which would need torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):  # fmt: skip
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)  # fmt: skip

    return InternVLImageOnlyProcessor


load_image_only_processor = image_only_loader(image_only_processor_class)


def internvl_processor(words: Iterable[str], size: ModelSize):
    """An image-only InternVL processor over a word-level vocabulary: GotOcr2 tiles of :func:`tile_size` (at most
    2 x 2 plus the thumbnail), :func:`tokens_per_tile` tokens each."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tile = tile_size(size)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)  # fmt: skip
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS, named_tokens=NAMED_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        image_seq_length=tokens_per_tile(size),
                                        chat_template=tokenizer.chat_template)  # fmt: skip


def image_runs(config, model_inputs: dict | None, n_image_tokens: int) -> list[int]:
    """The tile count of each image in ``model_inputs`` (every row, in order): its run of image tokens between its
    markers, divided by ``image_seq_length``."""
    if model_inputs is None or "input_ids" not in model_inputs:
        raise InputError("the tiles of an InternVL image are counted in its input_ids: pass the prepared inputs (or a "
                         "trace, which keeps them)")  # fmt: skip
    per_tile = int(config.image_seq_length)
    ids = model_inputs["input_ids"]
    runs: list[int] = []
    for row in (ids if ids.dim() == 2 else ids[None]).tolist():
        previous = False
        for token in row:
            image = token == int(config.image_token_id)
            if image and previous:
                runs[-1] += 1
            elif image:
                runs.append(1)
            previous = image
    if sum(runs) != n_image_tokens or any(run % per_tile for run in runs):
        raise InputError(f"the input_ids hold image runs {runs}, not whole tiles of {per_tile} tokens adding up to "
                         f"{n_image_tokens}: prepare the inputs with this model's processor")  # fmt: skip
    return [run // per_tile for run in runs]


def tile_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """One ``side`` x ``side`` grid per tile in sequence order (an image's grid tiles, then its thumbnail), as for
    Idefics3: each grid is geometric (a tile's patches after the pixel shuffle); the thumbnail's covers the whole image."""
    side = int(round(int(config.image_seq_length) ** 0.5))
    return [(side, side) for tiles in image_runs(config, model_inputs, n_image_tokens) for _ in range(tiles)]


def tile_parts(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[str, int]]:
    """``("patch", k)`` for the tokens of image k's grid tiles, ``("thumbnail", k)`` for its thumbnail (the last tile
    of an image cut into more than one)."""
    per_tile = int(config.image_seq_length)
    parts: list[tuple[str, int]] = []
    for k, tiles in enumerate(image_runs(config, model_inputs, n_image_tokens)):
        grid = tiles - 1 if tiles > 1 else tiles
        parts += [("patch", k)] * (grid * per_tile) + [("thumbnail", k)] * ((tiles - grid) * per_tile)
    return parts


def internvl_tl_adapter() -> type:
    """A TransformerLens adapter for InternVL: its LLaVA adapter with the vision encoder mapped onto InternViT."""
    from transformer_lens.model_bridge.generalized_components import AttentionBridge, LinearBridge, MLPBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    from transformer_lens.model_bridge.generalized_components.vision_encoder import vision_attention_config
    from transformer_lens.model_bridge.supported_architectures.llava import LlavaArchitectureAdapter

    class InternVLVisionLayerBridge(GeneralizedComponent):
        """One InternViT layer: pre-norm attention and MLP, each scaled by a learned layer scale (``lambda_1`` /
        ``lambda_2``) before its residual add, so ``hook_attn_out`` / ``hook_mlp_out`` read the unscaled outputs."""

        is_list_item = True
        hook_aliases = {"hook_resid_pre": "hook_in", "hook_resid_post": "hook_out", "hook_attn_out": "attn.hook_out",
                        "hook_mlp_out": "mlp.hook_out"}  # fmt: skip

    def vision_encoder(cfg) -> GeneralizedComponent:
        # the vision tower's own LayerNorm eps, not the text config's (use_native_layernorm_autograd)
        def norm(name: str) -> NormalizationBridge:
            return NormalizationBridge(name=name, config=cfg, use_native_layernorm_autograd=True)

        attention = AttentionBridge(name="attention", config=vision_attention_config(cfg), submodules={
            "q": LinearBridge(name="q_proj"), "k": LinearBridge(name="k_proj"), "v": LinearBridge(name="v_proj"),
            "o": LinearBridge(name="projection_layer")})  # fmt: skip
        mlp = MLPBridge(name="mlp", config=cfg, submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")})
        layer = InternVLVisionLayerBridge(name="encoder.layer", config=cfg, submodules={
            "ln1": norm("layernorm_before"), "attn": attention, "ln2": norm("layernorm_after"), "mlp": mlp})  # fmt: skip
        return GeneralizedComponent(name="model.vision_tower", config=cfg, submodules={
            "embeddings": GeneralizedComponent(name="embeddings"), "encoder_layers": layer})  # fmt: skip

    class InternVLAdapter(LlavaArchitectureAdapter):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.component_mapping = {**(self.component_mapping or {}), "vision_encoder": vision_encoder(self.cfg)}

    return InternVLAdapter


ADAPTER = AdapterSpec(
    family="internvl",
    hf_classes=("InternVLForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    tl_adapter=internvl_tl_adapter,
    processor_classes=("InternVLImageOnlyProcessor", "InternVLProcessor"),
    load_processor=load_image_only_processor,
    random_model=random_internvl,
    word_processor=internvl_processor,
    adapt_size=internvl_size,
    image_grids=tile_grids,
    marker_tokens=MARKERS,
    image_parts=tile_parts,
)
