"""Per-token evidence from one lens result: the top-1 run at every layer, the mutation candidate and its causal
test, the critical layer (:mod:`vlm_lens.experiments.analysis.evidence` holds the rules)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis.records import TokenEvolution
from vlm_lens.probes import LogitLensProbe, TunedLensProbe
from vlm_lens.probes.result import ProbeResult


def top1_flips(top1: Sequence[int], after: int | None) -> list[int]:
    """Layers l > ``after`` whose top-1 token differs from layer l-1's."""
    start = 1 if after is None else after + 1
    return [l for l in range(start, len(top1)) if top1[l] != top1[l - 1]]


def lens_probe(variant: str, tuned_lens, n_layers: int):
    every_layer = list(range(n_layers + 1))  # candidates from every layer: each top-1 token's full curve
    if variant == "tuned":
        if tuned_lens is None:
            raise InputError("the 'tuned' variant needs a tuned lens: pass tuned_lens= (TunedLens.load(...))")
        return TunedLensProbe(tuned_lens, top_k=5, candidates=every_layer)
    if variant not in ("correct", "paper"):
        raise InputError(f"variant must be 'correct', 'paper' or 'tuned', got {variant!r}")
    return LogitLensProbe(variant="paper" if variant == "paper" else "correct", top_k=5, candidates=every_layer)  # top-5 for the report's token grid


def detect_tokens(lens: ProbeResult, shift: ProbeResult, special_tokens, tokenizer,
                  config: ev.DetectionConfig = ev.DetectionConfig(), confirm=None, lens_of=None) -> list[TokenEvolution]:  # fmt: skip
    """Per-token evidence from one lens result (``LogitLensProbe(..., candidates=every layer)``).

    ``confirm``: the causal test of candidates (a :class:`~vlm_lens.experiments.analysis.confirmation.SkipConfirmer` of the
    trace), required when ``config.confirm`` is on; ``lens_of``: the lens ``lens`` was read with (the grounding test
    reads the blank-image run through it)."""
    if config.confirm and confirm is None:
        raise InputError("confirming candidate events needs the trace: pass confirm=SkipConfirmer(trace), or "
                         "DetectionConfig(confirm=False) for lens evidence only")  # fmt: skip
    if config.confirm and config.test == "swap" and config.contender_k > lens["topk_ids"].shape[-1]:
        raise InputError(f"contender_k={config.contender_k} needs the lens's top-{config.contender_k} at the output; the "
                         f"lens kept top-{lens['topk_ids'].shape[-1]}: lower contender_k")  # fmt: skip
    rows = []
    not_answers = set(getattr(tokenizer, "all_special_ids", None) or [])
    for step, token in enumerate(lens.coords["target"]):
        prob = lens["prob"][:, step].tolist()
        ids = lens["candidate_ids"][step].tolist()
        curves = {i: lens["candidate_prob"][:, step, k].tolist() for k, i in enumerate(ids) if i >= 0}
        # every layer's top-1 is a candidate; reading it off the candidates keeps ties consistent with ``curves``
        best = lens["candidate_prob"][:, step, : len(curves)].nan_to_num(-1.0).argmax(-1).tolist()
        top1 = [ids[k] for k in best]
        event = ev.mutation_event(top1, curves, config, not_answers)
        test, rank = None, None
        if event is not None and config.confirm:
            test = confirm(step, event.leader, event.layer, config, run=event.leader_run, lens=lens_of)
            if test.held is not None:  # the image-swap test's leader half (evidence.leader_weighed)
                output_ids = lens["topk_ids"][-1, step].tolist()
                rank = output_ids.index(event.leader) if event.leader in output_ids else None
                weighed = ev.leader_weighed(test.held, test.tried or 0, rank, config)
                test = dataclasses.replace(test, confirmed=test.confirmed and weighed)
        candidate = None if event is None else (event.layer, tokenizer.convert_ids_to_tokens(event.leader))
        if test is not None and not test.confirmed:
            event = None  # refuted: skipping the overturning layers did not bring the leader back
        if event is not None:
            crit: int | None = event.critical
            kind = "mutation"
            leader, run = tokenizer.convert_ids_to_tokens(event.leader), list(event.leader_run)
            event_js = float(shift["js_adjacent"][event.layer - 1, step])
        else:
            crit = ev.answer_critical(top1, curves, config)
            kind = "undetermined" if crit is None else "stable"
            leader, run, event_js = None, None, None
        special = token in special_tokens
        candidate_layer, candidate_leader = candidate or (None, None)
        rows.append(TokenEvolution(
            step, token, special, crit, None if event is None else event.layer, leader, run, event_js,
            top1_flips(top1, crit), kind, prob[-1], candidate=candidate_layer, candidate_leader=candidate_leader,
            confirmed=None if test is None else test.confirmed,
            confirm_skipped=None if test is None or test.kept is not None else list(test.skipped),
            confirm_top1=None if test is None or test.top1 < 0 else tokenizer.convert_ids_to_tokens(test.top1),
            grounded=None if test is None else test.grounded, swap_kept=None if test is None else test.kept,
            swap_tried=None if test is None else test.tried, swap_held=None if test is None else test.held,
            leader_rank=rank, swap_kept_before=None if test is None else test.kept_before))  # fmt: skip
    return rows
