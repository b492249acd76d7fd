"""VLMCache: cached activations of one hooked forward, with the token layout and the residual stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.layout import TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.hooked import HookedVLM


def resid_names(n_layers: int) -> list[str]:
    """Hook names of the residual stack: the embeddings (``blocks.0.hook_resid_pre``), then every block's output."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


class VLMCache(Mapping[str, Tensor]):
    """Activations by TransformerLens hook name (``cache["blocks.3.hook_resid_post"]``: ``[batch, pos, d_model]``).

    The residual *stack* has ``n_layers + 1`` entries: index 0 is the embedding output (image features merged),
    index ``i + 1`` is the raw output of decoder layer ``i``. Every entry is un-normed, the last included (unlike
    HF's ``hidden_states[-1]``, which transformers returns after the final norm).
    """

    def __init__(self, activations: Mapping[str, Tensor], layout: TokenLayout, model: "HookedVLM",
                 input_ids: Tensor | None = None):  # fmt: skip
        """``input_ids`` ``[seq]``: the token sequence the cached positions read, so that probes know the token each
        position predicts (position p predicts ``input_ids[p + 1]``; a generation trace's cache also holds the last
        emitted token)."""
        self._activations = dict(activations)
        self.layout = layout
        self.model = model
        self.input_ids = None if input_ids is None else input_ids.reshape(-1).cpu()

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._activations[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in this cache; pass it in names_filter (cached: {len(self)} names, "
                f"e.g. {list(self._activations)[:3]})"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def __repr__(self) -> str:
        return f"VLMCache({len(self)} activations, {self.layout.n_positions} positions)"

    @property
    def resid_labels(self) -> list[str]:
        """``["0", "1", ..., str(n_layers)]``: stack indices (0 = embeddings, l = after decoder layer l-1)."""
        return [str(i) for i in range(self.model.n_layers + 1)]

    def resid_stack(
        self, positions: int | Sequence[int] | Tensor | None = None, *, return_labels: bool = False
    ) -> Float[Tensor, "layer pos d_model"] | tuple[Float[Tensor, "layer pos d_model"], list[str]]:
        """The residual stream at every layer, ``[n_layers + 1, pos, d_model]``, for batch row 0.

        ``positions``: an index, a sequence of indices or a boolean mask over positions (default: all).
        """
        names = resid_names(self.model.n_layers)
        missing = [n for n in names if n not in self._activations]
        if missing:
            raise KeyError(
                f"the residual stack needs {missing[0]!r} (and {len(missing) - 1} more); run with "
                "names_filter=None or vlm_lens.cache.resid_names(model.n_layers)"
            )
        rows = [self._activations[n][0] for n in names]
        if positions is not None:  # select before stacking: copy only the requested positions
            index = _position_index(positions, rows[0].shape[0]).to(rows[0].device)
            rows = [row[index] for row in rows]
        stack = torch.stack(rows)
        return (stack, self.resid_labels) if return_labels else stack


def _position_index(positions, n_positions: int) -> Tensor:
    index = torch.as_tensor(positions)
    if index.dtype == torch.bool:
        if index.shape != (n_positions,):
            raise ValueError(f"a position mask must have shape ({n_positions},), got {tuple(index.shape)}")
        return torch.nonzero(index).flatten()
    index = index.reshape(-1).long()
    if index.numel() and (index.max() >= n_positions or index.min() < -n_positions):
        raise IndexError(f"positions out of range for a sequence of {n_positions} tokens: {index.tolist()}")
    return index
