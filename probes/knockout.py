"""Attention knockout across a sliding window of decoder layers (Zhang et al., "Cross-modal Information Flow in
Multimodal Large Language Models", arXiv 2411.18620).

For a flow ``"A->B"`` (information from the positions of role A to those of role B) and each window start s, the
attention edges from B's queries to A's keys are blocked in decoder layers ``s .. s+w-1``
(:meth:`HookedVLM.block_attention`), and the answer's probability at the last prompt position is compared with the
unblocked forward:

    relative_change[f, s] = (p_blocked[f, s] - p) / p

where p is the probability of the answer's first token (the model's own greedy choice unless an answer is given).
A change near 0 means nothing the answer needs flows along A->B in that window; a large negative change means it
does. One forward per (flow, window) plus one; many samples share each forward (padded on the right, each row read at
its own last prompt position; ``batch_size`` rows at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError, OutOfRangeError
from vlm_lens.probes.base import Probe, Source, register_probe
from vlm_lens.probes.result import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.inputs import VLMInputs

DEFAULT_FLOWS = ("image->question", "image->last", "question->last")
PAPER_WINDOW, PAPER_LAYERS = 9, 32  # Zhang et al.: a window of 9 layers on 32-layer models


def window_for(n_layers: int) -> int:
    """The paper's window scaled to depth: ``round(9 * n_layers / 32)``, at least 1 (2 on 8 layers)."""
    return max(1, round(PAPER_WINDOW * n_layers / PAPER_LAYERS))


def parse_flow(flow: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``"image->last"`` -> ``(keys, queries)`` = ``(("image",), ("last",))``; ``"image+question->last"`` joins roles."""
    from vlm_lens.attention_block import ROLES

    source, arrow, target = flow.partition("->")
    if not arrow or not source.strip() or not target.strip():
        raise InputError(f"a flow is written 'from->to' with token roles ({', '.join(ROLES)}), got {flow!r}")
    keys, queries = (tuple(r.strip() for r in side.split("+")) for side in (source, target))
    for role in keys + queries:
        if role not in ROLES:
            raise InputError(f"flow {flow!r}: unknown token role {role!r}; choose from {', '.join(ROLES)}")
    return keys, queries


def relative_change(blocked: Float[Tensor, "*any"], baseline: Float[Tensor, "*any"]) -> Float[Tensor, "*any"]:
    """``(p_blocked - p) / p``, elementwise (broadcast ``baseline`` over flows and windows)."""
    return (blocked - baseline) / baseline


@register_probe
class AttentionKnockout(Probe):
    """``relative_change`` and ``answer_prob`` ``[flow, window]`` (window = its first decoder layer) and
    ``baseline_prob`` ``[]`` for one input: ``probe(inputs, model=model, answer=None)``. Many inputs:
    :meth:`batch` (one result per input; ``batch_size`` inputs share each forward, padded on the right).

    ``flows``: ``"A->B"`` strings over token roles (:mod:`vlm_lens.attention_block`); ``window``: layers per window
    (default :func:`window_for` the model's depth); ``heads``: all when None.
    """

    name = "attention_knockout"

    def __init__(self, flows: Sequence[str] = DEFAULT_FLOWS, window: int | None = None,
                 heads: Sequence[int] | None = None):  # fmt: skip
        if isinstance(flows, str):
            flows = (flows,)
        if not flows:
            raise InputError("flows is empty: name at least one, e.g. 'image->last'")
        self.flows = {flow: parse_flow(flow) for flow in flows}
        if window is not None and (not isinstance(window, int) or window < 1):
            raise InputError(f"window must be a positive number of decoder layers, got {window!r}")
        self.window, self.heads = window, heads

    def starts(self, n_layers: int) -> list[int]:
        window = window_for(n_layers) if self.window is None else self.window
        if window > n_layers:
            raise OutOfRangeError(f"a window of {window} decoder layers is longer than the model ({n_layers} layers)")
        return list(range(n_layers - window + 1))

    def __call__(self, inputs: "VLMInputs", *, model: Any, answer: str | None = None) -> ProbeResult:  # type: ignore[override]
        return self.batch([inputs], model=model, answers=None if answer is None else [answer])[0]

    def batch(self, inputs: Sequence["VLMInputs"], *, model: Any, answers: Sequence[str | None] | None = None,
              batch_size: int = 16) -> list[ProbeResult]:  # fmt: skip
        """One result per input, ``batch_size`` inputs per forward."""
        answers = list(answers) if answers is not None else [None] * len(inputs)
        if len(answers) != len(inputs):
            raise InputError(f"{len(answers)} answers for {len(inputs)} inputs")
        out: list[ProbeResult] = []
        for first in range(0, len(inputs), max(1, batch_size)):
            chunk = slice(first, first + max(1, batch_size))
            out += self.run_batch(list(inputs[chunk]), answers[chunk], model)
        return out

    def run_batch(self, inputs: list["VLMInputs"], answers: list[str | None], model: Any) -> list[ProbeResult]:
        from vlm_lens.batch import VLMBatch

        window = window_for(model.n_layers) if self.window is None else self.window
        starts = self.starts(model.n_layers)
        batch = inputs[0] if len(inputs) == 1 else VLMBatch.pad(inputs, model.pad_token_id)
        rows = torch.arange(len(inputs))
        last = torch.tensor([sample.layout.last_prompt_position for sample in inputs])

        def answer_probs(logits: Tensor) -> Tensor:
            return logits[rows, last].float().softmax(-1)

        base = answer_probs(model(batch))
        targets = torch.tensor([int(base[i].argmax()) if a is None else model.to_single_token(a) for i, a in enumerate(answers)])
        baseline = base[rows, targets]
        blocked = torch.empty(len(inputs), len(self.flows), len(starts))
        for f, (keys, queries) in enumerate(self.flows.values()):
            for w, start in enumerate(starts):
                with model.block_attention(queries, keys, list(range(start, start + window)), self.heads):
                    blocked[:, f, w] = answer_probs(model(batch))[rows, targets]
        return [ProbeResult(
            self.name,
            {"relative_change": relative_change(blocked[i], baseline[i]), "answer_prob": blocked[i],
             "baseline_prob": baseline[i]},
            {"relative_change": ("flow", "window"), "answer_prob": ("flow", "window"), "baseline_prob": ()},
            {"flow": list(self.flows), "window": starts},
            provenance={"probe": self.name, "model": model.name, "family": model.family, "window": window,
                        "heads": self.heads, "answer": model.tokenizer.convert_ids_to_tokens(int(targets[i])),
                        "forwards": 1 + len(self.flows) * len(starts), "batched_with": len(inputs)},
            layout=sample.layout) for i, sample in enumerate(inputs)]  # fmt: skip

    def run(self, source: Source) -> ProbeResult:  # pragma: no cover - knockout runs the model on inputs
        raise InputError("AttentionKnockout is called as probe(inputs, model=model) or probe.batch([inputs, ...], model=model)")
