"""Knowledge-evolution stage segmentation (paper §3–§4): critical layer, mutation events, stages — from evidence.

For every generated token of every sample and every lens variant (``correct``, ``paper``, and ``tuned`` when a tuned
lens is given), one streaming lens pass gives the top-1 token at each stack layer (0 = embeddings, n = output) and
the probability curve of every token that is top-1 somewhere. :mod:`vlm_lens.experiments.analysis.evidence` then finds

- a **mutation event** when an established answer (top-1 for >= ``min_run`` layers, p >= ``establish_prob``, emerged
  from p < ``emerge_below``) is overturned before the output; its layer is where the leader loses the top-1;
- the **critical layer** of the answer that dominates the stabilization phase (the overturned leader when there is an
  event, else the emitted token), read on that answer's established run: by default where it becomes top-1
  (``critical_rule="top1"``); None when the emitted token's final run is not established.

Tokens are ``mutation`` (an event), ``stable`` (a critical layer, no event) or ``undetermined``. The aggregate reports
a mutation stage only when the bootstrap interval of the event share clears ``min_event_share``; otherwise two
stages and "no mutation stage detected". Stage intervals are half-open ``[start, end)`` over stack layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis.confirmation import SkipConfirmer
from vlm_lens.probes import DistributionShift, LogitLensProbe, TunedLensProbe
from vlm_lens.probes.lens_probes import late_layers
from vlm_lens.probes.result import ProbeResult
from vlm_lens.errors import InputError

LENS_VARIANTS = ("correct", "paper", "tuned")


@dataclass(frozen=True)
class EvolutionConfig:
    detection: ev.DetectionConfig = field(default_factory=ev.DetectionConfig)
    variants: tuple[str, ...] = ("correct", "paper")
    max_new_tokens: int = 16
    # EOS and other special tokens are predicted trivially early; by default they are reported per token but left
    # out of the aggregate.
    include_special: bool = False

    def __post_init__(self):
        unknown = set(self.variants) - set(LENS_VARIANTS)
        if unknown or not self.variants:
            raise InputError(f"variants must be among {LENS_VARIANTS}, got {self.variants}")


@dataclass
class Sample:
    """One (image, prompt) pair, with the reference answer when there is one; ``planted`` marks a question the
    model's planted prior is known to overturn (a counter-prior question of a planted fixture)."""

    image: Any
    prompt: str
    answer: str | None = None
    name: str = ""
    planted: bool = False


@dataclass
class TokenEvolution:
    step: int
    token: str
    special: bool
    critical: int | None
    mutation: int | None  # the mutation event's layer; None without an event
    leader: str | None  # the overturned (pre-mutation) answer
    leader_run: list[int] | None  # its established run [start, end] (inclusive)
    event_js: float | None  # adjacent JS across the overturn (layer mutation-1 -> mutation)
    flips: list[int]  # layers > critical whose top-1 differs from the layer below (descriptive)
    kind: str  # "stable" | "mutation" | "undetermined"
    final_prob: float
    # the lens-only candidate and its causal test (evidence.py, confirmation.py); None where there was no candidate
    candidate: int | None = None  # the candidate's layer (where its leader lost the top-1)
    candidate_leader: str | None = None
    confirmed: bool | None = None  # None: no candidate, or confirmation off
    confirm_skipped: list[int] | None = None  # decoder layers skipped by the window that restored (or last tried)
    confirm_top1: str | None = None  # the model's output at this step with those layers skipped
    grounded: bool | None = None  # the leader needs the image (None: not tested)


def top1_flips(top1: Sequence[int], after: int | None) -> list[int]:
    """Layers l > ``after`` whose top-1 token differs from layer l-1's."""
    start = 1 if after is None else after + 1
    return [l for l in range(start, len(top1)) if top1[l] != top1[l - 1]]


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
    planted: bool = False
    image: Any = field(repr=False, default=None)  # the input image (path or PIL), for the report
    question: str = ""  # the user's question (``prompt`` is the chat-templated text)
    confirm_forwards: int = 0  # teacher-forced forwards the causal test of candidates ran on this trace

    @property
    def correct(self) -> bool | None:
        if self.answer is None:
            return None
        return self.generated_text.strip() == self.answer.strip()

    def curves(self, variant: str, step: int, tokenizer) -> dict[str, list[float]]:
        """Per-layer probabilities at ``step`` of the paper's candidates (distinct top-1 tokens of the late layers,
        by first appearance) plus the overturned leader, if any: what the token-probability charts draw."""
        lens = self.lens[variant]
        n = len(lens.coords["layer"]) - 1
        top1 = lens["topk_ids"][:, step, 0].tolist()
        chosen = list(dict.fromkeys(top1[l] for l in late_layers(n)))
        row = self.tokens[variant][step]
        ids = lens["candidate_ids"][step].tolist()
        if row.leader is not None:
            leader = tokenizer.convert_tokens_to_ids(row.leader)
            chosen += [leader] if leader not in chosen else []
        return {tokenizer.convert_ids_to_tokens(i): lens["candidate_prob"][:, step, ids.index(i)].tolist() for i in chosen}


def lens_probe(variant: str, tuned_lens, n_layers: int):
    every_layer = list(range(n_layers + 1))  # candidates from every layer: each top-1 token's full curve
    if variant == "tuned":
        if tuned_lens is None:
            raise InputError("the 'tuned' variant needs a tuned lens: pass tuned_lens= (TunedLens.load(...))")
        return TunedLensProbe(tuned_lens, top_k=5, candidates=every_layer)
    return LogitLensProbe(variant=variant, top_k=5, candidates=every_layer)  # top-5 for the report's token grid


def detect_tokens(lens: ProbeResult, shift: ProbeResult, special_tokens, tokenizer,
                  config: ev.DetectionConfig = ev.DetectionConfig(), confirm=None, lens_of=None) -> list[TokenEvolution]:  # fmt: skip
    """Per-token evidence from one lens result (``LogitLensProbe(..., candidates=every layer)``).

    ``confirm``: the causal test of candidates (a :class:`~vlm_lens.experiments.analysis.confirmation.SkipConfirmer` of the
    trace), required when ``config.confirm`` is on; ``lens_of``: the lens ``lens`` was read with (the grounding test
    reads the blank-image run through it)."""
    if config.confirm and confirm is None:
        raise InputError("confirming candidate events needs the trace: pass confirm=SkipConfirmer(trace), or "
                         "DetectionConfig(confirm=False) for lens evidence only")  # fmt: skip
    rows = []
    for step, token in enumerate(lens.coords["target"]):
        prob = lens["prob"][:, step].tolist()
        ids = lens["candidate_ids"][step].tolist()
        curves = {i: lens["candidate_prob"][:, step, k].tolist() for k, i in enumerate(ids) if i >= 0}
        # every layer's top-1 is a candidate; reading it off the candidates keeps ties consistent with ``curves``
        best = lens["candidate_prob"][:, step, : len(curves)].nan_to_num(-1.0).argmax(-1).tolist()
        top1 = [ids[k] for k in best]
        event = ev.mutation_event(top1, curves, config)
        test = None
        if event is not None and config.confirm:
            test = confirm(step, event.leader, event.layer, config, run=event.leader_run, lens=lens_of)
        candidate = None if event is None else (event.layer, tokenizer.convert_ids_to_tokens(event.leader))
        if test is not None and not test.confirmed:
            event = None  # refuted: skipping the overturning layers did not bring the leader back
        if event is not None:
            crit, kind = event.critical, "mutation"
            leader, run = tokenizer.convert_ids_to_tokens(event.leader), list(event.leader_run)
            event_js = float(shift["js_adjacent"][event.layer - 1, step])
        else:
            crit = ev.answer_critical(top1, curves, config)
            kind = "undetermined" if crit is None else "stable"
            leader, run, event_js = None, None, None
        special = token in special_tokens
        rows.append(TokenEvolution(
            step, token, special, crit, None if event is None else event.layer, leader, run, event_js,
            top1_flips(top1, crit), kind, prob[-1], *(candidate or (None, None)),
            None if test is None else test.confirmed, None if test is None else list(test.skipped),
            None if test is None or test.top1 < 0 else tokenizer.convert_ids_to_tokens(test.top1), None if test is None else test.grounded))  # fmt: skip
    return rows


def analyze_trace(trace, name: str = "", answer: str | None = None, config: EvolutionConfig = EvolutionConfig(),
                  *, tuned_lens=None, planted: bool = False, image=None, question: str = "") -> SampleEvolution:  # fmt: skip
    """Per-token evidence of one traced generation, for every lens variant of ``config``."""
    model = trace.model
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_tokens)
    tokens: dict[str, list[TokenEvolution]] = {}
    lens_results, shift_results = {}, {}
    confirmer = SkipConfirmer(trace)  # shared by the variants: one forward per distinct skipped window
    for variant in config.variants:
        probe = lens_probe(variant, tuned_lens, model.n_layers)
        lens = probe(trace)  # one streaming pass per variant
        shift = DistributionShift.from_lens_result(lens)
        lens_results[variant], shift_results[variant] = lens, shift
        tokens[variant] = detect_tokens(lens, shift, special, tokenizer, config.detection, confirmer, probe.lens)
    return SampleEvolution(name, trace.inputs.prompt, trace.text, answer, tokens, lens_results, shift_results, trace,
                           planted, image, question, confirmer.forwards)  # fmt: skip


def token_evidence(trace, variant: str = "correct", *, detection: ev.DetectionConfig = ev.DetectionConfig(),
                   tuned_lens=None) -> list[TokenEvolution]:  # fmt: skip
    """Per generated token of one trace: what it is, where it emerged, and whether deep layers overturned an answer.

    Each :class:`TokenEvolution` row has ``token`` (the emitted token), ``critical`` (its critical layer: where the
    answer that dominates stabilization becomes the lens top-1; None when no answer was established), ``mutation``
    (the layer of a confirmed mutation event, or None), ``leader`` (the overturned answer) and the causal test's
    evidence: ``candidate`` / ``candidate_leader`` (what the lens suggested), ``confirmed``, ``confirm_skipped`` (the
    decoder layers whose skipping brought the leader back), ``confirm_top1`` (what the model then emitted) and
    ``grounded`` (the leader needs the image). Layers are stack indices: 0 = embeddings, l = after decoder layer l-1.
    ``variant``: ``"correct"`` (final norm + unembedding at every layer), ``"paper"`` or ``"tuned"`` (with
    ``tuned_lens``).
    """
    config = EvolutionConfig(detection=detection, variants=(variant,), max_new_tokens=max(1, trace.n_steps))
    return analyze_trace(trace, config=config, tuned_lens=tuned_lens).tokens[variant]


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


def aggregate(samples: Sequence[SampleEvolution], n_layers: int, include_special: bool = False,
              config: ev.DetectionConfig = ev.DetectionConfig()) -> dict:  # fmt: skip
    """Per variant: critical/mutation order statistics, the event share with its bootstrap interval, the stages."""
    import torch

    out: dict[str, Any] = {}
    for variant in samples[0].tokens if samples else ():
        per_sample = [[t for t in s.tokens[variant] if include_special or not t.special] for s in samples]
        rows = [t for ts in per_sample for t in ts]
        with_event = [t for t in rows if t.mutation is not None]
        crit = ev.order_stats([t.critical for t in rows if t.critical is not None])
        mut = ev.order_stats([t.mutation for t in with_event])
        event_crit = ev.order_stats([t.critical for t in with_event])
        share = ev.event_share_interval([sum(t.mutation is not None for t in ts) for ts in per_sample],
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


def run(model, samples: Sequence[Sample], config: EvolutionConfig = EvolutionConfig(), progress=None, *,
        tuned_lens=None) -> dict:  # fmt: skip
    """Trace every sample, analyse it, aggregate. Returns ``{"samples": [...], "aggregate": {...}, "config": ...}``.

    ``progress(done, total)`` is called after each sample."""
    analysed = []
    for i, sample in enumerate(samples):
        inputs = model.prepare(sample.image, sample.prompt)
        trace = model.trace_generation(inputs, max_new_tokens=config.max_new_tokens)
        analysed.append(analyze_trace(trace, sample.name or str(i), sample.answer, config, tuned_lens=tuned_lens,
                                      planted=sample.planted, image=sample.image, question=sample.prompt))  # fmt: skip
        if progress is not None:
            progress(i + 1, len(samples))
    aggregated = aggregate(analysed, model.n_layers, config.include_special, config.detection)
    return {"samples": analysed, "aggregate": aggregated, "config": asdict(config)}


def to_json(result: dict) -> dict:
    """The JSON-ready view of :func:`run`'s result (every number behind the report)."""
    samples = []
    for s in result["samples"]:
        samples.append({
            "name": s.name, "prompt": s.prompt, "generated_text": s.generated_text, "answer": s.answer,
            "correct": s.correct, "planted_prior": s.planted,
            "tokens": {v: [asdict(t) for t in rows] for v, rows in s.tokens.items()},
            "token_prob": {v: s.lens[v]["prob"].T.tolist() for v in s.lens},
            "js_adjacent": {v: s.shift[v]["js_adjacent"].T.tolist() for v in s.shift},
        })  # fmt: skip
    return {"config": result["config"], "aggregate": result["aggregate"], "samples": samples}
