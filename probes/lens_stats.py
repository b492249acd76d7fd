"""The streaming lens pass: every distribution statistic from one projection per (layer, position).

Rows of (layer, position) are projected to the vocabulary chunk by chunk; each chunk yields log-probabilities once,
and every requested statistic is reduced from them before the next chunk. Peak memory is
``O(chunk_rows x vocab)``, never ``[layers, positions, vocab]``; the statistics share their work (one ``exp`` per
chunk, vocabulary sums as blocked matrix products, scratch reused) and are computed by the metric functions
themselves (:mod:`vlm_lens.probes.metrics`), so they cost less than the projection and have one formula each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.errors import InputError, OutOfRangeError
from vlm_lens.probes import metrics as M
from vlm_lens.probes.lenses import Lens, LogitLens

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.protocol import VLMModel as HookedVLM

SLAB_BYTES = 64 * 2**20  # default size of one [rows, vocab] float32 slab of a chunk
ALL_STATS = ("target", "topk", "entropy", "kl_to_final", "js_to_final", "js_adjacent")
# computed only on request: the paper's candidate tokens (distinct late-layer top-1 ids) and their probabilities
EXTRA_STATS = ("candidates",)


@dataclass
class LensStats:
    """Reduced lens statistics for stack ``layers`` (rows) x ``positions`` (columns).

    ``target_prob``/``target_rank``: ``[layer, pos, target]`` for ``target_ids`` ``[pos, target]``.
    ``topk_ids``/``topk_prob``: ``[layer, pos, k]``. ``entropy``, ``kl_to_final`` (KL(final || layer)),
    ``js_to_final``: ``[layer, pos]``. ``js_adjacent[i]``: JS between ``layers[i]`` and ``layers[i+1]``,
    ``[layer - 1, pos]``. ``candidate_ids`` ``[pos, slot]`` (-1 pads) and ``candidate_prob`` ``[layer, pos, slot]``
    (NaN pads): per position the distinct top-1 ids of the candidate layers in order of first appearance (lowest
    layer first), and nothing else (paper-spec §3.1, Q12: ``argmax(lm_head(hidden_states[j][layer][:, -1]))`` for
    ``layer`` in the late layers, deduplicated). No emitted token is appended: when the last layer is a candidate
    layer its top-1 is the emitted token under greedy decoding anyway.
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
    candidate_ids: Int[Tensor, "pos slot"] | None = None
    candidate_prob: Float[Tensor, "layer pos slot"] | None = None
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
    chunk_rows: int | None = None,
    candidate_layers: Sequence[int] | None = None,
) -> LensStats:
    """Lens statistics over the full residual ``stack`` (``cache.resid_stack(positions)``, all n+1 layers).

    ``layers``: stack indices to report (default all). Statistics against the final layer always use stack index
    ``n_layers``. ``stats`` may add ``"candidates"`` (see :class:`LensStats`), drawn from ``candidate_layers``
    (required with it; a subset of ``layers``). ``chunk_rows`` bounds the (layer, position) rows projected at once; by default
    each of the ~5 vocabulary-wide slabs of a chunk (logits, probabilities, scratch) stays under 64 MiB.
    """
    lens = lens or LogitLens()
    if js_variant not in ("correct", "paper"):
        raise InputError(f"js_variant must be 'correct' or 'paper', got {js_variant!r}")
    unknown = set(stats) - set(ALL_STATS) - set(EXTRA_STATS)
    if unknown:
        raise InputError(f"unknown statistics {sorted(unknown)}; choose from {ALL_STATS + EXTRA_STATS}")
    n = model.n_layers
    if stack.shape[0] != n + 1:
        raise InputError(f"expected the full residual stack of {n + 1} layers, got {stack.shape[0]}")
    layers = list(range(n + 1)) if layers is None else [int(layer) for layer in layers]
    if any(not 0 <= layer <= n for layer in layers):
        raise OutOfRangeError(f"layers must be in 0..{n}, got {layers}")
    if "target" in stats and target_ids is None:
        stats = [s for s in stats if s != "target"]
    candidate_rows: list[int] = []
    if "candidates" in stats:
        if candidate_layers is None or not set(candidate_layers) <= set(layers):
            raise InputError(f"stats 'candidates' needs candidate_layers, a subset of layers {layers}; got {candidate_layers}")
        candidate_rows = [layers.index(int(layer)) for layer in candidate_layers]
    candidates: list[tuple[list[int], Tensor]] = []  # per position: ids, probabilities [L, slot]
    n_pos = stack.shape[1]
    targets = None if target_ids is None else target_ids.reshape(n_pos, -1).long()
    need_final = bool({"kl_to_final", "js_to_final"} & set(stats))
    out = LensStats(layers=layers, n_positions=n_pos, js_variant=js_variant)
    L = len(layers)
    buffers: dict[str, Tensor] = {}
    if "target" in stats and targets is not None:
        buffers["target_prob"] = torch.empty(L, n_pos, targets.shape[1])
        buffers["target_rank"] = torch.empty(L, n_pos, targets.shape[1], dtype=torch.long)
    if "topk" in stats:
        buffers["topk_ids"] = torch.empty(L, n_pos, top_k, dtype=torch.long)
        buffers["topk_prob"] = torch.empty(L, n_pos, top_k)
    for name in ("entropy", "kl_to_final", "js_to_final"):
        if name in stats:
            buffers[name] = torch.empty(L, n_pos)
    if "js_adjacent" in stats:
        buffers["js_adjacent"] = torch.empty(max(L - 1, 0), n_pos)

    if chunk_rows is None:
        chunk_rows = max(1, SLAB_BYTES // (4 * model.d_vocab))
    step = _rows_per_chunk(chunk_rows, L + int(need_final))
    distribution_stats = {"entropy", "kl_to_final", "js_to_final", "js_adjacent"} & set(stats)
    for start in range(0, n_pos, step):
        cols = slice(start, min(start + step, n_pos))
        logits = lens.logits(model, stack[layers, cols], layers).float()  # [L, c, V], ours to overwrite
        log_norm = logits.logsumexp(-1, keepdim=True)  # log Σ_v exp z_v: probabilities without a softmax pass
        # one [L, c] check per chunk: NaN or +inf anywhere in a row makes its norm non-finite. (A -inf logit would need
        # an infinite residual, which the norm turns into NaN: the lens's logits are finite, checked=True below.)
        if not bool(torch.isfinite(log_norm).all()):
            raise InputError("the lens produced NaN logits (a hook wrote NaN into the residual stream, or the tuned "
                             "lens holds NaN weights): fix the hook or retrain the lens")  # fmt: skip
        if "target" in stats and targets is not None:
            ids = targets[cols].to(logits.device).unsqueeze(0).expand(L, -1, -1)
            chosen = logits.gather(-1, ids)
            buffers["target_prob"][:, cols] = (chosen - log_norm).exp().cpu()
            buffers["target_rank"][:, cols] = (logits.unsqueeze(-2) > chosen.unsqueeze(-1)).sum(-1).cpu()
        if "topk" in stats:
            values, ids = logits.topk(top_k, dim=-1)
            buffers["topk_ids"][:, cols] = ids.cpu()
            buffers["topk_prob"][:, cols] = (values - log_norm).exp().cpu()
        if candidate_rows:
            candidates += _candidates(logits, log_norm, candidate_rows)
        if distribution_stats:
            chunk = _distribution_stats(
                model, lens, stack, layers, cols, logits.sub_(log_norm), set(stats), js_variant, need_final
            )
            for name, value in chunk.items():
                buffers[name][:, cols] = value.cpu()
        del logits
    for name, value in buffers.items():
        setattr(out, name, value)
    if candidate_rows:
        width = max((len(ids) for ids, _ in candidates), default=0)
        out.candidate_ids = torch.full((n_pos, width), -1, dtype=torch.long)
        out.candidate_prob = torch.full((L, n_pos, width), float("nan"))
        for pos, (token_ids, prob) in enumerate(candidates):
            out.candidate_ids[pos, : len(token_ids)] = torch.tensor(token_ids)
            out.candidate_prob[:, pos, : len(token_ids)] = prob
    return out


def _candidates(logits, log_norm, candidate_rows) -> list[tuple[list[int], Tensor]]:
    """Per position of a chunk (``logits`` ``[L, c, V]``): the distinct top-1 ids of ``candidate_rows``, in order of
    first appearance from the lowest candidate layer, and their probabilities at every layer,
    ``exp(z_id − log Σ exp z)`` ``[L, slot]``. Only these ids: nothing is appended."""
    top1 = logits[candidate_rows].argmax(-1).T.tolist()  # [c, candidate layer]
    out = []
    for col, tokens in enumerate(top1):
        ids = list(dict.fromkeys(tokens))
        index = torch.tensor(ids, device=logits.device)
        out.append((ids, (logits[:, col, index] - log_norm[:, col]).exp().cpu()))
    return out


def _distribution_stats(model, lens, stack, layers, cols, logp, stats, js_variant, need_final) -> dict[str, Tensor]:
    """Entropy, KL/JS to the final layer and adjacent-layer JS of one chunk of ``[L, c, V]`` log-probabilities, by the
    metric functions themselves (:mod:`vlm_lens.probes.metrics`: one formula per metric), fed what they share: one
    ``exp`` for all statistics and scratch slabs reused across them; ``checked=True`` because the chunk's logits were
    checked finite once."""
    n = model.n_layers
    probs = logp.exp()
    out: dict[str, Tensor] = {}
    if "entropy" in stats:
        out["entropy"] = M.entropy_from_logprobs(logp, p=probs, checked=True)
    work = torch.empty((3,) + tuple(logp.shape), dtype=logp.dtype, device=logp.device)
    if need_final:
        if layers[-1] == n:
            final_logp, final_probs = logp[-1], probs[-1]
        else:
            final_logp = lens.logits(model, stack[[n], cols], [n]).float().log_softmax(-1)[0]
            final_probs = final_logp.exp()
        final_logp, final_probs = final_logp.expand_as(logp), final_probs.expand_as(logp)
        if "kl_to_final" in stats:  # KL(final || layer)
            out["kl_to_final"] = M.kl_from_logprobs(final_logp, logp, p=final_probs, work=work, checked=True)
        if "js_to_final" in stats:
            out["js_to_final"] = M.js_from_logprobs(logp, final_logp, js_variant, p=probs, q=final_probs, work=work,
                                                    checked=True)  # fmt: skip
    if "js_adjacent" in stats and logp.shape[0] > 1:
        out["js_adjacent"] = M.js_from_logprobs(logp[:-1], logp[1:], js_variant, p=probs[:-1], q=probs[1:], work=work,
                                                checked=True)  # fmt: skip
    return out
