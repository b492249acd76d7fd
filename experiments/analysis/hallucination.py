"""Hallucination reversal (paper §6.2): the overturned answer, its layer, and two competing tokens' curves.

At the generation step where the model emitted ``wrong`` (by default the first step whose token differs from the
reference answer's), the lens gives the per-layer probabilities of the reference token and the emitted one, and the
evidence of :mod:`vlm_lens.experiments.analysis.evidence` at that step: the **pre-mutation leader** (the established answer that deep
layers overturned; None without a mutation event) and the **mutation layer** where it lost the top-1. The
**reversal layer** is the first stack layer from which ``wrong`` stays above ``correct`` to the end.
"""

from __future__ import annotations

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis.confirmation import SkipConfirmer
from vlm_lens.experiments.analysis.tokens import detect_tokens, lens_probe
from vlm_lens.probes import DistributionShift, TokenTrajectory


def reversal_layer(correct: list[float], wrong: list[float]) -> int | None:
    """First layer l such that wrong > correct at every layer >= l."""
    if not correct or wrong[-1] <= correct[-1]:
        return None
    layer = len(correct) - 1
    while layer > 0 and wrong[layer - 1] > correct[layer - 1]:
        layer -= 1
    return layer


def token_string(model, text: str) -> str:
    """The token string of ``text``, which must be one token (``model.to_single_token`` names the fix otherwise)."""
    return model.tokenizer.convert_ids_to_tokens(model.to_single_token(text))


def analyze(trace, correct: str, wrong: str | None = None, step: int | None = None, variant: str = "correct", *,
            tuned_lens=None, config: ev.DetectionConfig = ev.DetectionConfig(), evolution=None) -> dict:  # fmt: skip
    """Evidence and curves of ``correct`` (the reference) vs ``wrong`` (default: the emitted token) at ``step``.

    ``evolution``: the trace's :class:`~vlm_lens.experiments.analysis.knowledge_evolution.SampleEvolution`, when the
    analysis already ran; its per-token evidence is reused instead of a second lens pass."""
    model = trace.model
    correct_token = token_string(model, correct)
    wrong_named = None if wrong is None else token_string(model, wrong)
    tokens = trace.generated_tokens
    if step is None:
        if wrong_named in tokens:
            step = tokens.index(wrong_named)
        else:
            step = next((i for i, t in enumerate(tokens) if t != correct_token), 0)
    if not 0 <= step < len(tokens):
        raise InputError(f"step {step} is outside the {len(tokens)} generated tokens")
    wrong_token = tokens[step] if wrong_named is None else wrong_named
    probe = lens_probe(variant, tuned_lens, model.n_layers)
    if evolution is not None and variant in evolution.tokens:
        row = evolution.tokens[variant][step]
    else:
        lens = probe(trace)
        row = detect_tokens(lens, DistributionShift.from_lens_result(lens), set(model.tokenizer.all_special_tokens),
                            model.tokenizer, config, SkipConfirmer(trace), probe.lens)[step]  # fmt: skip
    curves = TokenTrajectory([correct_token, wrong_token], lens=probe.lens)(trace)
    curve_c = curves["prob"][:, step, 0].tolist()
    curve_w = curves["prob"][:, step, 1].tolist()
    rev = reversal_layer(curve_c, curve_w)
    led = rev is not None and any(c > w for c, w in zip(curve_c[:rev], curve_w[:rev]))
    return {
        "step": step, "correct_token": correct_token, "wrong_token": wrong_token, "variant": variant,
        "correct_prob": curve_c, "wrong_prob": curve_w, "reversal_layer": rev, "correct_led_before": led,
        "pre_mutation_leader": row.leader, "mutation_layer": row.mutation, "critical_layer": row.critical,
        "leader_is_reference": row.leader == correct_token, "layers": curves.coords["layer"],
    }  # fmt: skip
