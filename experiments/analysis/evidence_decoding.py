"""Evidence-guided decoding: correct only the tokens whose lens trajectory shows a confirmed mutation event.

At each step of a greedy generation (:func:`vlm_lens.guided.generate_corrected`) the residual stack at the decoded
position is read with the correct lens, and the report's detector runs on it (:mod:`.evidence`: the last established
answer that the deep layers overturned, :func:`~.evidence.mutation_event`). Only when there is such a candidate are
its causal tests run, on the sequence so far, exactly as the analysis runs them (:mod:`.confirmation`): skipping the
decoder layers around the overturn must bring the leader back as the output (``confirmation_windows``), and the leader
must need the image (with the image blanked it holds the top-1 at fewer than half of its run's layers). A confirmed
token is then replaced by the overturned leader (``blend=1``) or the output is blended toward the skipped run's
(``0 < blend < 1``: log-probabilities mixed); every other token is plain greedy. ``blend=0`` is plain greedy.

Cost: one lens projection of the stack per step; the causal forwards only at steps with a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.guided import skipping
from vlm_lens.probes.decoding import Method


@dataclass
class Evidence(Method):
    blend: float = 1.0
    config: ev.DetectionConfig = field(default_factory=ev.DetectionConfig)
    name: ClassVar[str] = "evidence"
    reads_layers: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.blend <= 1.0:
            raise InputError(f"blend must be in [0, 1] (0: plain greedy, 1: the overturned answer), got {self.blend}")

    def scores(self, model: Any, inputs: Any, step: Any) -> Tensor:
        if self.blend == 0:
            return step.logits
        probs = model.unembed(step.stack).softmax(-1)  # [layer, vocab]: the correct lens at every stack layer
        top1 = probs.argmax(-1).tolist()
        event = ev.mutation_event(top1, {v: probs[:, v].tolist() for v in set(top1)}, self.config)
        if event is None:
            return step.logits
        n = model.n_layers
        sequence = model.extend(inputs, step.ids[inputs.input_ids.shape[1] :]).model_inputs
        step.note.update(candidate=event.layer, leader=model.tokenizer.convert_ids_to_tokens(event.leader))
        short = event.leader_run[1] - event.leader_run[0] + 1 < self.config.last_layer_min_run
        restored = None
        for window in ev.confirmation_windows(event.layer, n, self.config):
            if window[-1] == n - 1 and short:
                continue  # no layer runs after this window: the output would be the leader by construction
            with skipping(model, window):
                skipped, _ = step.forward(sequence)
            skipped[model.placeholder_ids] = float("-inf")
            if int(skipped.argmax()) == event.leader:
                restored = skipped
                step.note["skipped"] = window
                break
        if restored is None:
            return step.logits
        if self.config.ground and "pixel_values" in sequence:
            _, blank = step.forward({**sequence, "pixel_values": torch.zeros_like(sequence["pixel_values"])})
            blank_top1 = model.unembed(blank).argmax(-1).tolist()
            start, end = event.leader_run
            held = sum(blank_top1[l] == event.leader for l in range(start, end + 1))
            if 2 * held >= end - start + 1:
                step.note["grounded"] = False
                return step.logits  # an input-independent default, not knowledge read off the image
        step.note["corrected"] = True
        if self.blend == 1:
            return torch.full_like(step.logits, float("-inf")).index_fill_(0, torch.tensor([event.leader]), 0.0)
        return (1 - self.blend) * step.logits.log_softmax(-1) + self.blend * restored.log_softmax(-1)
