"""Corrected greedy decoding: one HF generation whose every step may be re-scored from what the same forward computed.

``generate_corrected(model, inputs, correction)`` runs HF ``generate`` (greedy, KV cache) on the plain HF modules and,
at each step, hands the correction a :class:`Step`: the final logits, the residual stack at the position being
decoded (every layer, read by torch hooks during that very forward: no second model, no re-run), and the logits of
an optional second batch row (a contrast input, e.g. a noised image, whose KV cache grows alongside). The correction
returns the scores the token is chosen from (argmax). A correction may also hold hooks for the whole generation
(:func:`vlm_lens.prefix_skip.skipping`: decoder layers made identity maps) and run extra teacher-forced forwards (``Step.forward``).

The corrections themselves (skip, DeCo, DoLa, VCD) are in :mod:`vlm_lens.probes.decoding`; the evidence-guided one,
which needs the detectors, in :mod:`vlm_lens.experiments.analysis.evidence_decoding`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.capture import cut_at_eos, plain_capture
from vlm_lens.errors import InputError
from vlm_lens.inputs import VLMInputs, check_positions


@dataclass
class Step:
    """What one decoding step computed: ``logits`` ``[vocab]`` (the model's, float32), ``stack`` ``[n_layers + 1,
    d_model]`` (the residual stack at the decoded position, when the correction reads layers), ``contrast`` ``[vocab]``
    (the second row's logits, when the correction has a contrast input), ``ids`` (prompt + tokens so far)."""

    index: int
    logits: Float[Tensor, " vocab"]
    ids: Int[Tensor, " pos"]
    stack: Float[Tensor, "layer d_model"] | None = None
    contrast: Float[Tensor, " vocab"] | None = None
    note: dict = field(default_factory=dict)  # what the correction did at this step (kept in the result)
    # one extra teacher-forced forward of model inputs -> (logits [vocab], stack [n+1, d] or None) at the last position
    forward: Callable[[dict], tuple[Tensor, Tensor | None]] | None = field(default=None, repr=False)


class Correction(Protocol):
    """A decoding correction. ``reads_layers``: the step needs ``stack``; ``contrast_inputs(model, inputs)``: a
    second input decoded alongside (or None); ``active(model)``: a context manager held for the whole generation
    (hooks); ``scores(model, inputs, step)``: the scores ``[vocab]`` the token is chosen from."""

    name: str
    reads_layers: bool

    def contrast_inputs(self, model: Any, inputs: VLMInputs) -> VLMInputs | None: ...

    def active(self, model: Any) -> contextlib.AbstractContextManager: ...

    def scores(self, model: Any, inputs: VLMInputs, step: Step) -> Float[Tensor, " vocab"]: ...


@dataclass
class CorrectedGeneration:
    """``ids`` (generated, up to and including the first EOS), ``text``, and per step what the correction did
    (``notes[j]``), and whether it changed the token plain greedy decoding would have chosen (``changed[j]``)."""

    ids: Int[Tensor, " step"]
    text: str
    method: str
    notes: list[dict]
    changed: list[bool]


def forward_last(model, model_inputs: dict, store: dict[str, list[Tensor]], names: Sequence[str]):
    """``(logits [vocab], stack [n+1, d] or None)`` at the last position of one teacher-forced forward of the plain
    HF model, the stack read from the capture hooks of :func:`generate_corrected` (``Step.forward``)."""
    for name in names:
        store[name].clear()
    logits = model.hf_model(**model_inputs).logits[0, -1].float()
    stack = torch.stack([store[name][-1][0, -1] for name in names]).float() if names else None
    for name in names:
        store[name].clear()
    return logits, stack


def generate_corrected(model, inputs: VLMInputs, correction: Correction, max_new_tokens: int = 32, *,
                       stop_at_eos: bool = True) -> CorrectedGeneration:  # fmt: skip
    """Greedy generation of ``inputs`` with ``correction`` choosing every token (see the module docstring)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    if not isinstance(inputs, VLMInputs):
        raise InputError("corrected decoding takes one prepared input (model.prepare(image, question))")
    check_positions(model, inputs.input_ids.shape[1], max_new_tokens)
    kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=False)
    contrast = correction.contrast_inputs(model, inputs)
    model_inputs = dict(inputs.model_inputs)
    if contrast is not None:
        if contrast.input_ids.shape != inputs.input_ids.shape:
            raise InputError("a contrast input must have the same tokens' shape as the input it is decoded beside")
        model_inputs = {k: torch.cat([v, contrast.model_inputs[k]]) for k, v in model_inputs.items()}
    names = list(model.resid_names) if correction.reads_layers else []
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    notes: list[dict] = []
    changed: list[bool] = []
    n_prompt = inputs.input_ids.shape[1]

    class Chooser(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stack = torch.stack([store[n][-1][0, -1] for n in names]).float() if names else None
            for name in names:
                store[name].clear()  # nothing per step is kept once read
            step = Step(len(notes), scores[0].float(), input_ids[0], stack, scores[1].float() if contrast is not None else None,
                        forward=lambda extra: forward_last(model, extra, store, names))  # fmt: skip
            with capture_paused(store):
                chosen = correction.scores(model, inputs, step).to(scores.dtype)
            notes.append(step.note)
            changed.append(int(chosen.argmax()) != int(scores[0].argmax()))
            return chosen.expand_as(scores).clone()

    with torch.no_grad(), plain_capture(model, names, store), correction.active(model):
        out = model.hf_model.generate(**model_inputs, **kwargs, logits_processor=LogitsProcessorList([Chooser()]))
    ids = cut_at_eos(out.sequences[0, n_prompt:], model.tokenizer.eos_token_id)
    text = model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    return CorrectedGeneration(ids, text, correction.name, notes[: len(ids)], changed[: len(ids)])


@contextlib.contextmanager
def capture_paused(store: dict[str, list[Tensor]]) -> Iterator[None]:
    """Extra forwards a correction runs inside a step leave the capture store as it was (empty)."""
    try:
        yield
    finally:
        for values in store.values():
            values.clear()
