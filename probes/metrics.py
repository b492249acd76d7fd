"""Distribution and geometry metrics: small pure functions over the last dimension, any leading dims.

Distribution metrics take *logits* (un-normalised log-probabilities) and work through ``log_softmax`` in the
inputs' dtype (pass float64 for reference values), so no probability is ever exponentiated into 0 and logged back.
Natural logarithms throughout (nats).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.errors import InputError

LN2 = math.log(2.0)  # the upper bound of the correct JS divergence, in nats


def kl_divergence(p_logits: Float[Tensor, "*batch vocab"], q_logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """KL(P || Q) = Σ_v P_v (log P_v − log Q_v), with P = softmax(p_logits), Q = softmax(q_logits). ≥ 0."""
    return kl_from_logprobs(p_logits.log_softmax(-1), q_logits.log_softmax(-1))


def js_divergence(
    p_logits: Float[Tensor, "*batch vocab"],
    q_logits: Float[Tensor, "*batch vocab"],
    variant: Literal["correct", "paper"] = "correct",
) -> Float[Tensor, "*batch"]:
    """Jensen-Shannon divergence between softmax(p_logits) and softmax(q_logits).

    ``correct``: JSD = ½ KL(P || M) + ½ KL(Q || M), M = ½ (P + Q); symmetric, in [0, ln 2] nats.

    ``paper``: the authors' expression (paper-spec §3.2, quirk Q3), literally
    ``0.5 * (F.kl_div(log_softmax(p), M, reduction="none").mean(-1) + F.kl_div(log_softmax(q), M, reduction="none").mean(-1))``
    = ½ (KL(M || P) + KL(M || Q)) / V: the reverse direction, averaged instead of summed over the vocabulary.
    """
    return js_from_logprobs(p_logits.log_softmax(-1), q_logits.log_softmax(-1), variant)


def entropy(logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """H(P) = −Σ_v P_v log P_v with P = softmax(logits); in [0, ln V]."""
    return entropy_from_logprobs(logits.log_softmax(-1))


# -- from normalised log-probabilities: the one implementation of each formula ---------------------------------------
# The streaming lens pass (:mod:`vlm_lens.probes.lens_stats`) calls these on [layers, positions, vocab] chunks with
# ``p`` (exp of the log-probabilities, shared by every statistic), ``work`` (scratch reused across statistics) and
# ``checked=True`` (it has verified the chunk is finite); everyone else calls them with log-probabilities alone.


def _check_logits(*tensors: Tensor) -> None:
    """NaN (or +inf) logits have no distribution: refuse them rather than return NaN. −inf entries are masked tokens
    (probability 0) and are fine."""
    for t in tensors:
        if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
            raise InputError("logits contain NaN or +inf: they define no distribution; mask tokens with -inf and "
                             "check the hook or lens that produced them")  # fmt: skip


def _dot_block(vocab: int) -> int | None:
    """The largest divisor of ``vocab`` in [16, 256] (``vocab`` itself when it is at most 256), else None."""
    if vocab <= 256:
        return vocab
    return next((d for d in range(256, 15, -1) if vocab % d == 0), None)


def rowdot(a: Float[Tensor, "*batch vocab"], b: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """Σ_v a_v b_v per row of two same-shaped tensors.

    Computed as batched matrix products over blocks of ~128 entries whose partial sums are then added: as fast as
    one ``bmm`` (no ``[..., vocab]`` temporary) and as accurate as ``(a * b).sum(-1)`` (a single float32
    accumulation over 32k entries loses ~1e-4 on an entropy of 10; blocks keep it ~1e-6). A broadcast operand
    (``final.expand_as(x)``) is handled one leading slice at a time rather than copied.
    """
    if a.shape != b.shape:
        raise InputError(f"rowdot needs same-shaped operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    vocab = a.shape[-1]
    block = _dot_block(vocab)
    if not (a.is_contiguous() and b.is_contiguous()):
        if a.dim() > 2:
            return torch.stack([rowdot(a[i], b[i]) for i in range(a.shape[0])])
        return (a * b).sum(-1)
    if block is None:
        return (a * b).sum(-1)
    rows = a.numel() // vocab
    partial = torch.bmm(a.reshape(-1, 1, block), b.reshape(-1, block, 1))  # [rows * vocab / block, 1, 1]
    return partial.reshape(rows, vocab // block).sum(-1).reshape(a.shape[:-1])


def _scratch(work: Tensor | None, like: Tensor, index: int, shape: torch.Size) -> Tensor:
    """Slab ``index`` of ``work`` viewed as ``shape`` (a new tensor without ``work``)."""
    if work is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return work[index].view(-1)[: shape.numel()].view(shape)


def _weighted(p: Tensor, diff: Tensor, checked: bool) -> Tensor:
    """Σ_v P_v · diff_v with 0 · x = 0 where P_v = 0 (masked tokens: diff may be ±inf there); ``checked``: every
    entry is finite, so nothing needs masking."""
    if not checked:
        diff = diff.masked_fill(p == 0, 0.0)
    return rowdot(p.expand(diff.shape) if p.shape != diff.shape else p, diff)


def entropy_from_logprobs(log_p: Float[Tensor, "*batch vocab"], *, p: Tensor | None = None,
                          checked: bool = False) -> Float[Tensor, "*batch"]:  # fmt: skip
    """H(P) = −Σ_v P_v log P_v from normalised log-probabilities (0 · log 0 = 0 for masked tokens)."""
    if not checked:
        _check_logits(log_p)
    p = log_p.exp() if p is None else p
    return -_weighted(p, log_p, checked)


def kl_from_logprobs(log_p: Float[Tensor, "*batch vocab"], log_q: Float[Tensor, "*batch vocab"], *,
                     p: Tensor | None = None, work: Tensor | None = None,
                     checked: bool = False) -> Float[Tensor, "*batch"]:  # fmt: skip
    """KL(P || Q) = Σ_v P_v (log P_v − log Q_v) from normalised log-probabilities (no second log_softmax).
    0 · log 0 = 0; +inf where Q masks a token P gives mass to (the true value). ≥ 0 (clamped against rounding)."""
    if not checked:
        _check_logits(log_p, log_q)
    p = log_p.exp() if p is None else p
    shape = torch.broadcast_shapes(log_p.shape, log_q.shape)
    diff = _scratch(work, log_p, 0, shape)
    torch.sub(log_p, log_q, out=diff)
    return _weighted(p, diff, checked).clamp_min(0.0)


def js_from_logprobs(
    log_p: Float[Tensor, "*batch vocab"],
    log_q: Float[Tensor, "*batch vocab"],
    variant: Literal["correct", "paper"] = "correct",
    *,
    p: Tensor | None = None,
    q: Tensor | None = None,
    work: Tensor | None = None,
    checked: bool = False,
) -> Float[Tensor, "*batch"]:
    """:func:`js_divergence` from normalised log-probabilities, in the direct form: sums of terms that vanish as
    P → Q, so small divergences keep their relative precision (H(M) − mean H would lose them).

    ``correct``: ½ Σ P (log P − log M) + ½ Σ Q (log Q − log M), M = ½ (P + Q).
    ``paper``: ½ Σ M (2 log M − log P − log Q) / V = ½ (KL(M ‖ P) + KL(M ‖ Q)) / V; +inf where one side masks a
    token the other does not (the authors' KL(M ‖ P) is infinite there).
    M is clamped to the smallest normal float, so an entry where both sides underflow contributes 0, not 0 · (−inf).
    ``work``: ``[3, ...]`` scratch at least the broadcast shape, reused instead of temporaries.
    """
    if variant not in ("correct", "paper"):
        raise InputError(f"variant must be 'correct' or 'paper', got {variant!r}")
    if not checked:
        _check_logits(log_p, log_q)
    p = log_p.exp() if p is None else p
    q = log_q.exp() if q is None else q
    shape = torch.broadcast_shapes(p.shape, q.shape)
    m, log_m, diff = (_scratch(work, p, i, shape) for i in range(3))
    torch.add(p, q, out=m)
    m.mul_(0.5)
    if not checked:
        both_masked = m == 0  # 0 · log 0 = 0 where both sides mask a token
    m.clamp_min_(torch.finfo(m.dtype).tiny)
    torch.log(m, out=log_m)
    if variant == "paper":
        torch.sub(log_m.mul_(2), log_p, out=diff)
        diff.sub_(log_q)
        if not checked:
            diff.masked_fill_(both_masked, 0.0)
        return (0.5 / shape[-1]) * rowdot(m, diff)
    torch.sub(log_p, log_m, out=diff)
    first = _weighted(p, diff, checked)
    torch.sub(log_q, log_m, out=diff)
    return (0.5 * (first + _weighted(q, diff, checked))).clamp_min(0.0)


def token_rank(logits: Float[Tensor, "*batch vocab"], ids: Int[Tensor, "*batch"]) -> Int[Tensor, "*batch"]:
    """Rank of token ``ids`` under ``logits``: how many tokens score strictly higher (0 = top-1)."""
    target = logits.gather(-1, ids.unsqueeze(-1).long())
    return (logits > target).sum(-1)


def cosine_similarity(
    a: Float[Tensor, "*batch d"], b: Float[Tensor, "*batch d"], eps: float = 1e-12
) -> Float[Tensor, "*batch"]:
    """cos(a, b) = a·b / max(‖a‖ ‖b‖, eps), over the last dimension."""
    dot = (a * b).sum(-1)
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


PAPER_HEATMAP_ROWS = 40  # heatmap.py: ``all_js[:40]`` ("set 40 to enhance images for greater beauty and clarity")


def column_max_abs_scale(matrix: Float[Tensor, "row col"], rows: int | None = None) -> Float[Tensor, "kept col"]:
    """The paper's heatmap normalisation (sklearn ``MaxAbsScaler``, quirk Q4): each column divided by its max |x|.

    ``rows``: keep only the first ``rows`` rows before fitting, as heatmap.py does (``all_js[:40]``, then
    ``MaxAbsScaler().fit_transform``): the result is ``[min(rows, R), col]`` and equals
    ``MaxAbsScaler().fit_transform(matrix[:rows])``; later rows are dropped, not scaled (pass
    :data:`PAPER_HEATMAP_ROWS` for the paper's 40). ``None`` fits and returns every row.
    Columns that are all zero are left unchanged (scale 1), as sklearn does.
    """
    if rows is not None:
        if rows < 1:
            raise InputError(f"rows must be at least 1, got {rows}")
        matrix = matrix[:rows]
    scale = matrix.abs().amax(0, keepdim=True)
    return matrix / torch.where(scale == 0, torch.ones_like(scale), scale)
