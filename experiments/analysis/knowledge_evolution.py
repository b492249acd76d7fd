"""Knowledge-evolution stage segmentation (paper §3–§4): critical layer, mutation events, stages — from evidence.

For every generated token of every sample and every lens variant (``correct``, ``paper``, and ``tuned`` when a tuned
lens is given), one streaming lens pass gives the top-1 token at each stack layer (0 = embeddings, n = output) and
the probability curve of every token that is top-1 somewhere. :mod:`vlm_lens.experiments.analysis.evidence` then finds

- a **mutation event** when an established answer (top-1 for >= ``min_run`` layers, p >= ``establish_prob``, emerged
  from p < ``emerge_below``) is overturned before the output; its layer is where the leader loses the top-1;
- the **critical layer** of the answer that dominates the stabilization phase (the overturned leader when there is an
  event, else the emitted token), read on that answer's established run: by default where it becomes top-1
  (``critical_rule="top1"``); None when the emitted token's final run is not established.

Tokens are ``mutation`` (an event), ``stable`` (a critical layer, no event) or ``undetermined``.

One analysis, two entry points: :func:`analyze_sample` is the per-sample function both :func:`run` (in memory:
``skip``, ``compare``, ``validate``, notebooks) and the dataset path (:mod:`vlm_lens.experiments.runs.streaming`)
call, and :func:`~vlm_lens.experiments.analysis.stages.aggregate` the one aggregation (of live samples here, of
samples read back from the store there); :func:`sample_json` the one JSON view of a sample. The aggregate reports
a mutation stage only when the bootstrap interval of the event share clears ``min_event_share``; otherwise two
stages and "no mutation stage detected". Stage intervals are half-open ``[start, end)`` over stack layers.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Sequence

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import hallucination as hal
from vlm_lens.experiments.analysis.confirmation import SkipConfirmer
from vlm_lens.experiments.analysis.records import (
    LENS_VARIANTS,
    EvolutionConfig,
    Sample,
    SampleEvolution,
    TokenEvolution,  # fmt: skip
)
from vlm_lens.experiments.analysis.references import References
from vlm_lens.experiments.analysis.stages import aggregate, stages_from
from vlm_lens.experiments.analysis.tokens import detect_tokens, lens_probe, top1_flips
from vlm_lens.probes import DistributionShift

__all__ = ["LENS_VARIANTS", "EvolutionConfig", "Sample", "SampleEvolution", "TokenEvolution", "aggregate",
           "analyze_sample", "analyze_trace", "detect_tokens", "hallucination_of", "lens_probe", "run", "sample_json",
           "stages_from", "to_json", "token_evidence", "top1_flips", "trace_samples"]  # fmt: skip


def analyze_trace(trace, name: str = "", answer: str | None = None, config: EvolutionConfig = EvolutionConfig(),
                  *, tuned_lens=None, planted: bool = False, image=None, question: str = "",
                  references=None, index: int = 0) -> SampleEvolution:  # fmt: skip
    """Per-token evidence of one traced generation, for every lens variant of ``config``; ``references`` (a
    :class:`~vlm_lens.experiments.analysis.references.References`; None: the bundled images) are the pictures the
    image-swap test re-runs the sequence with, ``image`` the sample's own (never its own reference), ``index`` its
    position in the run (which pictures of the pool it takes)."""
    model = trace.model
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_tokens)
    tokens: dict[str, list[TokenEvolution]] = {}
    lens_results, shift_results = {}, {}
    confirmer = SkipConfirmer(trace, references, image, index)  # shared by the variants: each forward runs once
    for variant in config.variants:
        probe = lens_probe(variant, tuned_lens, model.n_layers)
        lens = probe(trace)  # one streaming pass per variant
        shift = DistributionShift.from_lens_result(lens)
        lens_results[variant], shift_results[variant] = lens, shift
        tokens[variant] = detect_tokens(lens, shift, special, tokenizer, config.detection, confirmer, probe.lens)
    return SampleEvolution(name, trace.inputs.prompt, trace.text, answer, tokens, lens_results, shift_results, trace,
                           planted, image, question, confirmer.forwards)  # fmt: skip


def token_evidence(trace, variant: str = "correct", *, detection: ev.DetectionConfig = ev.DetectionConfig(),
                   tuned_lens=None, references=None, image=None) -> list[TokenEvolution]:  # fmt: skip
    """Per generated token of one trace: what it is, where it emerged, and whether deep layers overturned an answer.

    Each :class:`TokenEvolution` row has ``token`` (the emitted token), ``critical`` (its critical layer: where the
    answer that dominates stabilization becomes the lens top-1; None when no answer was established), ``mutation``
    (the layer of a confirmed mutation event, or None), ``leader`` (the overturned answer) and the causal test's
    evidence: ``candidate`` / ``candidate_leader`` (what the lens suggested), ``confirmed``, ``swap_kept`` of
    ``swap_tried`` (reference pictures under which the overturning layer still wrote the emitted token; the image-swap
    test, the default), ``swap_held`` (references under which the leader still led) and ``leader_rank`` (its place
    among the output's top-5, None outside them) for the test's leader half, or, with ``DetectionConfig(test="skip")``, ``confirm_skipped`` / ``confirm_top1`` / ``grounded``.
    Layers are stack indices: 0 = embeddings, l = after decoder layer l-1. ``references``: other pictures of your
    run, as a :class:`~vlm_lens.experiments.analysis.references.References` or a list of images or paths (None: the
    images bundled with the package); ``image``: the trace's own picture (excluded, and the size references are
    resized to).
    ``variant``: ``"correct"`` (final norm + unembedding at every layer), ``"paper"`` or ``"tuned"`` (with
    ``tuned_lens``).
    """
    config = EvolutionConfig(detection=detection, variants=(variant,), max_new_tokens=max(1, trace.n_steps))
    if references is not None and not isinstance(references, References):
        references = References.from_images(references, detection.references)
    return analyze_trace(trace, config=config, tuned_lens=tuned_lens, references=references, image=image).tokens[variant]


def hallucination_of(evolution: SampleEvolution, answer: str | None, config: EvolutionConfig, tuned_lens=None) -> dict:
    """Per lens variant, the reversal analysis (:func:`vlm_lens.experiments.analysis.hallucination.analyze`) of a wrong
    single-token answer; empty when the answer is right, absent, longer than one word, or not one token."""
    trace = evolution.trace
    if answer is None or evolution.correct or len(answer.split()) != 1 or not trace.n_steps:
        return {}
    out = {}
    for variant in config.variants:
        try:
            out[variant] = hal.analyze(trace, answer, variant=variant, tuned_lens=tuned_lens, config=config.detection,
                                       evolution=evolution)  # fmt: skip
        except ValueError:  # the reference answer is not one token of this vocabulary
            return {}
    return out


def analyze_sample(trace, name: str, answer: str | None, config: EvolutionConfig = EvolutionConfig(), *,
                   tuned_lens=None, planted: bool = False, question: str = "", image=None,
                   index: int = 0, references=None) -> SampleEvolution:  # fmt: skip
    """The per-sample analysis both entry points run: per-token evidence for every lens variant
    (:func:`analyze_trace`) and the hallucination reversal of a wrong single-token answer (:func:`hallucination_of`)."""
    evolution = analyze_trace(trace, name, answer, config, tuned_lens=tuned_lens, planted=planted, image=image,
                              question=question, references=references, index=index)  # fmt: skip
    evolution.index = index
    evolution.hallucination = hallucination_of(evolution, answer, config, tuned_lens)
    return evolution


def trace_samples(model, inputs: list, max_new_tokens: int, prefixes=None) -> list:
    """Generation traces of prepared ``inputs``: one batched generation when there are several (``model.trace_batch``,
    equal to one-at-a-time traces within float32 noise), else ``model.trace_generation``. ``prefixes`` (a
    :class:`~vlm_lens.shared_prefix.PrefixCache` kept over a run): questions about one image share its prefill."""
    if not inputs:  # a batch whose rows were all unreadable
        return []
    if hasattr(model, "trace_batch") and (len(inputs) > 1 or prefixes is not None):
        return model.trace_batch(inputs, max_new_tokens, prefixes=prefixes)
    return [model.trace_generation(x, max_new_tokens) for x in inputs]


def run(model, samples: Sequence[Sample], config: EvolutionConfig = EvolutionConfig(),
        progress: Callable[[int, int], None] | None = None, *, tuned_lens=None, batch_size: int = 1) -> dict:  # fmt: skip
    """Trace every sample, analyse it (:func:`analyze_sample`), aggregate. Returns ``{"samples": [...],
    "aggregate": {...}, "config": ...}`` with every :class:`SampleEvolution` (traces and lens results kept: this is the
    in-memory path; for many samples use :func:`vlm_lens.experiments.pipeline.analyze`, which streams them into a
    store). ``batch_size`` > 1 traces samples together (as the dataset path does); ``progress(done, total)`` is called
    after each batch. The image-swap test's reference pictures are the run's first distinct images
    (:class:`~vlm_lens.experiments.analysis.references.References`)."""
    analysed = []
    references = References.from_images((s.image for s in samples), config.detection.references)
    for start in range(0, len(samples), max(1, batch_size)):
        chunk = list(samples[start : start + max(1, batch_size)])
        traces = trace_samples(model, [model.prepare(s.image, s.prompt) for s in chunk], config.max_new_tokens)
        for i, (sample, trace) in enumerate(zip(chunk, traces), start):
            analysed.append(analyze_sample(trace, sample.name or str(i), sample.answer, config, tuned_lens=tuned_lens,
                                           planted=sample.planted, question=sample.prompt, image=sample.image,
                                           index=i, references=references))  # fmt: skip
        if progress is not None:
            progress(len(analysed), len(samples))
    aggregated = aggregate(analysed, model.n_layers, config.include_special, config.detection)
    return {"samples": analysed, "aggregate": aggregated, "config": asdict(config)}


def sample_json(s) -> dict:
    """The JSON view of one analysed sample (live or read back from a store): what report.json's ``samples`` hold."""
    return {"name": s.name, "index": s.index, "prompt": s.prompt, "question": s.question,
            "generated_text": s.generated_text, "answer": s.answer, "correct": s.correct, "planted_prior": s.planted,
            "tokens": {v: [asdict(t) for t in rows] for v, rows in s.tokens.items()},
            "token_prob": {v: s.lens[v]["prob"].T.tolist() for v in s.lens},
            "js_adjacent": {v: s.shift[v]["js_adjacent"].T.tolist() for v in s.shift}}  # fmt: skip


def to_json(result: dict) -> dict:
    """The JSON-ready view of :func:`run`'s result: the ``config``, ``aggregate`` and ``samples`` of report.json."""
    return {"config": result["config"], "aggregate": result["aggregate"],
            "samples": [sample_json(s) for s in result["samples"]]}  # fmt: skip
