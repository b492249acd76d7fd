"""Hallucination reversal (paper §6.2): two competing tokens' probabilities across layers and the reversal layer.

At the generation step where the model emitted ``wrong`` (or, by default, the first step where the emitted token
differs from the reference answer's token), both curves come from the lens; the **reversal layer** is the first
stack layer from which ``wrong`` stays above ``correct`` to the end (None when it never overtakes), and
``correct_led_before`` says whether ``correct`` led at some earlier layer.
"""

from __future__ import annotations

from typing import Literal

from probes import TokenTrajectory


def reversal_layer(correct: list[float], wrong: list[float]) -> int | None:
    """First layer l such that wrong > correct at every layer >= l."""
    if not correct or wrong[-1] <= correct[-1]:
        return None
    layer = len(correct) - 1
    while layer > 0 and wrong[layer - 1] > correct[layer - 1]:
        layer -= 1
    return layer


def _single_token(model, text: str) -> str:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens; compare single tokens")
    return model.tokenizer.convert_ids_to_tokens(ids)[0]


def analyze(trace, correct: str, wrong: str | None = None, step: int | None = None,
            variant: Literal["correct", "paper"] = "correct") -> dict:  # fmt: skip
    """Curves of ``correct`` vs ``wrong`` at ``step`` (default: where ``wrong`` was emitted, or the first step)."""
    model = trace.cache.model
    correct_token = _single_token(model, correct)
    if wrong is None:
        if step is None:
            step = 0
        wrong_token = trace.generated_tokens[step]
    else:
        wrong_token = _single_token(model, wrong)
        if step is None:
            step = trace.generated_tokens.index(wrong_token) if wrong_token in trace.generated_tokens else 0
    result = TokenTrajectory([correct_token, wrong_token], variant=variant)(trace)
    curve_c = result["prob"][:, step, 0].tolist()
    curve_w = result["prob"][:, step, 1].tolist()
    rev = reversal_layer(curve_c, curve_w)
    led = rev is not None and any(c > w for c, w in zip(curve_c[:rev], curve_w[:rev]))
    return {
        "step": step, "correct_token": correct_token, "wrong_token": wrong_token, "variant": variant,
        "correct_prob": curve_c, "wrong_prob": curve_w, "reversal_layer": rev, "correct_led_before": led,
        "layers": result.coords["layer"],
    }  # fmt: skip
