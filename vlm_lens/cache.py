"""VLMCache: cached activations of one hooked forward, with the token layout and the residual stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Literal, Mapping, Sequence, overload

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError, OutOfRangeError, UnknownNameError
from vlm_lens.layout import TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.protocol import VLMModel


def resid_names(n_layers: int, read: str = "output") -> list[str]:
    """Hook names of the residual stack: the embeddings (``blocks.0.hook_resid_pre``), then every block's output
    (``read="output"``), or every later block's input and the last block's output (``read="input"``, for families
    that add to the residual between layers; see ``AdapterSpec.resid_read``). ``model.resid_names`` picks the right one."""
    if read == "input":
        return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    if read != "output":
        raise InputError(f"read must be 'output' or 'input', got {read!r}")
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


class VLMCache(Mapping[str, Tensor]):
    """Activations by TransformerLens hook name (``cache["blocks.3.hook_resid_post"]``: ``[batch, pos, d_model]``).

    The residual *stack* has ``n_layers + 1`` entries: index 0 is the embedding output (image features merged),
    index ``i + 1`` is the raw output of decoder layer ``i``. Every entry is un-normed, the last included (unlike
    HF's ``hidden_states[-1]``, which transformers returns after the final norm).
    """

    def __init__(self, activations: Mapping[str, Tensor], layout: TokenLayout, model: "VLMModel",
                 input_ids: Tensor | None = None, layouts: "list[TokenLayout] | None" = None):  # fmt: skip
        """``input_ids`` ``[seq]``: the token sequence the cached positions read, so that probes know the token each
        position predicts (position p predicts ``input_ids[p + 1]``; a generation trace's cache also holds the last
        emitted token)."""
        self._activations = dict(activations)
        self.layout = layout
        self.model = model
        if input_ids is not None:
            input_ids = input_ids.reshape(len(layouts), -1).cpu() if layouts is not None else input_ids.reshape(-1).cpu()
        self.input_ids = input_ids  # [seq], or [batch, seq] for a batched forward (then ``layouts`` is set)
        self.layouts = layouts

    def __getitem__(self, name: str | tuple[str, int]) -> Tensor:
        """``cache["blocks.3.hook_resid_post"]`` or, as in TransformerLens, ``cache["resid_post", 3]``."""
        if isinstance(name, tuple):
            if len(name) != 2:
                raise UnknownNameError(f"index a cache by a hook name or (name, layer), got {name!r}")
            short, layer = name
            if isinstance(layer, int) and layer < 0:
                layer += self.model.n_layers  # TransformerLens: cache["resid_post", -1] is the last block
            name = act_name(short, layer)
        try:
            return self._activations[name]
        except KeyError:
            raise UnknownNameError(
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

    @overload
    def resid_stack(self, positions: int | Sequence[int] | Tensor | None = None, *,
                    return_labels: Literal[False] = False) -> Float[Tensor, "layer pos d_model"]: ...  # fmt: skip

    @overload
    def resid_stack(self, positions: int | Sequence[int] | Tensor | None = None, *,
                    return_labels: Literal[True]) -> tuple[Float[Tensor, "layer pos d_model"], list[str]]: ...  # fmt: skip

    def resid_stack(
        self, positions: int | Sequence[int] | Tensor | None = None, *, return_labels: bool = False
    ) -> Float[Tensor, "layer pos d_model"] | tuple[Float[Tensor, "layer pos d_model"], list[str]]:
        """The residual stream at every layer, ``[n_layers + 1, pos, d_model]``, for batch row 0.

        ``positions``: an index, a sequence of indices or a boolean mask over positions (default: all).
        """
        names = self.model.resid_names
        missing = [n for n in names if n not in self._activations]
        if missing:
            raise UnknownNameError(
                f"the residual stack needs {missing[0]!r} (and {len(missing) - 1} more); run with "
                "names_filter=None or names_filter=model.resid_names"
            )
        rows = [self._activations[n][0] for n in names]
        if positions is not None:  # select before stacking: copy only the requested positions
            index = _position_index(positions, rows[0].shape[0]).to(rows[0].device)
            rows = [row[index] for row in rows]
        stack = torch.stack(rows)
        return (stack, self.resid_labels) if return_labels else stack


    def sample(self, index: int) -> "VLMCache":
        """The cache of sample ``index`` of a batched forward (``model.prepare(images, [q1, q2, ...])``): its
        positions only (right padding removed), with its layout and token ids. Activations that are not one
        vector per position of the language sequence (vision encoder, ...) are left out."""
        layouts, input_ids = self.layouts, self.input_ids
        if layouts is None or input_ids is None:
            raise InputError("this cache holds one sample; sample() splits the cache of a batched forward")
        index = range(len(layouts))[index]  # negative indices count from the end; out of range raises IndexError
        layout = layouts[index]
        n, padded = layout.n_positions, input_ids.shape[-1]
        views = {}
        for name, value in self._activations.items():
            if value.dim() >= 2 and value.shape[0] == len(layouts) and value.shape[1] == padded:
                views[name] = value[index : index + 1, :n]
            elif value.dim() == 4 and value.shape[0] == len(layouts) and value.shape[2] == value.shape[3] == padded:
                views[name] = value[index : index + 1, :, :n, :n]  # attention patterns [batch, head, query, key]
        return VLMCache(views, layout, self.model, input_ids[index, :n])

    def stack_activation(self, activation_name: str, layer: int = -1) -> Float[Tensor, "layer batch pos d_model"]:
        """One activation of every decoder layer below ``layer`` stacked, as in TransformerLens:
        ``cache.stack_activation("resid_post")`` is ``[n_layers, batch, pos, d_model]`` (``-1``: every layer)."""
        upto = self.model.n_layers if layer == -1 else layer
        if not 0 < upto <= self.model.n_layers:
            raise OutOfRangeError(f"layer {layer} out of range: 1..{self.model.n_layers} (or -1 for all)")
        return torch.stack([self[activation_name, i] for i in range(upto)])

    def to(self, device: str | torch.device) -> "VLMCache":
        """Every activation moved to ``device`` (in place, as TransformerLens's ``ActivationCache.to``); returns the
        cache."""
        self._activations = {name: value.to(device) for name, value in self._activations.items()}
        return self

    def accumulated_resid(
        self, layer: int | None = None, *, incl_mid: bool = False, apply_ln: bool = False, return_labels: bool = False
    ) -> Float[Tensor, "layer batch pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream before each layer, TransformerLens style: ``[component, batch, pos, d_model]``.

        As in TransformerLens, ``layer=l`` gives the residual *entering* decoder layer l and everything before it:
        stack indices 0..l (``l + 1`` entries); ``None``, ``-1`` or ``n_layers`` give every stack index 0..n (the last
        is the final output), i.e. :meth:`resid_stack` with the batch dimension. ``apply_ln`` applies the final norm
        to each vector, as the logit lens does (:meth:`apply_ln_to_stack`). ``incl_mid`` adds each layer's
        ``hook_resid_mid`` (after attention, before the MLP) after its input, labelled ``"l_mid"`` (TransformerLens
        backend; cache ``blocks.{l}.hook_resid_mid``).
        """
        n = self.model.n_layers
        names = self.model.resid_names
        if layer is not None and layer not in (-1, n):
            if not 0 <= layer < n:
                raise OutOfRangeError(f"layer {layer} out of range: 0..{n} (or -1 / None for all)")
            names = names[: layer + 1]
        labels = [str(i) for i in range(len(names))]
        if incl_mid:  # stack index l (the input of layer l) then layer l's mid-residual, for every layer below the top
            pairs = [(name, label) for i, (name, label) in enumerate(zip(names, labels)) for name, label in
                     ([(name, label)] + ([(f"blocks.{i}.hook_resid_mid", f"{i}_mid")] if i < n else []))]  # fmt: skip
            names, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        missing = [name for name in names if name not in self._activations]
        if missing:
            hint = " and the blocks.{l}.hook_resid_mid names" if incl_mid else ""
            raise UnknownNameError(f"accumulated_resid needs {missing[0]!r}: run with names_filter=model.resid_names{hint}")
        stack = torch.stack([self._activations[name] for name in names])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, stack: Float[Tensor, "... d_model"], *, grad: bool = False) -> Float[Tensor, "... d_model"]:
        """The model's final norm applied to every vector of ``stack`` (what the logit lens unembeds).

        Unlike TransformerLens's ``apply_ln_to_stack(..., layer=None)``, which divides by the cached scale of the
        final residual (linear, for direct logit attribution), each vector is normalised by its own scale.
        ``grad=True`` keeps the autograd graph (as ``model.unembed(..., grad=True)``).
        """
        return self.model.unembedder.normalize(stack, grad=grad)

    def decompose_resid(
        self, *, return_labels: bool = False
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """The final residual as a sum of its writers: ``[embed, attn_out 0, mlp_out 0, ..., mlp_out n-1]``.

        Needs ``hook_attn_out`` and ``hook_mlp_out`` of every block (run with ``names_filter=None``). The components
        sum to the last block's ``hook_resid_post``. For families that add to the residual between layers
        (``resid_read="input"``: Qwen3-VL's deepstack) an ``{i}_injected`` component after block i holds what was
        added (``resid_pre`` of block i+1 minus ``resid_post`` of block i). A gated cross-attention layer (Mllama)
        contributes what it wrote: ``resid_mid - resid_pre`` and ``resid_post - resid_mid``.
        """
        n = self.model.n_layers
        adapter = getattr(self.model, "adapter", None)
        between = getattr(adapter, "resid_read", "output") == "input"
        config = getattr(getattr(self.model, "hf_model", None), "config", None)
        gated = set(adapter.cross_layers(config)) if adapter is not None and config is not None else set()
        names = ["blocks.0.hook_resid_pre"]
        for i in range(n):
            names += ([f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"] if i in gated
                      else [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"])  # fmt: skip
            if between and i < n - 1:
                names += [f"blocks.{i}.hook_resid_post", f"blocks.{i + 1}.hook_resid_pre"]
        missing = [name for name in names if name not in self._activations]
        if missing:
            raise UnknownNameError(f"decompose_resid needs {missing[0]!r}: run_with_cache with names_filter=None")
        act = self._activations
        parts, labels = [act["blocks.0.hook_resid_pre"]], ["embed"]
        for i in range(n):
            if i in gated:
                mid = act[f"blocks.{i}.hook_resid_mid"]
                parts += [mid - act[f"blocks.{i}.hook_resid_pre"], act[f"blocks.{i}.hook_resid_post"] - mid]
            else:
                parts += [act[f"blocks.{i}.hook_attn_out"], act[f"blocks.{i}.hook_mlp_out"]]
            labels += [f"{i}_attn_out", f"{i}_mlp_out"]
            if between and i < n - 1:
                parts.append(act[f"blocks.{i + 1}.hook_resid_pre"] - act[f"blocks.{i}.hook_resid_post"])
                labels.append(f"{i}_injected")
        stack = torch.stack(parts)
        return (stack, labels) if return_labels else stack


# TransformerLens' short activation names (transformer_lens.utils.get_act_name) -> this cache's hook names
_ATTN_INTERNAL = {"q", "k", "v", "z", "rot_q", "rot_k", "pattern", "attn_scores", "result"}
_ALIASES = {"attn": "pattern", "scores": "attn_scores"}  # TransformerLens' get_act_name aliases
_MLP_INTERNAL = {"pre", "post", "pre_linear"}


def act_name(name: str, layer: int | None = None) -> str:
    """``("resid_post", 3)`` -> ``"blocks.3.hook_resid_post"``; ``("pattern", 0)`` -> ``"blocks.0.attn.hook_pattern"``.

    A name that is already a full hook name is returned unchanged."""
    if layer is None or name.startswith("blocks."):
        return name
    short = _ALIASES.get(name.removeprefix("hook_"), name.removeprefix("hook_"))
    if short in _ATTN_INTERNAL:
        return f"blocks.{layer}.attn.hook_{short}"
    if short in _MLP_INTERNAL:
        return f"blocks.{layer}.mlp.hook_{short}"
    return f"blocks.{layer}.hook_{short}"


def _position_index(positions, n_positions: int) -> Tensor:
    index = torch.as_tensor(positions)
    if index.dtype == torch.bool:
        if index.shape != (n_positions,):
            raise InputError(f"a position mask must have shape ({n_positions},), got {tuple(index.shape)}")
        return torch.nonzero(index).flatten()
    index = index.reshape(-1).long()
    if index.numel() and (index.max() >= n_positions or index.min() < -n_positions):
        raise OutOfRangeError(f"positions out of range for a sequence of {n_positions} tokens: {index.tolist()}")
    return index
