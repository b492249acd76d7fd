"""TokenLayout: which positions of a sequence are image tokens, prompt text, or generated tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from vlm_lens.errors import InputError


@dataclass(frozen=True)
class TokenLayout:
    """Boolean masks over the positions of one sequence (batch of one).

    ``image``: image placeholder positions (features from the projector are merged here); empty for a family whose
    image enters through cross-attention (no position carries image features: ``AdapterSpec.image_positions``).
    ``text``: the prompt's non-image positions (chat template, question, special tokens).
    ``generated``: positions holding generated tokens (all False for a prompt alone).
    ``last_prompt_position``: the position whose output predicts the first generated token.
    """

    image: Bool[Tensor, " pos"]
    text: Bool[Tensor, " pos"]
    generated: Bool[Tensor, " pos"]
    last_prompt_position: int

    @classmethod
    def from_ids(cls, input_ids: Int[Tensor, " pos"], image_token_id: int | None, n_prompt: int | None = None):
        """Layout of ``input_ids`` whose first ``n_prompt`` positions are the prompt (default: all); no image positions
        when ``image_token_id`` is None."""
        n = input_ids.shape[-1]
        n_prompt = n if n_prompt is None else n_prompt
        if not 0 < n_prompt <= n:
            raise InputError(f"n_prompt must be in 1..{n}, got {n_prompt}")
        prompt = torch.arange(n) < n_prompt
        image = prompt & (input_ids == image_token_id) if image_token_id is not None else torch.zeros_like(prompt)
        return cls(image=image, text=prompt & ~image, generated=~prompt, last_prompt_position=n_prompt - 1)

    @property
    def n_positions(self) -> int:
        return int(self.image.shape[0])

    @property
    def n_prompt(self) -> int:
        return self.last_prompt_position + 1

    def mask(self, role: str) -> Bool[Tensor, " pos"]:
        """The mask of a token role: ``"image"``, ``"text"``, ``"generated"`` or ``"all"``."""
        if role == "all":
            return torch.ones(self.n_positions, dtype=torch.bool)
        if role not in ("image", "text", "generated"):
            raise InputError(f"unknown token role {role!r}; choose image, text, generated or all")
        return getattr(self, role)

    def positions(self, role: str) -> Int[Tensor, " n"]:
        """Indices of the positions of a token role."""
        return torch.nonzero(self.mask(role)).flatten()

    def roles(self) -> list[str]:
        """The role of every position, in order."""
        return ["image" if i else ("generated" if g else "text") for i, g in zip(self.image, self.generated)]
