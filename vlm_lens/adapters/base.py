"""What an adapter declares: where a vision-language family keeps its parts, and what its forward needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from vlm_lens.errors import InputError


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name reads in the HF module tree: ``path`` (relative to the ``*ForConditionalGeneration``
    object) and ``side``: ``"output"`` (the module's output) or ``"input"`` (its first input, e.g. a decoder layer's
    ``hidden_states``)."""

    path: str
    side: str = "output"


def _extend_ids(model_inputs: dict, new_ids) -> dict:
    """``input_ids`` and ``attention_mask`` followed by ``new_ids`` ``[1, k]`` (generated tokens)."""
    import torch

    out = dict(model_inputs)
    out["input_ids"] = torch.cat([model_inputs["input_ids"], new_ids], dim=1)
    if "attention_mask" in out:
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(new_ids)], dim=1)
    return out


@dataclass(frozen=True)
class AdapterSpec:
    """Declarative description of one HF vision-language family: everything vlm-lens knows about it.

    Module paths are relative to the HF ``*ForConditionalGeneration`` object (transformers >= 5); :meth:`hook_map`
    turns them into the hook names vlm-lens offers on both backends. ``image_token_keys`` / ``video_token_keys``
    are config attributes tried in order for the placeholder ids (never hard-coded). ``derive_inputs`` fills
    forward inputs a processor may not return (e.g. ``mm_token_type_ids``); ``extend_inputs`` appends generated
    tokens to prepared inputs. ``tl_adapter`` returns a TransformerLens adapter class to register for
    ``hf_classes`` when TransformerLens has none (or a fixed one); ``None`` uses TransformerLens's own.
    ``resid_read``: where the residual stack reads stack index l (1 <= l < n): ``"output"`` = the output of decoder
    layer l-1 (``hook_resid_post``), ``"input"`` = the input of decoder layer l (``hook_resid_pre``). They differ for
    families that add to the residual between layers (Qwen3-VL's deepstack visual features), where the input is the
    residual the next layer actually reads.
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
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_keys: tuple[str, ...] = ()
    derive_inputs: Callable[[dict, int], dict] | None = field(default=None, compare=False)
    extend_inputs: Callable[[dict, object], dict] = field(default=_extend_ids, compare=False)
    tl_adapter: Callable[[], type] | None = field(default=None, compare=False)
    resid_read: str = "output"

    def hook_map(self, n_layers: int) -> dict[str, HookPoint]:
        """Every language-side hook name with the module it reads and the side (both backends use this map)."""
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
            points[f"blocks.{i}.hook_attn_out"] = HookPoint(f"{layer}.{self.attention}")
            points[f"blocks.{i}.hook_mlp_out"] = HookPoint(f"{layer}.{self.mlp}")
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
