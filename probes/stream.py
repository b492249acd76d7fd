"""One streaming lens pass: every distribution statistic from one projection per (layer, position).

Rows of (layer, position) are projected to the vocabulary chunk by chunk; each chunk yields log-probabilities once,
and every requested statistic is reduced from them before the next chunk. Peak memory is
``O(chunk_rows x vocab)``, never ``[layers, positions, vocab]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.lens import Lens, LogitLens
from probes.metrics import entropy_from_logprobs, js_from_logprobs, kl_from_logprobs

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.hooked import HookedVLM

ALL_STATS = ("target", "topk", "entropy", "kl_to_final", "js_to_final", "js_adjacent")


@dataclass
class LensStats:
    """Reduced lens statistics for stack ``layers`` (rows) x ``positions`` (columns).

    ``target_prob``/``target_rank``: ``[layer, pos, target]`` for ``target_ids`` ``[pos, target]``.
    ``topk_ids``/``topk_prob``: ``[layer, pos, k]``. ``entropy``, ``kl_to_final`` (KL(final || layer)),
    ``js_to_final``: ``[layer, pos]``. ``js_adjacent[i]``: JS between ``layers[i]`` and ``layers[i+1]``,
    ``[layer - 1, pos]``.
    """

    layers: list[int]
    n_positions: int
    js_variant: str
    target_prob: Float[Tensor, "layer pos target"] | None = None
    target_rank: Int[Tensor, "layer pos target"] | None = None
    topk_ids: Int[Tensor, "layer pos k"] | None = None
    topk_prob: Float[Tensor, "layer pos k"] | None = None
    entropy: Float[Tensor, "layer pos"] | None = None
    kl_to_final: Float[Tensor, "layer pos"] | None = None
    js_to_final: Float[Tensor, "layer pos"] | None = None
    js_adjacent: Float[Tensor, "transition pos"] | None = None
    extra: dict = field(default_factory=dict)


def _rows_per_chunk(chunk_rows: int, n_layers: int) -> int:
    return max(1, chunk_rows // max(1, n_layers))


def lens_pass(
    model: "HookedVLM",
    stack: Float[Tensor, "stack_layer pos d_model"],
    *,
    lens: Lens | None = None,
    layers: Sequence[int] | None = None,
    target_ids: Int[Tensor, "pos target"] | None = None,
    top_k: int = 5,
    stats: Sequence[str] = ALL_STATS,
    js_variant: Literal["correct", "paper"] = "correct",
    chunk_rows: int = 2048,
) -> LensStats:
    """Lens statistics over the full residual ``stack`` (``cache.resid_stack(positions)``, all n+1 layers).

    ``layers``: stack indices to report (default all). Statistics against the final layer always use stack index
    ``n_layers``. ``chunk_rows`` bounds the (layer, position) rows projected at once.
    """
    lens = lens or LogitLens()
    unknown = set(stats) - set(ALL_STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {ALL_STATS}")
    n = model.n_layers
    if stack.shape[0] != n + 1:
        raise ValueError(f"expected the full residual stack of {n + 1} layers, got {stack.shape[0]}")
    layers = list(range(n + 1)) if layers is None else [int(layer) for layer in layers]
    if any(not 0 <= layer <= n for layer in layers):
        raise IndexError(f"layers must be in 0..{n}, got {layers}")
    if "target" in stats and target_ids is None:
        stats = [s for s in stats if s != "target"]
    n_pos = stack.shape[1]
    if target_ids is not None:
        target_ids = target_ids.reshape(n_pos, -1).long()
    need_final = bool({"kl_to_final", "js_to_final"} & set(stats))
    out = LensStats(layers=layers, n_positions=n_pos, js_variant=js_variant)
    L = len(layers)
    buffers: dict[str, Tensor] = {}
    if "target" in stats:
        buffers["target_prob"] = torch.empty(L, n_pos, target_ids.shape[1])
        buffers["target_rank"] = torch.empty(L, n_pos, target_ids.shape[1], dtype=torch.long)
    if "topk" in stats:
        buffers["topk_ids"] = torch.empty(L, n_pos, top_k, dtype=torch.long)
        buffers["topk_prob"] = torch.empty(L, n_pos, top_k)
    for name in ("entropy", "kl_to_final", "js_to_final"):
        if name in stats:
            buffers[name] = torch.empty(L, n_pos)
    if "js_adjacent" in stats:
        buffers["js_adjacent"] = torch.empty(max(L - 1, 0), n_pos)

    step = _rows_per_chunk(chunk_rows, L + int(need_final))
    for start in range(0, n_pos, step):
        cols = slice(start, min(start + step, n_pos))
        logp = lens.logits(model, stack[layers, cols], layers).float().log_softmax(-1)  # [L, c, V]
        if need_final:
            if layers[-1] == n:
                final = logp[-1:]
            else:
                final = lens.logits(model, stack[[n], cols], [n]).float().log_softmax(-1)
        if "target" in stats:
            ids = target_ids[cols].to(logp.device).unsqueeze(0).expand(L, -1, -1)
            chosen = logp.gather(-1, ids)
            buffers["target_prob"][:, cols] = chosen.exp().cpu()
            buffers["target_rank"][:, cols] = (logp.unsqueeze(-2) > chosen.unsqueeze(-1)).sum(-1).cpu()
        if "topk" in stats:
            values, ids = logp.topk(top_k, dim=-1)
            buffers["topk_ids"][:, cols] = ids.cpu()
            buffers["topk_prob"][:, cols] = values.exp().cpu()
        if "entropy" in stats:
            buffers["entropy"][:, cols] = entropy_from_logprobs(logp).cpu()
        if "kl_to_final" in stats:
            buffers["kl_to_final"][:, cols] = kl_from_logprobs(final.expand_as(logp), logp).cpu()
        if "js_to_final" in stats:
            buffers["js_to_final"][:, cols] = js_from_logprobs(logp, final.expand_as(logp), js_variant).cpu()
        if "js_adjacent" in stats and L > 1:
            buffers["js_adjacent"][:, cols] = js_from_logprobs(logp[:-1], logp[1:], js_variant).cpu()
        del logp
    for name, value in buffers.items():
        setattr(out, name, value)
    return out
