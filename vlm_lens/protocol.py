"""The model as caches, traces and probes see it: a leaf Protocol, so they need not import the model class.

Both backends' :class:`~vlm_lens.hooked.HookedVLM` satisfy it (as TransformerLens types its components against a
``model_protocol`` rather than the bridge class).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class VLMModel(Protocol):
    name: str
    tokenizer: Any
    unembedder: Any

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_vocab(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def resid_names(self) -> list[str]: ...

    def to_single_token(self, text: str) -> int: ...

    def unembed(self, resid: Float[Tensor, "... d_model"], layer: int | None = None, *, normed: bool = False,
                grad: bool = False) -> Float[Tensor, "... vocab"]: ...  # fmt: skip
