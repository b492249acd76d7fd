"""LLaVA-NeXT (LLaVA-1.6): ``LlavaNextForConditionalGeneration`` (llava-hf checkpoints, transformers >= 5).

HF module tree::

    LlavaNextForConditionalGeneration
    ├── model: LlavaNextModel
    │   ├── vision_tower: CLIPVisionModel          (one forward per view: the base image and every tile)
    │   ├── multi_modal_projector: LlavaNextMultiModalProjector   (linear_1, act, linear_2)
    │   ├── image_newline: Parameter [d_model]     (learned row-end embedding)
    │   └── language_model: LlamaModel (embed_tokens, layers[i], norm)
    └── lm_head

Quirks ("anyres" tiling, shared with LLaVA-OneVision, whose adapter imports the helpers here):
- The image processor picks the best of ``image_grid_pinpoints`` for the image's size, resizes and pads the image to
  it and cuts it into tiles of the vision tower's ``image_size``; it also resizes the whole image to one tile (the
  base image, labelled ``"thumbnail"``). ``pixel_values`` are ``[n_images, 1 + n_tiles, 3, tile, tile]`` and
  ``image_sizes`` ``[n_images, 2]`` (the original height, width), which the forward needs to undo the padding.
- Every image feature sits on an ``<image>`` placeholder, in this order per image: the base image's ``side²``
  features (``side = tile / patch``, CLS dropped with ``vision_feature_select_strategy="default"``), then the tile
  features as one grid of ``rows x cols`` patches (tiles stitched, the padding rows/columns cut), each row followed
  by the learned ``image_newline``. So an image is ``side² + rows * (cols + 1)`` tokens: the fine roles are
  ``thumbnail k`` x side², then (``patch k`` x cols, ``newline k``) per row (:func:`anyres_parts`), and the image
  patch lens gets two grids per image, in sequence order: ``(side, side)`` for the thumbnail and ``(rows, cols + 1)``
  for the tiles with the newline as the last column (:func:`anyres_grids`). Both are read from ``image_sizes`` and
  the config, so they need the prepared inputs.
- The tiny model: a 32 px image, tiles of 16 px (half the image), patch 8: the 32 x 32 pinpoint is chosen, 2 x 2
  tiles of 2 x 2 patches give a 4 x 4 patch grid: 4 thumbnail + 4 x (4 + 1) = 24 image tokens.
- Batching: samples' ``pixel_values`` are concatenated on the image axis, so they batch when their images have the
  same number of tiles (same-size images).
- TransformerLens 4.3 ships the bridge adapter (LLaVA's module map).
"""

from __future__ import annotations

from typing import Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.adapters.llava import SPECIAL_TOKENS
from vlm_lens.errors import InputError

IMAGE_PLACEHOLDER = "<image>"


def tile_size(size: ModelSize) -> int:
    """The vision tower's input (one tile, and the base image): half the image, so a square image is 2 x 2 tiles."""
    return size.image_size // 2


def pinpoints(size: ModelSize) -> list[list[int]]:
    """Anyres resolutions (height, width): one tile, 1 x 2, 2 x 1 and 2 x 2 tiles."""
    tile = tile_size(size)
    return [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def anyres_size(size: ModelSize, name: str) -> ModelSize:
    """The anyres version of a size spec: tiny halves the patch so a 16 px tile holds 2 x 2 patches; medium keeps
    patch 14 (336 px image, 168 px tiles of 12 x 12 patches: 144 + 24 x 25 = 744 image tokens)."""
    from dataclasses import replace

    return size if name == "medium" else replace(size, patch_size=size.patch_size // 2)


def tile_grid(config, image_size) -> tuple[int, int]:
    """``(rows, cols)`` of the tile features of an image of ``image_size`` (height, width) as the model packs them:
    tiles stitched, the padding cut (``unpad_image``), then OneVision's ``anyres_max_N`` downscale; no newline."""
    from transformers.image_processing_utils import select_best_resolution

    tile, patch = int(config.vision_config.image_size), int(config.vision_config.patch_size)
    side = tile // patch
    height, width = (int(v) for v in image_size)
    best_height, best_width = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = best_height // tile * side, best_width // tile * side
    if width / height > cols / rows:  # wider than the canvas: padding rows above and below
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    aspect = getattr(config, "vision_aspect_ratio", None)  # OneVision only: at most N tiles' worth of features
    if aspect:
        ratio = (rows * cols / (int(aspect.removeprefix("anyres_max_")) * side**2)) ** 0.5
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def anyres_layout(config, model_inputs: dict | None, n_image_tokens: int) -> list[list[tuple[str, int, int]]]:
    """Per image, its token blocks in sequence order: ``(kind, rows, cols)`` with kind ``"thumbnail"`` (the base
    image), ``"tiles"`` (rows of patches, each ending in a newline: cols counts the newline) or, for an image that is
    not tiled (OneVision's several images per sample), ``"image"`` then ``"newline"`` (one token)."""
    if model_inputs is None or "image_sizes" not in model_inputs:
        raise InputError("the image layout of an anyres (LLaVA-NeXT / OneVision) input comes from its image_sizes: "
                         "pass the prepared inputs (or a trace, which keeps them)")  # fmt: skip
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    sizes = model_inputs["image_sizes"].tolist()
    counts = model_inputs["batch_num_images"].tolist() if "batch_num_images" in model_inputs else [1] * len(sizes)
    tiled = [n == 1 for n in counts for _ in range(n)]  # OneVision tiles only a sample's single image
    images = []
    for image_size, tiles in zip(sizes, tiled):
        if tiles:
            rows, cols = tile_grid(config, image_size)
            images.append([("thumbnail", side, side), ("tiles", rows, cols + 1)])
        else:
            images.append([("image", side, side), ("newline", 1, 1)])
    total = sum(r * c for blocks in images for _, r, c in blocks)
    if total != n_image_tokens:
        raise InputError(f"image_sizes describe {total} image tokens, the sequence has {n_image_tokens}: prepare the "
                         "inputs with this model's processor")  # fmt: skip
    return images


def anyres_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """Two grids per image, in sequence order: the thumbnail ``(side, side)``, then the tiles ``(rows, cols + 1)``
    whose last column is the row-end newline (a non-tiled OneVision image: ``(side, side)`` then ``(1, 1)``)."""
    return [(r, c) for blocks in anyres_layout(config, model_inputs, n_image_tokens) for _, r, c in blocks]


def anyres_parts(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[str, int]]:
    """``(kind, image)`` of every image token: the thumbnail, then per tile row its patches and a newline."""
    parts: list[tuple[str, int]] = []
    for k, blocks in enumerate(anyres_layout(config, model_inputs, n_image_tokens)):
        for kind, rows, cols in blocks:
            if kind == "tiles":
                parts += ([("patch", k)] * (cols - 1) + [("newline", k)]) * rows
            else:
                parts += [({"image": "patch"}.get(kind, kind), k)] * (rows * cols)
    return parts


def random_llava_next(tokenizer, size: ModelSize, text: dict):
    """An untrained ``LlavaNextForConditionalGeneration``: a CLIP tower over one tile and a Llama text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})
    tile = tile_size(size)
    vision = CLIPVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_width * 4,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=tile, patch_size=size.patch_size, projection_dim=size.vision_width)  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_grid_pinpoints=pinpoints(size),
        image_seq_length=(tile // size.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=size.tie_embeddings,
    )
    return LlavaNextForConditionalGeneration(config)


def llava_next_processor(words: Iterable[str], size: ModelSize):
    """A ``LlavaNextProcessor`` over a word-level vocabulary: tiles and base image of :func:`tile_size`."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tile = tile_size(size)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                                 image_grid_pinpoints=pinpoints(size))  # fmt: skip
    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=size.patch_size,
                              vision_feature_select_strategy="default", image_token=IMAGE_PLACEHOLDER,
                              num_additional_image_tokens=1, chat_template=tokenizer.chat_template)  # fmt: skip


ADAPTER = AdapterSpec(
    family="llava-next",
    hf_classes=("LlavaNextForConditionalGeneration",),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    random_model=random_llava_next,
    word_processor=llava_next_processor,
    adapt_size=anyres_size,
    image_grids=anyres_grids,
    image_parts=anyres_parts,
)
