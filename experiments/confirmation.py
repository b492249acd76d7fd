"""Causal confirmation of candidate mutation events: skip the layers that overturned the leader, see if it comes back.

A candidate (:func:`vlm_lens.experiments.evidence.mutation_event`) says, from the lens alone, that token v led from
layer s to e and lost the top-1 at stack layer m = e + 1. The test: run the traced sequence again (teacher-forced: the
prompt and the tokens generated before the step, exactly as in the trace) with decoder layers W skipped, for each
window W of :func:`~vlm_lens.experiments.evidence.confirmation_windows`, and read the model's output at that step.
The candidate is **confirmed** when some window makes v the output (the argmax over the vocabulary, placeholder ids
excluded, as generation does); it is **refuted** otherwise.

The skip test cannot tell an overturned *answer* from an overturned *default*: on a clean model a question-driven
prior ("two" for every count question) can lead the middle layers until the late layers read the count off the image;
skipping those layers brings the prior back, exactly as it brings back an overturned answer. The second test
(``ground=True``) asks whether the leader was read from the image: the same sequence is run once more with the image
blanked (pixel values set to 0, the processor's mean colour: an empty picture), and the leader is **grounded** when,
through the same lens, it holds the top-1 at fewer than half of its run's layers without the image. An event needs
both tests. Neither test has a probability threshold; both ask whether the output or the lens's top-1 changes.

Cost: one teacher-forced forward over the trace's sequence per *distinct window* tried on the trace, plus one
blank-image forward when a candidate passes the skip test, shared by every token and lens variant of that trace; a
trace without candidates costs nothing. The outputs of a forward are reduced
to one top-1 id per step at once (nothing of size [steps, vocab] is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_lens.experiments import evidence as ev
from vlm_lens.probes.interventions import skip_layer_hooks


@dataclass(frozen=True)
class Confirmation:
    confirmed: bool  # restored by a skip and (with ``ground``) grounded
    skipped: list[int]  # the window that restored the leader (or the last one tried)
    top1: int  # the output at the step with ``skipped`` skipped
    grounded: bool | None = None  # None: not tested (not restored, no image, or ``ground`` off)


class SkipConfirmer:
    """The causal test on one :class:`~vlm_lens.trace.GenerationTrace`; forwards are cached per window.

    ``confirmer(step, leader, layer, config)`` -> :class:`Confirmation`; ``confirmer.forwards`` counts the forwards run.
    """

    def __init__(self, trace):
        self.trace = trace
        self._top1: dict[tuple[int, ...], list[int]] = {}

    @property
    def forwards(self) -> int:
        return len(self._top1)

    def top1_with_skipped(self, window: list[int]) -> list[int]:
        """Per generated step: the model's output token id with decoder layers ``window`` skipped (teacher-forced)."""
        key = tuple(window)
        if key not in self._top1:
            model, trace = self.trace.model, self.trace
            logits = model.run_with_hooks(trace.inputs, fwd_hooks=skip_layer_hooks(window))[0, trace.step_positions]
            scores = logits.float()
            scores[:, model.placeholder_ids] = float("-inf")  # never generated
            self._top1[key] = scores.argmax(-1).tolist()
        return self._top1[key]

    def blank_top1(self, lens) -> list[list[int]] | None:
        """``[layer][step]``: the lens's top-1 token at each generated step with the image blanked (teacher-forced);
        None when the inputs carry no image."""
        key = ("blank", id(lens))
        if key not in self._top1:
            import dataclasses

            import torch

            model, trace = self.trace.model, self.trace
            inputs = trace.inputs.model_inputs
            if "pixel_values" not in inputs:
                return None
            blank = dataclasses.replace(trace.inputs, model_inputs={**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])})
            _, cache = model.run_with_cache(blank, names_filter=model.resid_names)
            stack = cache.resid_stack(trace.step_positions)  # [n+1, steps, d]
            # one layer at a time: never [layers, steps, vocab] in memory
            self._top1[key] = [lens.logits(model, stack[l : l + 1], [l])[0].float().argmax(-1).tolist()
                               for l in range(stack.shape[0])]  # fmt: skip
        return self._top1[key]

    def __call__(self, step: int, leader: int, layer: int, config: ev.DetectionConfig, *, run=None,
                 lens=None) -> Confirmation:  # fmt: skip
        """The causal tests of the candidate (``leader`` lost the top-1 at stack ``layer``; ``run`` = its run
        ``(start, end)`` and ``lens`` the lens it was read with, for the grounding test)."""
        windows = ev.confirmation_windows(layer, self.trace.model.n_layers, config)
        top1 = -1
        for window in windows:
            top1 = self.top1_with_skipped(window)[step]
            if top1 == leader:
                if not config.ground or run is None or lens is None:
                    return Confirmation(True, window, top1)
                blank = self.blank_top1(lens)
                if blank is None:
                    return Confirmation(True, window, top1)
                held = sum(blank[l][step] == leader for l in range(run[0], run[1] + 1))
                grounded = 2 * held < run[1] - run[0] + 1
                return Confirmation(grounded, window, top1, grounded)
        return Confirmation(False, windows[-1] if windows else [], top1)


def forwards_per_trace(confirmers) -> float:
    """Mean number of confirmation forwards per trace (the measured cost)."""
    confirmers = list(confirmers)
    return sum(c.forwards for c in confirmers) / len(confirmers) if confirmers else 0.0
