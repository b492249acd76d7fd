"""Causal confirmation of candidate mutation events: does the overturn need this image, and do its layers cause it?

**The image-swap test** (``DetectionConfig(test="swap")``, the default). A candidate says, from the lens alone, that
token v led up to stack layer m - 1 and lost the top-1 at stack layer m to the token the model went on to emit, e.
What decoder layer m - 1 *writes* at that step is read through the same lens: the token whose lens logit rises the most
from stack layer m - 1 to m, ``argmax_t (lens_m(t) - lens_{m-1}(t))``. The sequence is run again, teacher-forced (same
prompt, same tokens generated before the step), with the image replaced by each of the run's reference images
(:mod:`vlm_lens.experiments.analysis.references`). The candidate is **confirmed** when, for a strict majority of the
references, decoder layer m - 1 still writes e: the layer that overturned v pushes the emitted token whatever the
picture — a prior, not a reading of this image. A layer that revises an image-grounded draft ("blue" -> "purple" as
the model looks closer) writes the other pictures' answers instead, and is refuted. No probability threshold: the
test asks which token a layer writes, by majority over pictures.

The same reference runs give the test's **leader half** (round 4): ``held`` counts the references under which the
leader v still holds the lens top-1 at half of its run's layers or more. A v that holds under every reference (a
format word, a question's default) was not read off this image; with ``leader_test="either"`` such a v must at least
still be among the output's top-``contender_k`` candidates
(:func:`~vlm_lens.experiments.analysis.evidence.leader_weighed`, applied where the lens's output ranks are at hand).

**The skip test** (``test="skip"``, the round-2 rule):

A candidate (:func:`vlm_lens.experiments.analysis.evidence.mutation_event`) says, from the lens alone, that token v led from
layer s to e and lost the top-1 at stack layer m = e + 1. The test: run the traced sequence again (teacher-forced: the
prompt and the tokens generated before the step, exactly as in the trace) with decoder layers W skipped, for each
window W of :func:`~vlm_lens.experiments.analysis.evidence.confirmation_windows`, and read the model's output at that step.
The candidate is **confirmed** when some window makes v the output (the argmax over the vocabulary, placeholder ids
excluded, as generation does); it is **refuted** otherwise. A window that reaches the last decoder layer proves nothing
by itself: nothing runs after it, so the output *is* the lens at the leader's last layer (exactly, for the correct
lens). It is used only for a leader that held the top-1 for ``last_layer_min_run`` layers or more.

The skip test cannot tell an overturned *answer* from an overturned *default*: on a clean model a question-driven
prior ("two" for every count question) can lead the middle layers until the late layers read the count off the image;
skipping those layers brings the prior back, exactly as it brings back an overturned answer. The second test
(``ground=True``) asks whether the leader was read from the image: the same sequence is run once more with the image
blanked (pixel values set to 0, the processor's mean colour: an empty picture), and the leader is **grounded** when,
through the same lens, it holds the top-1 at fewer than half of its run's layers without the image. An event needs
both tests. Neither test has a probability threshold; both ask whether the output or the lens's top-1 changes.

Cost of the swap test: one teacher-forced forward of a batch of the reference images (four by default) for a trace
with at least one candidate, shared by every token and lens variant of the trace; nothing for a trace without candidates. The
references' residual stacks are kept at the generated steps only while the trace is analysed.

Cost of the skip test: one teacher-forced forward over the trace's sequence per *distinct window* tried on the trace (from the
window's first layer on, seeded by the trace's cached residual: :mod:`vlm_lens.prefix_skip`), plus one
blank-image forward when a candidate passes the skip test, shared by every token and lens variant of that trace; a
trace without candidates costs nothing. The outputs of a forward are reduced
to one top-1 id per step at once (nothing of size [steps, vocab] is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.prefix_skip import PrefixSkipper, can_reuse
from vlm_lens.probes.interventions import skip_layer_hooks


@dataclass(frozen=True)
class Confirmation:
    confirmed: bool  # every test that ran passed
    skipped: list[int]  # the window that restored the leader (or the last one tried)
    top1: int  # the output at the step with ``skipped`` skipped (-1: no window could be tested)
    grounded: bool | None = None  # the leader needs the image (None: not tested)
    kept: int | None = None  # swap test: references under which the overturning layer still writes the emitted token
    tried: int | None = None  # swap test: references the sequence was re-run with
    held: int | None = None  # swap test: references under which the leader still leads half its run (not read here)
    kept_before: int | None = None  # swap test: references under which the layer before wrote the emitted token


class SkipConfirmer:
    """The causal tests on one :class:`~vlm_lens.trace.GenerationTrace`; each forward runs at most once per trace.

    ``confirmer(step, leader, layer, config, run=..., lens=...)`` -> :class:`Confirmation`; ``confirmer.forwards``
    counts the forwards run (skip windows + the blank-image run).
    """

    def __init__(self, trace, references=None, image=None, index: int = 0):
        self.trace = trace
        self.index = index  # the sample's index in its run: which pictures of the pool it takes
        self.references = references  # a References (None: the bundled images) for the swap test
        self.image = image  # the sample's own image: never its own reference, and the size references are resized to
        self._swaps: list | None = None
        self._writes: dict[int, list[list[list[int]]]] = {}
        self._reads: dict[int, list[list[list[int]]]] = {}
        self._top1: dict[tuple[int, ...], list[int]] = {}
        self._blank: dict | None = None
        self._blank_lens: dict[int, list[list[int]]] = {}
        self._skipper: PrefixSkipper | None = None

    @property
    def forwards(self) -> int:
        return len(self._top1) + (self._blank is not None) + len(self._swaps or [])

    def _swap_stacks(self) -> list:
        """Per usable reference image: the residual stack ``[n+1, steps, d]`` at the generated steps of the sequence
        re-run with the image replaced (prompt and generated tokens unchanged)."""
        if self._swaps is None:
            from vlm_lens.experiments.analysis.references import References, open_rgb

            model, trace = self.trace.model, self.trace
            self._swaps = []
            if "pixel_values" not in trace.inputs.model_inputs and not trace.inputs.n_images:
                return self._swaps
            refs = self.references if self.references is not None else References.bundled()
            size = open_rgb(self.image).size if self.image is not None else None
            swapped = [swapped_inputs(model, trace.inputs, picture.resize(size) if size else picture)
                       for picture in refs.for_image(self.image, self.index)]  # fmt: skip
            swapped = [x for x in swapped if x is not None]
            if swapped:  # one forward for all references: same sequence length, so no padding
                from vlm_lens.batch import VLMBatch

                _, cache = model.run_with_cache(VLMBatch.pad(swapped, model.pad_token_id), names_filter=model.resid_names)
                self._swaps = [cache.sample(i).resid_stack(trace.step_positions) for i in range(len(swapped))]
        return self._swaps

    def reference_writes(self, lens) -> list[list[list[int]]]:
        """``[reference][layer][step]``: the token stack layer ``layer`` (1..n; index 0 unused, -1) writes at each
        generated step, read through ``lens``, with the image replaced by each reference."""
        if id(lens) not in self._writes:
            model = self.trace.model
            reads = [layer_reads(model, lens, stack) for stack in self._swap_stacks()]
            self._writes[id(lens)] = [writes for writes, _ in reads]
            self._reads[id(lens)] = [top1 for _, top1 in reads]
        return self._writes[id(lens)]

    def reference_top1(self, lens) -> list[list[list[int]]]:
        """``[reference][layer][step]``: the lens's top-1 token at each stack layer 0..n and generated step, with the
        image replaced by each reference."""
        self.reference_writes(lens)
        return self._reads[id(lens)]

    def swap_test(self, step: int, layer: int, lens, leader: int = -1, run: tuple[int, int] | None = None,
                  config: ev.DetectionConfig = ev.DetectionConfig()) -> Confirmation:  # fmt: skip
        """The image-swap test of a candidate that lost the top-1 at stack ``layer`` (see the module docstring).
        ``confirmed`` is the emitted-token half; ``held`` (given the leader and its run ``run``) feeds the leader half,
        :func:`~vlm_lens.experiments.analysis.evidence.leader_weighed`, which needs the lens's output ranks too."""
        emitted = int(self.trace.generated_ids[step])
        writes = self.reference_writes(lens)
        kept = sum(w[layer][step] == emitted for w in writes)
        before = sum(w[layer - 1][step] == emitted for w in writes) if layer > 1 else 0  # index 0: no write
        held = None
        if run is not None:
            held = sum(not ev.is_grounded([row[step] for row in top1], leader, run) for top1 in self.reference_top1(lens))
        confirmed = ev.emitted_written(kept, before, len(writes), config)
        return Confirmation(confirmed, [], -1, kept=kept, tried=len(writes), held=held, kept_before=before)

    def top1_with_skipped(self, window: list[int]) -> list[int]:
        """Per generated step: the model's output token id with decoder layers ``window`` skipped (teacher-forced)."""
        key = tuple(window)
        if key not in self._top1:
            model, trace = self.trace.model, self.trace
            if self._skipper is None and can_reuse(model, trace):
                self._skipper = PrefixSkipper(trace)  # from the window's first layer on, seeded by the trace's cache
            if self._skipper is not None:
                logits = self._skipper.forced_logits(window)
            else:
                logits = model.run_with_hooks(trace.inputs, fwd_hooks=skip_layer_hooks(window))[0, trace.step_positions]
            self._top1[key] = _output_ids(model, logits)
        return self._top1[key]

    def _blank_run(self) -> dict | None:
        """The teacher-forced run with the image blanked (pixel values 0): its residual stack at the generated steps
        ``[n+1, steps, d]``; None when the inputs carry no image."""
        if self._blank is None:
            import dataclasses

            import torch

            model, trace = self.trace.model, self.trace
            inputs = trace.inputs.model_inputs
            if "pixel_values" not in inputs:
                return None
            blank = dataclasses.replace(trace.inputs, model_inputs={**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])})
            _, cache = model.run_with_cache(blank, names_filter=model.resid_names)
            self._blank = {"stack": cache.resid_stack(trace.step_positions)}
        return self._blank

    def blank_top1(self, lens) -> list[list[int]] | None:
        """``[layer][step]``: the lens's top-1 token at each generated step with the image blanked; None without an
        image. One layer at a time: never [layers, steps, vocab] in memory."""
        run = self._blank_run()
        if run is None:
            return None
        if id(lens) not in self._blank_lens:
            model, stack = self.trace.model, run["stack"]
            self._blank_lens[id(lens)] = [lens.logits(model, stack[l : l + 1], [l])[0].float().argmax(-1).tolist()
                                          for l in range(stack.shape[0])]  # fmt: skip
        return self._blank_lens[id(lens)]

    def __call__(self, step: int, leader: int, layer: int, config: ev.DetectionConfig, *, run=None,
                 lens=None) -> Confirmation:  # fmt: skip
        """The causal test of ``config.test`` on the candidate (``leader`` lost the top-1 at stack ``layer``; ``run``
        = its run ``(start, end)`` and ``lens`` the lens it was read with, for the image tests)."""
        if config.test == "swap":
            if lens is None:
                raise InputError("the image-swap test reads layer writes through the candidate's lens: pass lens=")
            return self.swap_test(step, layer, lens, leader, run, config)
        n_layers = self.trace.model.n_layers
        windows = ev.confirmation_windows(layer, n_layers, config)
        short = run is not None and run[1] - run[0] + 1 < config.last_layer_min_run
        top1 = -1
        for window in windows:
            if window[-1] == n_layers - 1 and short:
                # no decoder layer runs after this window: the output is the lens at the leader's last layer, i.e. the
                # leader, by construction (exactly so for the correct lens). It proves nothing about a short lead.
                continue
            top1 = self.top1_with_skipped(window)[step]
            if top1 == leader:
                break
        else:
            return Confirmation(False, windows[-1] if windows else [], top1)
        grounded = None
        blank = self.blank_top1(lens) if config.ground and lens is not None and self._blank_run() is not None else None
        if blank is not None and run is not None:
            grounded = ev.is_grounded([row[step] for row in blank], leader, run)
        return Confirmation(grounded is not False, window, top1, grounded)


def swapped_inputs(model, inputs, picture):
    """``inputs`` (a full sequence: prompt + generated tokens, e.g. ``trace.inputs``) with its image inputs replaced by
    ``picture``'s; None when ``picture`` gives the prompt another number of image tokens (a processor that tiles by
    size)."""
    import dataclasses

    import torch

    prepared = model.prepare(picture, inputs.prompt)
    ids = inputs.model_inputs["input_ids"]
    n_prompt = prepared.input_ids.shape[1]
    if n_prompt > ids.shape[1] or not torch.equal(prepared.input_ids.cpu(), ids[:, :n_prompt].cpu()):
        return None
    swapped = dict(inputs.model_inputs)
    for key, value in prepared.model_inputs.items():
        # image tensors have the same shape for a same-sized picture; per-position inputs cover the longer sequence
        if key not in ("input_ids", "attention_mask") and key in swapped and swapped[key].shape == value.shape:
            swapped[key] = value
    return dataclasses.replace(inputs, model_inputs=swapped)


def layer_writes(model, lens, stack: Float[Tensor, "layer step d_model"]) -> list[list[int]]:
    """``[layer][step]``: for stack layers 1..n the token whose lens logit rises the most from layer l - 1 to l,
    ``argmax_t (lens_l(t) - lens_{l-1}(t))`` (index 0: -1). ``stack``: ``[n+1, steps, d]``. One layer at a time."""
    return layer_reads(model, lens, stack)[0]


def layer_reads(model, lens, stack: Float[Tensor, "layer step d_model"]) -> tuple[list[list[int]], list[list[int]]]:
    """``(writes, top1)``, both ``[layer][step]``: :func:`layer_writes`, and the lens's top-1 token at every stack
    layer 0..n, ``argmax_t lens_l(t)``, from the same pass over the layers."""
    writes, top1 = [[-1] * stack.shape[1]], []
    below = lens.logits(model, stack[0:1], [0])[0].float()
    top1.append(below.argmax(-1).tolist())
    for l in range(1, stack.shape[0]):
        here = lens.logits(model, stack[l : l + 1], [l])[0].float()
        writes.append((here - below).argmax(-1).tolist())
        top1.append(here.argmax(-1).tolist())
        below = here
    return writes, top1


def _output_ids(model, logits) -> list[int]:
    """The generated token of each row of ``logits`` ``[steps, vocab]`` (argmax; placeholder ids are never emitted)."""
    scores = logits.float()
    scores[:, model.placeholder_ids] = float("-inf")
    return scores.argmax(-1).tolist()

