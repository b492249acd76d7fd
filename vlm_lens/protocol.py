"""The model as caches, traces and probes see it: a leaf Protocol, so they need not import the model class.

Both backends' :class:`~vlm_lens.hooked.HookedVLM` satisfy it (as TransformerLens types its components against a
``model_protocol`` rather than the bridge class).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor


@runtime_checkable
class VLMModel(Protocol):
    """What probes, caches and traces use of a model (read-only: they never set it)."""

    @property
    def name(self) -> str: ...

    @property
    def family(self) -> str: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def unembedder(self) -> Any: ...

    @property
    def placeholder_ids(self) -> list[int]: ...

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

    def image_grids(self, inputs: Any = None, n_image_tokens: int | None = None) -> list[tuple[int, int]]: ...

    def unembed(self, resid: Float[Tensor, "... d_model"], layer: int | None = None, *, normed: bool = False,
                grad: bool = False) -> Float[Tensor, "... vocab"]: ...  # fmt: skip

    def run_with_cache(self, inputs: Any, names_filter: Any = None, *, grad: bool = False) -> tuple[Tensor, Any]: ...

    def run_with_hooks(self, inputs: Any, fwd_hooks: Iterable[tuple[Any, Callable[..., Any]]] = (), *,
                       grad: bool = False) -> Tensor: ...  # fmt: skip

    def hooks(self, fwd_hooks: Iterable[tuple[Any, Callable[..., Any]]] = ()) -> ContextManager[Any]: ...

    def generate_ids(self, inputs: Any, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> Int[Tensor, " step"]: ...
