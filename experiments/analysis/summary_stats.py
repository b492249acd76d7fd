"""Order statistics and the bootstrap interval of an event share: the summaries the stage rule and the suite report."""

from __future__ import annotations

from typing import Sequence

import torch


def order_stats(values: Sequence[float]) -> dict:
    """Median and quartiles as order statistics (``lower`` interpolation): actual values, q1 <= median <= q3."""
    if not len(values):
        return {"median": None, "q1": None, "q3": None, "n": 0}
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), interpolation="lower").tolist()
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(values)}


def event_share_interval(events_per_sample: Sequence[int], tokens_per_sample: Sequence[int], *,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:  # fmt: skip
    """Share of tokens with a mutation event and its percentile bootstrap interval, resampling whole samples.

    share = sum(events) / sum(tokens); each bootstrap replicate draws len(samples) samples with replacement.
    """
    events = torch.tensor(list(events_per_sample), dtype=torch.float64)
    tokens = torch.tensor(list(tokens_per_sample), dtype=torch.float64)
    total = float(tokens.sum())
    if not len(tokens) or total == 0:
        return {"share": None, "low": None, "high": None, "events": int(events.sum()) if len(events) else 0, "tokens": 0}
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(tokens), (n_boot, len(tokens)), generator=generator)
    drawn_tokens = tokens[index].sum(1)
    shares = torch.where(drawn_tokens > 0, events[index].sum(1) / drawn_tokens.clamp(min=1), torch.zeros(()))
    alpha = (1 - level) / 2
    low, high = torch.quantile(shares, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"share": float(events.sum()) / total, "low": low, "high": high, "events": int(events.sum()), "tokens": int(total)}
