"""Where the image enters: attention-knockout curves per flow, beside the critical layer of the same answers.

Composes :class:`~vlm_lens.probes.AttentionKnockout` (the relative change of the answer's probability when a flow is
blocked in a window of decoder layers) with the per-token evidence of :mod:`.tokens` (the critical layer of the first
generated token, read with the correct lens on a greedy trace, and its grounded critical layer: from where the answer
would not be the top-1 with the image blanked). Per sample only the curves, the answer and its critical layers are
kept; the aggregate is the mean and median relative change per flow and window start.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from vlm_lens.experiments.analysis.records import Sample
from vlm_lens.probes.knockout import DEFAULT_FLOWS, AttentionKnockout, window_for


def first_token_critical(model, inputs: list) -> list[tuple[int | None, int | None]]:
    """``(critical, grounded critical)`` of each input's first generated token (stack indices): the report's detector
    (correct lens) on a one-token greedy trace, and :func:`~.evidence.grounded_critical` against the same sequence
    with the image blanked (one more forward)."""
    from vlm_lens.experiments.analysis import evidence as ev
    from vlm_lens.experiments.analysis.confirmation import SkipConfirmer
    from vlm_lens.experiments.analysis.knowledge_evolution import detect_tokens, lens_probe, trace_samples
    from vlm_lens.probes import DistributionShift

    special = set(model.tokenizer.all_special_tokens)
    out: list[tuple[int | None, int | None]] = []
    for trace in trace_samples(model, inputs, 1):
        if not trace.n_steps:
            out.append((None, None))
            continue
        probe = lens_probe("correct", None, model.n_layers)
        lens = probe(trace)
        confirmer = SkipConfirmer(trace)
        # the round-2 skip test, with which the planted-critical figures of docs/experiments.md were measured (it
        # runs the blank-image forward this function needs anyway; the swap test would add reference forwards)
        row = detect_tokens(lens, DistributionShift.from_lens_result(lens), special, model.tokenizer,
                            ev.DetectionConfig(test="skip"), confirmer, probe.lens)[0]  # fmt: skip
        blank = confirmer.blank_top1(probe.lens)
        top1 = lens["topk_ids"][:, 0, 0].tolist()
        critical = row.critical if row.kind == "stable" else None  # with an event, critical is the leader's
        grounded = None if blank is None else ev.grounded_critical(top1, [b[0] for b in blank], critical)
        out.append((row.critical, grounded))
    return out


def run(model, samples: Sequence[Sample], flows: Sequence[str] = DEFAULT_FLOWS, window: int | None = None, *,
        batch_size: int = 16, critical: bool = True,
        progress: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
    """Knockout curves of every sample (``batch_size`` per forward) and their aggregate; ``critical=False`` skips the
    critical layers (one greedy trace per sample)."""
    probe = AttentionKnockout(flows, window)
    starts = probe.starts(model.n_layers)
    started = time.perf_counter()
    rows: list[dict] = []
    for first in range(0, len(samples), batch_size):
        chunk = list(samples[first : first + batch_size])
        inputs = [model.prepare(s.image, s.prompt) for s in chunk]
        results = probe.batch(inputs, model=model, batch_size=batch_size)
        criticals = first_token_critical(model, inputs) if critical else [(None, None)] * len(chunk)
        for i, (sample, result, (crit, grounded)) in enumerate(zip(chunk, results, criticals), first):
            answer = result.provenance["answer"]
            rows.append({"name": sample.name or str(i), "question": sample.prompt, "answer_token": answer,
                         "correct": None if sample.answer is None else answer.strip("▁ ") == sample.answer.split()[0],
                         "baseline_prob": float(result["baseline_prob"]), "critical_layer": crit,
                         "grounded_critical_layer": grounded,
                         "relative_change": {f: result["relative_change"][k].tolist() for k, f in enumerate(probe.flows)}})  # fmt: skip
        if progress is not None:
            progress(len(rows), len(samples))
    seconds = time.perf_counter() - started
    return {"model": model.name, "n_layers": model.n_layers, "flows": list(probe.flows), "window_starts": starts,
            "window": window_for(model.n_layers) if window is None else window, "samples": rows,
            "aggregate": aggregate(rows, list(probe.flows), len(starts)),
            "cost": {"forwards_per_sample": 1 + len(probe.flows) * len(starts), "seconds": round(seconds, 2),
                     "seconds_per_sample": round(seconds / max(1, len(rows)), 3),
                     "critical_traces": len(rows) if critical else 0, "batch_size": batch_size}}  # fmt: skip


def aggregate(rows: list[dict], flows: list[str], n_windows: int) -> dict:
    """Mean and median relative change per flow and window start, and the critical layers' median and quartiles."""
    out: dict = {"mean": {}, "median": {}, "n": len(rows)}
    for flow in flows:
        columns = [[r["relative_change"][flow][w] for r in rows] for w in range(n_windows)]
        out["mean"][flow] = [statistics.fmean(c) if c else None for c in columns]
        out["median"][flow] = [statistics.median(c) if c else None for c in columns]
    from vlm_lens.experiments.analysis.summary_stats import order_stats

    for key in ("critical_layer", "grounded_critical_layer"):
        stats = order_stats([r[key] for r in rows if r.get(key) is not None])
        out[key] = None if not stats["n"] else {k: int(v) for k, v in stats.items()}  # layers are integers
    return out
