"""Knowledge-evolution stage segmentation (paper §3–§4): critical layer, mutation layer(s), three stages.

For every generated token of every sample, with the lens of a given variant:

- **critical layer** (stack index; 0 = embeddings): rule ``"stays"`` (default) = the first layer from which the
  probability of the finally emitted token is >= ``threshold`` at every later layer; rule ``"first"`` = the first
  layer where it reaches ``threshold``. None when the token never reaches it (a low-confidence token).
- **mutation layer** (JS rule, borrowed from the authors' follow-up SHIFT, paper-spec §3.2): the layer l in
  (critical, n] with the largest adjacent-layer JS(P_{l-1} || P_l). None when critical = n.
- **top-1 flips**: layers l > critical where the lens's top-1 token differs from layer l-1's; ``last_flip`` is the
  last of them. A token with a flip after its critical layer is a "mutation token", otherwise "stable"
  (paper-spec §3.1).
- **stages** (stack indices): rapid evolution [0, critical), stabilization [critical, mutation), mutation
  [mutation, n].

Aggregates, separately for the correct and the paper lens: median and interquartile range over tokens (and samples)
of the critical and mutation layers, the median adjacent-JS profile, and the stage boundaries: the median critical
layer c, and the mutation layer found by the same JS rule on the median profile after c (so c < m <= n always).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch

from probes import DistributionShift, LogitLensProbe
from probes.result import ProbeResult


@dataclass(frozen=True)
class EvolutionConfig:
    threshold: float = 0.5
    rule: Literal["stays", "first"] = "stays"
    variants: tuple[str, ...] = ("correct", "paper")
    max_new_tokens: int = 16
    # EOS and other special tokens are predicted trivially early; by default they are reported per token but left
    # out of the aggregate stage boundaries.
    include_special: bool = False


@dataclass
class Sample:
    """One (image, prompt) pair, with the reference answer when there is one."""

    image: Any
    prompt: str
    answer: str | None = None
    name: str = ""


@dataclass
class TokenEvolution:
    step: int
    token: str
    special: bool
    critical: int | None
    mutation: int | None
    flips: list[int]
    last_flip: int | None
    kind: str  # "stable" | "mutation" | "undetermined"
    final_prob: float


def critical_layer(prob: Sequence[float], threshold: float = 0.5, rule: str = "stays") -> int | None:
    """The critical layer of one token from its per-layer probability ``prob`` (stack layers 0..n)."""
    values = list(prob)
    if rule == "first":
        return next((i for i, p in enumerate(values) if p >= threshold), None)
    if rule != "stays":
        raise ValueError(f"rule must be 'stays' or 'first', got {rule!r}")
    if not values or values[-1] < threshold:
        return None
    layer = len(values) - 1
    while layer > 0 and values[layer - 1] >= threshold:
        layer -= 1
    return layer


def mutation_layer(js_adjacent: Sequence[float], critical: int | None) -> int | None:
    """argmax over l in (critical, n] of JS(P_{l-1} || P_l); ``js_adjacent[t]`` is the transition t -> t+1."""
    if critical is None:
        return None
    n = len(js_adjacent)  # = number of stack layers - 1
    candidates = [(js_adjacent[l - 1], l) for l in range(critical + 1, n + 1)]
    return max(candidates)[1] if candidates else None


def top1_flips(top1: Sequence[int], after: int | None) -> list[int]:
    """Layers l > ``after`` whose top-1 token differs from layer l-1's."""
    start = 1 if after is None else after + 1
    return [l for l in range(start, len(top1)) if top1[l] != top1[l - 1]]


def _median_iqr(values: list[float]) -> dict:
    if not values:
        return {"median": None, "q1": None, "q3": None, "n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "median": float(t.median()),  # the lower median for even counts: always an actual layer
        "q1": float(t.quantile(0.25)),
        "q3": float(t.quantile(0.75)),
        "n": len(values),
    }


@dataclass
class SampleEvolution:
    name: str
    prompt: str
    generated_text: str
    answer: str | None
    tokens: dict[str, list[TokenEvolution]]  # by lens variant
    lens: dict[str, ProbeResult] = field(repr=False, default_factory=dict)
    shift: dict[str, ProbeResult] = field(repr=False, default_factory=dict)
    trace: Any = field(repr=False, default=None)

    @property
    def correct(self) -> bool | None:
        if self.answer is None:
            return None
        return self.generated_text.strip() == self.answer.strip()


def analyze_trace(trace, name: str = "", answer: str | None = None, config: EvolutionConfig = EvolutionConfig()) -> SampleEvolution:
    """Per-token evolution of one traced generation, for every lens variant of ``config``."""
    tokens: dict[str, list[TokenEvolution]] = {}
    lens_results, shift_results = {}, {}
    for variant in config.variants:
        # one streaming pass: every statistic below, plus the paper's candidate tokens for the trajectory charts
        lens = LogitLensProbe(variant=variant, top_k=1, candidates=True)(trace)
        shift = DistributionShift.from_lens_result(lens)
        lens_results[variant], shift_results[variant] = lens, shift
        rows = []
        for step, token in enumerate(trace.generated_tokens):
            prob = lens["prob"][:, step].tolist()
            crit = critical_layer(prob, config.threshold, config.rule)
            mut = mutation_layer(shift["js_adjacent"][:, step].tolist(), crit)
            flips = top1_flips(lens["topk_ids"][:, step, 0].tolist(), crit)
            kind = "undetermined" if crit is None else ("mutation" if flips else "stable")
            special = int(trace.generated_ids[step]) in trace.cache.model.tokenizer.all_special_ids
            rows.append(TokenEvolution(step, token, special, crit, mut, flips, flips[-1] if flips else None, kind, prob[-1]))
        tokens[variant] = rows
    return SampleEvolution(name, trace.inputs.prompt, trace.text, answer, tokens, lens_results, shift_results, trace)


def aggregate(samples: Sequence[SampleEvolution], n_layers: int, include_special: bool = False) -> dict:
    """Median/IQR of critical and mutation layers per variant, the stage boundaries, and token kinds."""
    out: dict[str, Any] = {}
    for variant in samples[0].tokens if samples else ():
        rows = [t for s in samples for t in s.tokens[variant] if include_special or not t.special]
        crit = _median_iqr([t.critical for t in rows if t.critical is not None])
        mut = _median_iqr([t.mutation for t in rows if t.mutation is not None])
        js = torch.cat([s.shift[variant]["js_adjacent"][:, [include_special or not t.special for t in s.tokens[variant]]]
                        for s in samples], dim=1)  # [transition, tokens]  # fmt: skip
        median_js = js.median(dim=1).values.tolist() if js.numel() else []
        stages = None
        c = crit["median"]
        if c is not None and int(c) < n_layers and median_js:
            # The stage boundary uses the same SHIFT rule as each token, on the median JS profile over tokens:
            # the largest median adjacent JS after the median critical layer (ordered by construction).
            c = int(c)
            m = mutation_layer(median_js, c)
            stages = {
                "rapid_evolution": [0, c],
                "stabilization": [c, m],
                "mutation": [m, n_layers],
                "critical_layer": c,
                "mutation_layer": m,
                "last_layer": n_layers,
            }
        kinds = {k: sum(t.kind == k for t in rows) for k in ("stable", "mutation", "undetermined")}
        out[variant] = {
            "critical_layer": crit,
            "mutation_layer": mut,
            "stages": stages,
            "token_kinds": kinds,
            "stable_tokens": sorted({t.token for t in rows if t.kind == "stable"}),
            "mutation_tokens": sorted({t.token for t in rows if t.kind == "mutation"}),
            "median_js_adjacent": median_js,
            "flip_layers": sorted(l for t in rows for l in t.flips),
        }
    answered = [s.correct for s in samples if s.correct is not None]
    out["accuracy"] = (sum(answered) / len(answered)) if answered else None
    return out


def run(model, samples: Sequence[Sample], config: EvolutionConfig = EvolutionConfig(), progress=None) -> dict:
    """Trace every sample, analyse it, aggregate. Returns ``{"samples": [...], "aggregate": {...}}``."""
    analysed = []
    for i, sample in enumerate(samples):
        inputs = model.prepare(sample.image, sample.prompt)
        trace = model.trace_generation(inputs, max_new_tokens=config.max_new_tokens)
        analysed.append(analyze_trace(trace, sample.name or str(i), sample.answer, config))
        if progress is not None:
            progress()
    aggregated = aggregate(analysed, model.n_layers, config.include_special)
    return {"samples": analysed, "aggregate": aggregated, "config": asdict(config)}


def to_json(result: dict) -> dict:
    """The JSON-ready view of :func:`run`'s result (every number behind the report)."""
    samples = []
    for s in result["samples"]:
        samples.append({
            "name": s.name, "prompt": s.prompt, "generated_text": s.generated_text, "answer": s.answer,
            "correct": s.correct,
            "tokens": {v: [asdict(t) for t in rows] for v, rows in s.tokens.items()},
            "token_prob": {v: s.lens[v]["prob"].T.tolist() for v in s.lens},
            "js_adjacent": {v: s.shift[v]["js_adjacent"].T.tolist() for v in s.shift},
        })  # fmt: skip
    return {"config": result["config"], "aggregate": result["aggregate"], "samples": samples}
