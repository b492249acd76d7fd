"""Idefics3: ``Idefics3ForConditionalGeneration`` (HuggingFaceM4/Idefics3-8B-Llama3, granite-docling; transformers >= 5).

HF module tree::

    Idefics3ForConditionalGeneration
    ├── model: Idefics3Model
    │   ├── vision_model: Idefics3VisionTransformer   (SigLIP: embeddings, encoder.layers[i], post_layernorm)
    │   ├── connector: Idefics3Connector              (pixel shuffle by scale_factor, modality_projection.proj)
    │   └── text_model: LlamaModel                    (embed_tokens, layers[i], norm)  -- not ``language_model``
    └── lm_head

Quirks:
- **Tiles and a global image.** With ``do_image_splitting`` the image processor resizes an image to a multiple of
  ``max_image_size`` and cuts it into square tiles of that size, then appends the whole image downscaled to one tile
  (the global image). ``pixel_values`` are ``[batch, n_frames, 3, tile, tile]`` (frames padded with all-zero
  images across a batch, which the model drops), with ``pixel_attention_mask`` ``[batch, n_frames, tile, tile]``.
  Each frame becomes ``image_seq_len = (tile / patch)² / scale_factor²`` language tokens (the connector's pixel
  shuffle folds scale_factor² neighbouring patches into one token). The processor writes one image as::

      <fake_token_around_image><row_1_col_1><image>*N ... <fake_token_around_image><row_R_col_C><image>*N
      <fake_token_around_image><global-img><image>*N<fake_token_around_image>

  (a real tokenizer also keeps a newline after each tile row). Without splitting only the global part is written.
- Token roles: ``<fake_token_around_image>``, ``<row_r_col_c>`` and ``<global-img>`` are markers; the tokens after
  ``<global-img>`` are image k's ``thumbnail`` (also without splitting, where the global image is the only view),
  the tiles' tokens its ``patch`` tokens. :func:`tile_parts` finds the ``<global-img>`` id as the token before the
  last run of image tokens (every image ends with its global view), so it needs no id the config lacks.
- Image grids: one square ``sqrt(N) x sqrt(N)`` grid per tile and per global image, in sequence order (a grid per
  frame, not per image: the tiles are separate crops with their own positions).
- The tiny model splits a 32 px image into 2 x 2 tiles of 16 px (``max_image_size`` = image_size / 2) plus the
  global image; patch 4 and scale_factor 2 give 4 tokens per frame, 20 per image.
- TransformerLens 4.3 ships ``Idefics3ArchitectureAdapter`` (no torchvision requirement); it is used as it is.
- No extra forward inputs: the processor returns ``pixel_attention_mask`` itself.
"""

from __future__ import annotations

from typing import Any, Iterable

from vlm_lens.adapters.base import AdapterSpec, ModelSize
from vlm_lens.errors import InputError

IMAGE_PLACEHOLDER = "<image>"
GRID_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))  # the processors look up 6 x 6
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<fake_token_around_image>", IMAGE_PLACEHOLDER,
                  "<end_of_utterance>", "<global-img>", *GRID_TOKENS)  # fmt: skip
MARKERS = (r"<fake_token_around_image>", r"<global-img>", r"<row_\d+_col_\d+>")
SCALE_FACTOR = 2  # the pixel shuffle of the real checkpoints (Idefics3 and SmolVLM use 2, SmolVLM-256M 4)


def tile_size(size: ModelSize) -> int:
    """The tile (``max_image_size``) of ``size``: half the image, so a square image splits into 2 x 2 tiles."""
    tile = size.image_size // 2
    if tile % (size.patch_size * SCALE_FACTOR):
        raise InputError(f"the tile ({tile} px) must be a multiple of patch_size * scale_factor = "
                         f"{size.patch_size * SCALE_FACTOR}")  # fmt: skip
    return tile


def tokens_per_frame(config) -> int:
    """Language tokens of one tile or global image: ``(tile / patch)² / scale_factor²``."""
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size) // int(config.scale_factor)
    return side * side


def idefics3_size(size: ModelSize, name: str) -> ModelSize:
    """The Idefics3 version of a size spec: tiny keeps 32 px images (2 x 2 tiles of 16 px) with patch 4, so a frame
    is 4 x 4 patches, 2 x 2 tokens after the pixel shuffle; medium (336 px, patch 14) gives 6 x 6 tokens a frame."""
    from dataclasses import replace

    return replace(size, patch_size=size.patch_size // 4) if name == "tiny" else size


def idefics3_config_parts(tokenizer, size: ModelSize, text: dict) -> dict:
    """Config arguments shared by Idefics3 and SmolVLM: a SigLIP tower over one tile, a Llama text model."""
    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta})
    vision = dict(hidden_size=size.vision_width, intermediate_size=size.vision_width * 2,
                  num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                  image_size=tile_size(size), patch_size=size.patch_size)  # fmt: skip
    return dict(vision_config=vision, text_config=text, scale_factor=SCALE_FACTOR,
                image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=size.tie_embeddings)  # fmt: skip


def random_idefics3(tokenizer, size: ModelSize, text: dict):
    """An untrained ``Idefics3ForConditionalGeneration`` of ``size``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration(Idefics3Config(**idefics3_config_parts(tokenizer, size, text)))


def image_processor_settings(size: ModelSize) -> dict:
    """Splitting on: an ``image_size`` image is kept at that size and cut into tiles of :func:`tile_size`."""
    return dict(do_image_splitting=True, size={"longest_edge": size.image_size},
                max_image_size={"longest_edge": tile_size(size)})  # fmt: skip


def frame_tokens(size: ModelSize) -> int:
    side = tile_size(size) // size.patch_size // SCALE_FACTOR
    return side * side


def idefics3_processor(words: Iterable[str], size: ModelSize):
    """An ``Idefics3Processor`` over a word-level vocabulary (PIL image processor, splitting into 2 x 2 tiles)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from vlm_lens.processors import build_word_tokenizer, chat_template

    tokenizer = build_word_tokenizer(words, SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template(IMAGE_PLACEHOLDER)
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**image_processor_settings(size)),
                             tokenizer=tokenizer, image_seq_len=frame_tokens(size), chat_template=tokenizer.chat_template)  # fmt: skip


def frame_grids(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
    """One square grid per tile and per global image, in sequence order (every frame has the same token count)."""
    per_frame = tokens_per_frame(config)
    side = int(round(per_frame**0.5))
    if n_image_tokens % per_frame:
        raise InputError(f"{n_image_tokens} image tokens are not whole frames of {per_frame} tokens (tiles and global "
                         "images): prepare the inputs with this model's processor")  # fmt: skip
    return [(side, side)] * (n_image_tokens // per_frame)


def tile_parts(config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[str, int]]:
    """``("patch", k)`` for the tokens of image k's tiles, ``("thumbnail", k)`` for its global image: the run of image
    tokens after ``<global-img>``, read from ``input_ids``; image k ends with its global image."""
    ids: Any = None if model_inputs is None else model_inputs.get("input_ids")
    if ids is None or (ids.dim() == 2 and ids.shape[0] != 1):
        raise InputError("the tiles and global images of an Idefics3 input are read from its input_ids: pass one "
                         "prepared sample")  # fmt: skip
    ids = [int(i) for i in ids.reshape(-1)]
    image_id = int(config.image_token_id)
    runs = [i for i, token in enumerate(ids) if token == image_id and (i == 0 or ids[i - 1] != image_id)]
    if not runs:
        return []
    global_tag = ids[runs[-1] - 1] if runs[-1] else None  # the marker before every image's last (global) view
    parts: list[tuple[str, int]] = []
    image = 0
    for start in runs:
        length = next((i for i, token in enumerate(ids[start:]) if token != image_id), len(ids) - start)
        thumbnail = start > 0 and ids[start - 1] == global_tag
        parts += [("thumbnail" if thumbnail else "patch", image)] * length
        image += thumbnail
    return parts


def idefics3_spec(family: str, hf_class: str, **kwargs) -> AdapterSpec:
    """The layout Idefics3 and SmolVLM share (module paths, roles, grids); ``kwargs`` give the rest."""
    return AdapterSpec(
        family=family,
        hf_classes=(hf_class,),
        vision_tower="model.vision_model",
        projector="model.connector",
        layers="model.text_model.layers",
        final_norm="model.text_model.norm",
        embed_tokens="model.text_model.embed_tokens",
        adapt_size=idefics3_size,
        image_grids=frame_grids,
        marker_tokens=MARKERS,
        image_parts=tile_parts,
        **kwargs,
    )


ADAPTER = idefics3_spec("idefics3", "Idefics3ForConditionalGeneration", random_model=random_idefics3,
                        word_processor=idefics3_processor)  # fmt: skip
