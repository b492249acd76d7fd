"""Distribution and geometry metrics: small pure functions over the last dimension, any leading dims.

Distribution metrics take *logits* (un-normalised log-probabilities) and work through ``log_softmax`` in the
inputs' dtype (pass float64 for reference values), so no probability is ever exponentiated into 0 and logged back.
Natural logarithms throughout (nats).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from vlm_lens.errors import InputError

LN2 = math.log(2.0)


def kl_divergence(p_logits: Float[Tensor, "*batch vocab"], q_logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """KL(P || Q) = Σ_v P_v (log P_v − log Q_v), with P = softmax(p_logits), Q = softmax(q_logits). ≥ 0."""
    return kl_from_logprobs(p_logits.log_softmax(-1), q_logits.log_softmax(-1))


def _check_logits(*tensors: Tensor) -> None:
    """NaN (or +inf) logits have no distribution: refuse them rather than return NaN. −inf entries are masked tokens
    (probability 0) and are fine."""
    for t in tensors:
        if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
            raise InputError("logits contain NaN or +inf: they define no distribution; mask tokens with -inf and "
                             "check the hook or lens that produced them")  # fmt: skip


def _plogratio(p: Tensor, log_p: Tensor, other: Tensor) -> Tensor:
    """P (log P − other) with 0 · log 0 = 0: masked tokens (P = 0, log P = −inf) contribute nothing."""
    return torch.where(p > 0, p * (log_p - other), torch.zeros((), dtype=p.dtype, device=p.device))


def kl_from_logprobs(log_p: Float[Tensor, "*batch vocab"], log_q: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """KL(P || Q) from normalised log-probabilities (no second pass of log_softmax). 0 · log 0 = 0; +inf where Q
    masks a token P gives mass to (the true value)."""
    _check_logits(log_p, log_q)
    return _plogratio(log_p.exp(), log_p, log_q).sum(-1).clamp_min(0.0)


def js_divergence(
    p_logits: Float[Tensor, "*batch vocab"],
    q_logits: Float[Tensor, "*batch vocab"],
    variant: Literal["correct", "paper"] = "correct",
) -> Float[Tensor, "*batch"]:
    """Jensen-Shannon divergence between softmax(p_logits) and softmax(q_logits).

    ``correct``: JSD = ½ KL(P || M) + ½ KL(Q || M), M = ½ (P + Q); symmetric, in [0, ln 2] nats. log M is computed
    as ``logaddexp(log P, log Q) − ln 2``.

    ``paper``: the authors' expression (paper-spec §3.2, quirk Q3), literally
    ``0.5 * (F.kl_div(log_softmax(p), M, reduction="none").mean(-1) + F.kl_div(log_softmax(q), M, reduction="none").mean(-1))``
    = ½ (KL(M || P) + KL(M || Q)) / V: the reverse direction, averaged instead of summed over the vocabulary.
    """
    return js_from_logprobs(p_logits.log_softmax(-1), q_logits.log_softmax(-1), variant)


def js_from_logprobs(
    log_p: Float[Tensor, "*batch vocab"],
    log_q: Float[Tensor, "*batch vocab"],
    variant: Literal["correct", "paper"] = "correct",
) -> Float[Tensor, "*batch"]:
    """:func:`js_divergence` from normalised log-probabilities."""
    _check_logits(log_p, log_q)
    if variant == "paper":  # +inf where one side masks a token the other does not: the authors' KL(M || P) is infinite
        m = 0.5 * (log_p.exp() + log_q.exp())
        log_m = m.log()  # F.kl_div(log_p, m) = m (log m − log_p), with 0 · log 0 = 0 where both sides mask a token
        return 0.5 * (_plogratio(m, log_m, log_p).mean(-1) + _plogratio(m, log_m, log_q).mean(-1))
    if variant != "correct":
        raise InputError(f"variant must be 'correct' or 'paper', got {variant!r}")
    log_m = torch.logaddexp(log_p, log_q) - LN2
    kl_pm = _plogratio(log_p.exp(), log_p, log_m).sum(-1)  # finite even with masked tokens: M > 0 wherever P > 0
    kl_qm = _plogratio(log_q.exp(), log_q, log_m).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def entropy(logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """H(P) = −Σ_v P_v log P_v with P = softmax(logits); in [0, ln V]."""
    return entropy_from_logprobs(logits.log_softmax(-1))


def entropy_from_logprobs(log_p: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """H(P) from normalised log-probabilities (0 · log 0 = 0 for masked tokens)."""
    _check_logits(log_p)
    return -_plogratio(log_p.exp(), log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device)).sum(-1)


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
