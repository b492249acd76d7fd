"""What an adapter declares: where a vision-language family keeps its parts, what its forward needs, its processor
quirks, and how to build a small random model of it (tests, the embedded zoo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from vlm_lens.errors import InputError


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name reads in the HF module tree: ``path`` (relative to the ``*ForConditionalGeneration``
    object) and ``side``: ``"output"`` (the module's output) or ``"input"`` (its first input, e.g. a decoder layer's
    ``hidden_states``)."""

    path: str
    side: str = "output"


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


def extend_ids(model_inputs: dict, new_ids) -> dict:
    """``input_ids`` and ``attention_mask`` followed by ``new_ids`` ``[1, k]`` (generated tokens)."""
    import torch

    out = dict(model_inputs)
    out["input_ids"] = torch.cat([model_inputs["input_ids"], new_ids], dim=1)
    if "attention_mask" in out:
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(new_ids)], dim=1)
    return out



def placeholder_types(key: str) -> tuple[Callable[[dict, int], dict], Callable[[dict, Any], dict]]:
    """``(derive_inputs, extend_inputs)`` for a per-position type input ``key`` that marks image positions (Qwen's and
    GLM-4V's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``): derived as ``input_ids == image_token_id`` when the
    processor did not return it; generated tokens are text, so it grows with zeros beside ``input_ids``."""

    def derive(model_inputs: dict, image_token_id: int) -> dict:
        if key not in model_inputs:
            model_inputs = dict(model_inputs)
            model_inputs[key] = (model_inputs["input_ids"] == image_token_id).long()
        return model_inputs

    def extend(model_inputs: dict, new_ids) -> dict:
        import torch

        out = extend_ids(model_inputs, new_ids)
        if key in out:
            out[key] = torch.cat([out[key], torch.zeros_like(new_ids)], dim=1)
        return out

    return derive, extend


def without_torchvision(module: str, name: str) -> Callable[[], type]:
    """A ``tl_adapter`` factory: TransformerLens's adapter class ``name`` from
    ``transformer_lens.model_bridge.supported_architectures.<module>``, subclassed without the ``torchvision``
    requirement it declares (the PIL image processors vlm-lens uses need none, and nothing here may install it).
    Imported on first use (TransformerLens is slow to import)."""

    def tl_adapter() -> type:
        import importlib

        base = getattr(importlib.import_module(f"transformer_lens.model_bridge.supported_architectures.{module}"), name)
        return type(name.replace("ArchitectureAdapter", "Adapter"), (base,), {"required_libraries": []})

    return tl_adapter

@dataclass(frozen=True)
class AdapterSpec:
    """Declarative description of one HF vision-language family: everything vlm-lens knows about it.

    Module paths are relative to the HF ``*ForConditionalGeneration`` object (transformers >= 5); :meth:`hook_map`
    turns them into the hook names vlm-lens offers on both backends. ``image_token_keys`` / ``video_token_keys``
    are config attributes tried in order for the placeholder ids (never hard-coded). ``derive_inputs`` fills
    forward inputs a processor may not return (e.g. ``mm_token_type_ids``); ``extend_inputs`` appends generated
    tokens to prepared inputs. ``tl_adapter`` returns a TransformerLens adapter class to register for
    ``hf_classes`` when TransformerLens has none (or a fixed one); ``None`` uses TransformerLens's own.
    ``attn_out`` / ``mlp_out`` (inside a decoder layer): where ``hook_attn_out`` / ``hook_mlp_out`` read when what a
    sublayer adds to the residual is not its module's output (a norm after it: Gemma 3's and GLM-4V's sandwich norms); ``attention``
    and ``mlp`` otherwise. ``attention`` stays the module attention blocking works on.
    ``resid_read``: where the residual stack reads stack index l (1 <= l < n): ``"output"`` = the output of decoder
    layer l-1 (``hook_resid_post``), ``"input"`` = the input of decoder layer l (``hook_resid_pre``). They differ for
    families that add to the residual between layers (Qwen3-VL's deepstack visual features), where the input is the
    residual the next layer actually reads.

    ``position_state``: the attribute (path relative to the HF model) where a forward over a prompt leaves what cached
    generation reads for later positions (Qwen-VL's ``model.rope_deltas``: the offset of text positions after an
    image). A generation that continues a KV cache built earlier (a shared image prefix) restores it first.

    Processor quirks: ``load_processor(folder, trust_remote_code)`` loads a saved processor whose
    ``processor_config.json`` names one of ``processor_classes`` (None from it: use ``AutoProcessor``).

    Small random models (tests, benchmarks, the zoo's initialisations): ``random_model(tokenizer, size, text)``
    returns an untrained model of the family, where ``text`` holds the text-model settings every family shares
    (:func:`vlm_lens.builders.text_settings`); ``word_processor(words, size)`` an offline processor over a word-level
    vocabulary; ``adapt_size(size, name)`` the family's version of the ``"tiny"`` / ``"medium"`` size spec. A family
    without ``random_model`` can be loaded and analysed but is left out of the family tests.

    Token roles (:meth:`position_roles`; :mod:`vlm_lens.roles`): ``marker_tokens`` are regular expressions (full
    match) of the token strings that delimit images, tiles or rows without carrying image features (Pixtral's
    ``[IMG_BREAK]``, Idefics3's ``<row_1_col_1>``, Gemma 3's ``<start_of_image>``); ``image_parts(config,
    model_inputs, n_image_tokens)`` labels each image-token position ``(kind, image)`` with kind ``"patch"``,
    ``"thumbnail"`` (the downscaled whole image of a tiling family) or ``"newline"`` (a learned row-end embedding
    among the image features). Without it every image token is a patch of image k, k counting contiguous runs.

    Cross-attention families (Mllama): ``image_positions=False`` says no position of the sequence carries image
    features (the placeholders are plain token embeddings): the layout's ``image`` mask is empty and a placeholder's
    fine role is whatever ``marker_tokens`` makes it. ``cross_attention_layers(config)`` lists the decoder layers whose
    attention (at ``cross_attention`` inside the layer) reads the image features instead of the sequence: there
    ``blocks.{i}.hook_attn_out`` and ``blocks.{i}.hook_cross_attn_out`` name its output, attention blocking refuses
    them, and a KV cache built elsewhere keeps their entries whole (they hold image features, not positions).
    Their residual adds are gated (``tanh`` gates, and the MLP's by the rows that see an image), so
    :meth:`~vlm_lens.cache.VLMCache.decompose_resid` takes what they wrote from ``hook_resid_mid`` (the input of
    ``mlp_norm``). ``vision_before_embed``: the vision tower runs before the token embedding (the order nnsight reads
    hooks in).
    """

    family: str
    hf_classes: tuple[str, ...]
    vision_tower: str
    projector: str
    layers: str = "model.language_model.layers"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    embed_tokens: str = "model.language_model.embed_tokens"
    attention: str = "self_attn"  # inside a decoder layer
    mlp: str = "mlp"
    # where hook_attn_out / hook_mlp_out read inside a decoder layer when the sublayer's output is normed before it
    # is added to the residual (sandwich norms: Gemma's post-attention / post-feedforward norms, GLM-4V's
    # post_self_attn / post_mlp layernorm; TransformerLens hooks there too)
    attn_out: str | None = None
    mlp_out: str | None = None
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_keys: tuple[str, ...] = ()
    derive_inputs: Callable[[dict, int], dict] | None = field(default=None, compare=False)
    extend_inputs: Callable[[dict, Any], dict] = field(default=extend_ids, compare=False)
    tl_adapter: Callable[[], type] | None = field(default=None, compare=False)
    resid_read: str = "output"
    position_state: str | None = None
    processor_classes: tuple[str, ...] = ()
    load_processor: Callable[[Path, bool], Any] | None = field(default=None, compare=False)
    random_model: Callable[[Any, ModelSize, dict], Any] | None = field(default=None, compare=False)
    word_processor: Callable[[Iterable[str], ModelSize], Any] | None = field(default=None, compare=False)
    adapt_size: Callable[[ModelSize, str], ModelSize] | None = field(default=None, compare=False)
    image_grids: Callable[[Any, dict | None, int], list[tuple[int, int]]] | None = field(default=None, compare=False)
    marker_tokens: tuple[str, ...] = ()
    image_parts: Callable[[Any, dict | None, int], list[tuple[str, int]]] | None = field(default=None, compare=False)
    image_positions: bool = True
    cross_attention_layers: Callable[[Any], list[int]] | None = field(default=None, compare=False)
    cross_attention: str = "cross_attn"  # inside a cross-attention decoder layer
    mlp_norm: str = "post_attention_layernorm"  # inside a decoder layer: its input is hook_resid_mid
    vision_before_embed: bool = False  # the forward runs the vision tower before the token embedding (Mllama)

    def cross_layers(self, config) -> list[int]:
        """The decoder layers whose attention reads image features (none for families with image positions)."""
        return [] if self.cross_attention_layers is None else sorted(self.cross_attention_layers(config))

    def attention_path(self, config, layer: int) -> str:
        """The attention module of decoder ``layer``, relative to the HF model."""
        inner = self.cross_attention if layer in self.cross_layers(config) else self.attention
        return f"{self.layers}.{layer}.{inner}"

    def feature_token_id(self, config) -> int | None:
        """The id whose positions carry image features in the residual stream (None: no position does)."""
        return self.image_token_id(config) if self.image_positions else None

    def grids(self, config, model_inputs: dict | None, n_image_tokens: int) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's tokens in the language sequence, in order (row-major within an image):
        the family's ``image_grids`` rule, else square images of equal size (LLaVA-1.5: ``(image_size / patch)²``
        tokens each, read from the vision config). A tiling family gives several grids per image, in sequence order
        (LLaVA-NeXT / OneVision: the thumbnail, then the tiles with their row-end newlines as the last column)."""
        if self.image_grids is not None:
            return self.image_grids(config, model_inputs, n_image_tokens)
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        if n_image_tokens % (side * side):
            raise InputError(f"{self.family}: {n_image_tokens} image tokens are not whole {side} x {side} images")
        return [(side, side)] * (n_image_tokens // (side * side))

    def hook_map(self, n_layers: int, config) -> dict[str, HookPoint]:
        """Every language-side hook name with the module it reads and the side (both backends use this map); the
        model ``config`` says which layers are cross-attention layers (their ``hook_attn_out`` / ``hook_cross_attn_out``
        read the cross-attention)."""
        points = {
            "hook_embed": HookPoint(self.embed_tokens),
            "ln_final.hook_normalized": HookPoint(self.final_norm),
            "unembed.hook_out": HookPoint(self.lm_head),
            "vision_projector.hook_out": HookPoint(self.projector),
        }
        for i in range(n_layers):
            layer = f"{self.layers}.{i}"
            points[f"blocks.{i}.hook_resid_pre"] = HookPoint(layer, "input")
            points[f"blocks.{i}.hook_resid_post"] = HookPoint(layer)
            points[f"blocks.{i}.hook_resid_mid"] = HookPoint(f"{layer}.{self.mlp_norm}", "input")
            points[f"blocks.{i}.hook_attn_out"] = HookPoint(f"{layer}.{self.attn_out or self.attention}")
            points[f"blocks.{i}.hook_mlp_out"] = HookPoint(f"{layer}.{self.mlp_out or self.mlp}")
        for i in self.cross_layers(config):
            if i < n_layers:
                points[f"blocks.{i}.hook_attn_out"] = HookPoint(self.attention_path(config, i))
                points[f"blocks.{i}.hook_cross_attn_out"] = HookPoint(self.attention_path(config, i))
        return points

    def image_token_id(self, config) -> int:
        """The image placeholder id, read from ``config`` (top level first, then ``text_config``)."""
        for key in self.image_token_keys:
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise InputError(
            f"{self.family}: the model config has none of {self.image_token_keys}; "
            "set the image token id on the config before loading"
        )

    def placeholder_ids(self, config) -> list[int]:
        """Ids that stand for image/video features (never generated)."""
        ids = {self.image_token_id(config)}
        for key in self.video_token_keys:
            value = getattr(config, key, None)
            if value is not None:
                ids.add(int(value))
        return sorted(ids)

    def position_roles(self, config, tokenizer, input_ids, model_inputs: dict | None = None) -> list[str]:
        """The fine role of every position of one sequence ``input_ids`` ``[pos]``: ``"text"``, ``"marker"``, or
        ``"<kind> <k>"`` for an image token (``"patch 0"``, ``"thumbnail 1"``, ``"newline 0"``) of image k."""
        import re

        ids = [int(i) for i in input_ids]
        placeholders = set(self.placeholder_ids(config)) if self.image_positions else set()
        image_at = [i for i, token in enumerate(ids) if token in placeholders]
        if self.image_parts is not None:
            parts = self.image_parts(config, model_inputs, len(image_at))
            if len(parts) != len(image_at):
                raise InputError(f"{self.family}: the image parts describe {len(parts)} image tokens, the sequence has "
                                 f"{len(image_at)}: prepare the inputs with this model's processor")  # fmt: skip
        else:  # one image per contiguous run of placeholders
            parts, run = [], 0
            for k, position in enumerate(image_at):
                run += k > 0 and position != image_at[k - 1] + 1  # a gap starts the next image
                parts.append(("patch", run))
        roles = ["text"] * len(ids)
        for position, (kind, image) in zip(image_at, parts):
            roles[position] = f"{kind} {image}"
        if self.marker_tokens:
            pattern = re.compile("|".join(f"(?:{m})" for m in self.marker_tokens))
            for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
                if roles[position] == "text" and token is not None and pattern.fullmatch(token):
                    roles[position] = "marker"
        return roles
