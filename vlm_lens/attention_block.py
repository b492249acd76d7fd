"""Attention knockout: block the attention edges from a set of query positions to a set of key positions.

``AttentionBlock`` edits the 4-D attention mask each chosen decoder layer's attention receives, so the blocked keys
get no weight in the softmax of the blocked queries (all heads, or chosen heads). It works on a plain HF model and on
both backends because it sits at the one seam all of them share, the attention module's ``attention_mask`` argument:

- a forward pre-hook on the top ``*ForConditionalGeneration`` module records each forward's token ids (the prompt is
  what a forward with an empty KV cache saw; later cached forwards append generated positions), so role names
  resolve per forward, per batch row (left padding included);
- a forward pre-hook on each chosen layer's attention module (the TransformerLens wrapper when the bridge has
  wrapped it, and the HF module under it, which the batched trace calls unwrapped) rewrites ``attention_mask``.

A sliding-window layer's KV cache (Gemma 3's local layers) keeps only its last keys: the mask's columns then start
at the cache's offset (``get_mask_sizes``), and role masks are cut to match. Blocking only removes edges from the mask
the layer was given, so it composes with whatever that mask already says (the window, Gemma's bidirectional image
blocks).

Mask conventions (transformers 5): eager adds a float mask (0 = keep, the dtype's minimum = drop), sdpa takes a
boolean one (True = keep) or None (then causal); the TransformerLens bridge's reimplemented attention treats a 4-D
mask as authoritative. A None mask is replaced by the causal one in the implementation's convention. A query that
could see at least one key and would see none after the edit is refused (softmax over nothing).

Roles (``queries`` / ``keys``): ``"image"`` (image placeholder positions; refused for a family whose image enters
through cross-attention, Mllama, which has none, as are its cross-attention layers), ``"text"`` (the prompt's other positions,
the last one included), ``"question"`` (``text`` without the last prompt position: the chat template's words and the
question), ``"last"`` (the last prompt position, whose output predicts the first generated token), ``"generated"``
(positions after the prompt), ``"all"``; a tuple of role names (their union), a list of positions, or a boolean mask
``[pos]`` / ``[batch, pos]`` over the (padded) sequence as the model sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from vlm_lens.errors import InputError, InputTypeError, OutOfRangeError
from vlm_lens.surgery import get_module, original

ROLES = ("image", "text", "question", "last", "generated", "all")
PositionSet = str | Sequence[str] | Sequence[int] | Tensor


@dataclass
class SequenceState:
    """The token ids and validity of the sequence being processed, as forwards have shown them so far: the prompt is
    what the forward that started the KV cache saw (``n_fresh`` positions wide; a row's last prompt position is its
    last valid one there, so right and left padding both work); later positions are generated."""

    ids: Tensor  # [batch, pos]
    valid: Tensor  # [batch, pos] bool: not padding
    n_fresh: int
    last: Tensor  # [batch] the last prompt position of each row
    image: Tensor  # [batch, pos] bool: image placeholder ids


def check_positions(value: PositionSet, what: str) -> PositionSet:
    """Refuse a role name, list or mask that cannot name positions (an unknown role, an empty list, a float mask)."""
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, Tensor):
        if value.dtype != torch.bool or value.ndim not in (1, 2):
            raise InputTypeError(f"{what}: a mask must be a boolean tensor [pos] or [batch, pos], got {value.dtype} "
                                 f"{tuple(value.shape)}")  # fmt: skip
        return value
    items: list[Any] = list(value)
    if not items:
        raise InputError(f"{what} is empty: name a role ({', '.join(ROLES)}) or at least one position")
    names = [v for v in items if isinstance(v, str)]
    if len(names) == len(items):
        unknown = [v for v in names if v not in ROLES]
        if unknown:
            raise InputError(f"{what}: unknown token role {unknown[0]!r}; choose from {', '.join(ROLES)}")
        return tuple(names)
    positions = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
    if len(positions) == len(items):
        if min(positions) < 0:
            raise InputError(f"{what}: positions count from 0, got {min(positions)}")
        return positions
    raise InputTypeError(f"{what}: give role names, integer positions or a boolean mask, got {items!r}")


def role_mask(value: PositionSet, state: SequenceState, what: str) -> Bool[Tensor, "batch pos"]:
    """The positions ``value`` names in ``state``'s sequence, per batch row."""
    batch, n = state.ids.shape
    index = torch.arange(n, device=state.ids.device)
    if isinstance(value, Tensor):
        mask = value.to(state.ids.device)
        if mask.shape[-1] > n:
            raise OutOfRangeError(f"{what}: the mask covers {mask.shape[-1]} positions, the sequence has {n}")
        mask = torch.nn.functional.pad(mask, (0, n - mask.shape[-1]))  # positions added by generation: not named
        return mask.expand(batch, n) & state.valid
    if isinstance(value, list):
        if max(value) >= n:
            raise OutOfRangeError(f"{what}: position {max(value)} is outside the {n}-position sequence")
        return torch.isin(index, torch.tensor(value, device=index.device)).expand(batch, n) & state.valid
    prompt = (index < state.n_fresh).expand(batch, n) & state.valid
    last = index[None, :] == state.last[:, None]
    out = torch.zeros(batch, n, dtype=torch.bool, device=index.device)
    for role in value:
        if role == "all":
            out |= state.valid
        elif role == "generated":
            out |= state.valid & ~prompt
        elif role == "last":
            out |= last
        else:
            image = prompt & state.image
            mask = image if role == "image" else prompt & ~image
            out |= mask & ~last if role == "question" else mask
    return out


def edit_mask(
    mask: Tensor | None, blocked: Bool[Tensor, "batch heads q kv"], *, past: int, eager: bool, dtype: torch.dtype,
    where: str, offset: int = 0,
) -> Tensor:  # fmt: skip
    """``mask`` (``[batch, 1 | heads, q, kv]``, float additive or boolean, or None = causal) with ``blocked`` edges
    dropped; the keys are positions ``offset ..`` (a sliding-window cache keeps only the last ones). Raises when a
    query that could see a key would see none."""
    batch, _, q, kv = blocked.shape
    if mask is None:
        keys = offset + torch.arange(kv, device=blocked.device)
        queries = past + torch.arange(q, device=blocked.device)
        causal = keys[None, :] <= queries[:, None]
        mask = causal[None, None]
        if eager:
            mask = torch.zeros(1, 1, q, kv, dtype=dtype, device=blocked.device).masked_fill(~mask, torch.finfo(dtype).min)
    head_dim = max(mask.shape[1], blocked.shape[1])
    mask = mask[..., :kv].expand(max(mask.shape[0], batch), head_dim, q, kv)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    after = allowed & ~blocked
    starved = allowed.any(-1) & ~after.any(-1)
    if starved.any():
        row, head, query = (int(i) for i in torch.nonzero(starved)[0])
        raise InputError(f"block_attention: query position {past + query} (batch row {row}, head {head}) would attend to "
                         f"nothing in {where}: every key it may see is blocked; leave it at least one key")  # fmt: skip
    if mask.dtype == torch.bool:
        return after
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


class AttentionBlock:
    """Blocks attention from ``queries`` to ``keys`` in decoder ``layers`` (``heads``: all when None) while attached.

    ``hf_model``: the HF ``*ForConditionalGeneration`` object (wrapped by the bridge or not); ``adapter``: its
    :class:`~vlm_lens.adapters.AdapterSpec`. Checked at construction (bad roles, layers or heads raise here); used in a
    ``with`` statement it is attached inside and detached on exit, also when the body raises (what
    :meth:`HookedVLM.block_attention` returns); :meth:`attach` / :meth:`detach` for a block that lasts (a fixture's,
    applied at load: :meth:`from_config`).
    """

    def __init__(self, hf_model, adapter, queries: PositionSet, keys: PositionSet, layers: int | Sequence[int],
                 heads: int | Sequence[int] | None = None):  # fmt: skip
        text = hf_model.config.get_text_config()
        self.n_layers, self.n_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
        self.hf_model, self.adapter = hf_model, adapter
        self.image_token_id = adapter.feature_token_id(hf_model.config)  # None: no position carries image features
        self.queries = check_positions(queries, "queries")
        self.keys = check_positions(keys, "keys")
        self.layers = self.indices(layers, self.n_layers, "layers", "decoder layers")
        self.heads = None if heads is None else self.indices(heads, self.n_heads, "heads", "heads")
        self.refuse_cross_attention(hf_model.config)
        self.state: SequenceState | None = None
        self.handles: list[Any] = []
        self.edited: dict[int, Tensor] = {}  # the mask this block made per layer: a wrapper and its HF module see it once

    @classmethod
    def from_config(cls, hf_model, adapter, config: dict) -> AttentionBlock:
        """The block an ``attention_block.json`` describes (``queries``, ``keys``: role names; ``layers``), attached."""
        return cls(hf_model, adapter, tuple(config["queries"]), tuple(config["keys"]), config["layers"]).attach()

    @staticmethod
    def indices(value: int | Sequence[int], n: int, what: str, unit: str) -> list[int]:
        items = [value] if isinstance(value, int) else list(value)
        if not items:
            raise InputError(f"{what} is empty: name at least one of the model's {unit} 0..{n - 1}")
        bad = [i for i in items if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
        if bad:
            raise OutOfRangeError(f"{what}: {bad[0]!r} is not one of the model's {unit} 0..{n - 1}")
        return sorted(set(items))

    def refuse_cross_attention(self, config) -> None:
        """A family whose image enters through cross-attention (Mllama) has no image positions to block, and its
        cross-attention layers attend to image features, not to the sequence: both are refused, naming why."""
        roles = [r for value in (self.queries, self.keys) if isinstance(value, tuple) for r in value]
        if "image" in roles and not self.adapter.image_positions:
            raise InputError(f"block_attention: {self.adapter.family} has no image positions (the image enters through "
                             "cross-attention layers; its <|image|>-style tokens are markers carrying no image "
                             "features), so the 'image' role names nothing to block")  # fmt: skip
        cross = sorted(set(self.layers) & set(self.adapter.cross_layers(config)))
        if cross:
            raise InputError(f"block_attention: decoder layers {cross} of {self.adapter.family} are cross-attention "
                             "layers (their keys are image features, not sequence positions); block self-attention "
                             "layers only")  # fmt: skip

    def attach(self) -> AttentionBlock:
        if self.handles:
            raise InputError("this attention block is already attached")
        try:
            self.handles.append(self.hf_model.register_forward_pre_hook(self.record, with_kwargs=True))
            for layer in self.layers:
                module = get_module(self.hf_model, self.adapter.attention_path(self.hf_model.config, layer))
                for target in {id(module): module, id(original(module)): original(module)}.values():
                    hook = self.layer_hook(layer)
                    self.handles.append(target.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.detach()
            raise
        return self

    def __enter__(self) -> AttentionBlock:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.state = [], None
        self.edited.clear()

    def record(self, module, args, kwargs) -> None:
        """Top-level pre-hook: the ids of this forward, appended to the sequence when the KV cache is not empty."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise InputError("block_attention resolves positions from input_ids; this forward passed inputs_embeds")
        past = kwargs.get("past_key_values")
        two_d = kwargs.get("attention_mask")
        previous = None if past is None or past.get_seq_length() == 0 else self.state  # a cached forward extends it
        ids_so_far = ids if previous is None else torch.cat([previous.ids, ids], dim=1)
        valid = torch.ones_like(ids_so_far, dtype=torch.bool) if two_d is None or two_d.ndim != 2 else two_d.bool()
        if valid.shape != ids_so_far.shape:  # a 2-D mask that does not cover the sequence: trust the ids
            valid = torch.ones_like(ids_so_far, dtype=torch.bool)
        if previous is None:
            index = torch.arange(ids.shape[1], device=ids.device)
            last = torch.where(valid, index, -1).max(dim=1).values
            self.state = SequenceState(ids, valid, ids.shape[1], last, self.image_mask(ids))
        else:
            self.state = SequenceState(ids_so_far, valid, previous.n_fresh, previous.last, self.image_mask(ids_so_far))
        self.edited.clear()

    def image_mask(self, ids: Tensor) -> Tensor:
        return ids == self.image_token_id if self.image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)

    def layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and mask is self.edited.get(layer):
                return None  # the wrapper above already edited it
            if self.state is None:
                raise InputError("block_attention: a decoder layer ran without the model's forward (call the model)")
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            past_cache = kwargs.get("past_key_values")
            past = 0 if past_cache is None else int(past_cache.get_seq_length(layer))
            q = hidden.shape[1]
            kv = past + q
            # a sliding-window layer's cache (Gemma 3) keeps only its last keys: the mask's columns start at offset
            offset = 0 if past_cache is None else int(past_cache.get_mask_sizes(q, layer)[1])
            queries = role_mask(self.queries, self.state, "queries")[:, past:kv]
            keys = role_mask(self.keys, self.state, "keys")[:, offset:kv]
            blocked = queries[:, None, :, None] & keys[:, None, None, :]
            if self.heads is not None:
                per_head = torch.zeros(blocked.shape[0], self.n_heads, q, blocked.shape[-1], dtype=torch.bool,
                                       device=blocked.device)  # fmt: skip
                per_head[:, self.heads] = blocked[:, 0]
                blocked = per_head
            if not blocked.any():
                return None
            eager = original(module).config._attn_implementation == "eager" or module is not original(module)
            kwargs["attention_mask"] = edit_mask(mask, blocked.to(hidden.device), past=past, eager=eager,
                                                 dtype=hidden.dtype, where=f"decoder layer {layer}", offset=offset)  # fmt: skip
            self.edited[layer] = kwargs["attention_mask"]
            return args, kwargs

        return hook
