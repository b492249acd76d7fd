"""What an adapter declares: where a vision-language family keeps its parts, and what its forward needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class AdapterSpec:
    """Declarative description of one HF vision-language family.

    Module paths are relative to the HF ``*ForConditionalGeneration`` object (transformers >= 5).
    ``image_token_keys`` are config attributes tried in order for the image placeholder id (never hard-coded).
    ``extra_inputs`` are forward inputs beyond ``input_ids``/``attention_mask``/``pixel_values``.
    ``derive_inputs`` fills extra inputs a processor may not return (e.g. ``mm_token_type_ids``).
    ``tl_adapter`` returns a TransformerLens adapter class to register for ``hf_classes`` when TransformerLens
    has none (or a fixed one); ``None`` uses TransformerLens's own.
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
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    extra_inputs: tuple[str, ...] = ()
    # transformers returns hidden_states[-1] after the final norm (see docs/hooks.md).
    last_hidden_state_normed: bool = True
    derive_inputs: Callable[[dict, int], dict] | None = field(default=None, compare=False)
    tl_adapter: Callable[[], type] | None = field(default=None, compare=False)
    resid_read: str = "output"

    def image_token_id(self, config) -> int:
        """The image placeholder id, read from ``config`` (top level first, then ``text_config``)."""
        for key in self.image_token_keys:
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise ValueError(
            f"{self.family}: the model config has none of {self.image_token_keys}; "
            "set the image token id on the config before loading"
        )
