"""From per-token evidence to the run's stages: order statistics, the event share with its bootstrap interval, and
the rapid-evolution / stabilization / mutation boundaries (half-open ``[start, end)`` over stack layers)."""

from __future__ import annotations

from typing import Any, Sequence

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import summary_stats as ss


def stages_from(critical: dict, events: dict, event_criticals: dict, share: dict, n_layers: int,
                config: ev.DetectionConfig) -> dict | None:  # fmt: skip
    """Stage boundaries from the aggregate evidence (half-open ``[start, end)`` intervals over stack layers).

    c = median critical layer; the mutation stage exists only when the lower bootstrap bound of the event share
    exceeds ``min_event_share``; then m = median event layer, and if c >= m (clean tokens answering late) c falls back
    to the median critical layer of the event tokens, which lies below m because each is below its own event.
    """
    if critical["median"] is None and event_criticals["median"] is None:
        return None
    detected = share["low"] is not None and share["low"] > config.min_event_share
    c = int(critical["median"] if critical["median"] is not None else event_criticals["median"])
    out = {"critical_layer": c, "critical_source": "all tokens", "last_layer": n_layers, "mutation_detected": detected}
    if not detected:
        out.update(rapid_evolution=[0, c], stabilization=[c, n_layers + 1], mutation=None, mutation_layer=None)
        return out
    m = int(events["median"])
    if c >= m:
        c, out["critical_source"] = int(event_criticals["median"]), "tokens with events"
        out["critical_layer"] = c
    out.update(rapid_evolution=[0, c], stabilization=[c, m], mutation=[m, n_layers + 1], mutation_layer=m)
    return out


def aggregate(samples: Sequence[Any], n_layers: int, include_special: bool = False,
              config: ev.DetectionConfig = ev.DetectionConfig()) -> dict:  # fmt: skip
    """Per variant: critical/mutation order statistics, the event share with its bootstrap interval, the stages.

    ``samples``: analysed samples, live (:class:`~vlm_lens.experiments.analysis.records.SampleEvolution`) or read
    back from a store (:class:`~vlm_lens.experiments.runs.reduce.StoredSample`): the one aggregation of both paths."""
    import torch

    out: dict[str, Any] = {}
    for variant in samples[0].tokens if samples else ():
        per_sample = [[t for t in s.tokens[variant] if include_special or not t.special] for s in samples]
        rows = [t for ts in per_sample for t in ts]
        with_event = [t for t in rows if t.mutation is not None]
        crit = ss.order_stats([t.critical for t in rows if t.critical is not None])
        mut = ss.order_stats([t.mutation for t in with_event])
        event_crit = ss.order_stats([t.critical for t in with_event])
        share = ss.event_share_interval([sum(t.mutation is not None for t in ts) for ts in per_sample],
                                        [len(ts) for ts in per_sample], n_boot=config.bootstrap, seed=config.seed)  # fmt: skip
        js = torch.cat([s.shift[variant]["js_adjacent"][:, [include_special or not t.special for t in s.tokens[variant]]]
                        for s in samples], dim=1)  # [transition, tokens]  # fmt: skip
        out[variant] = {
            "critical_layer": crit,
            "mutation_layer": mut,
            "event_critical_layer": event_crit,
            "event_share": share,
            "stages": stages_from(crit, mut, event_crit, share, n_layers, config),
            "token_kinds": {k: sum(t.kind == k for t in rows) for k in ("stable", "mutation", "undetermined")},
            "stable_tokens": sorted({t.token for t in rows if t.kind == "stable"}),
            "mutation_tokens": sorted({t.token for t in rows if t.kind == "mutation"}),
            "events": [{"sample": s.name, "step": t.step, "token": t.token, "leader": t.leader, "layer": t.mutation,
                        "critical": t.critical, "planted": s.planted}
                       for s in samples for t in s.tokens[variant] if t.mutation is not None and (include_special or not t.special)],  # fmt: skip
            "median_js_adjacent": js.median(dim=1).values.tolist() if js.numel() else [],
        }
    answered = [s.correct for s in samples if s.correct is not None]
    out["accuracy"] = (sum(answered) / len(answered)) if answered else None
    return out
