"""One image prefill for every question about that image: generation traces that fork a shared KV cache.

LLaVA's and Qwen-VL's chat templates put the image before the question, so prompts about one image share their
tokens up to the last image token (the *image prefix*: system text, the image's tokens). A causal model computes
the same keys, values and residuals there whatever follows. :func:`capture_shared` runs that prefix once (one
forward of the plain HF modules with the residual stream recorded), then generates each question from a fork of its
KV cache: HF ``generate`` feeds only the question's own tokens and the decoding steps. Each sample's recording is
the prefix's residuals followed by its own, so its :class:`~vlm_lens.trace.GenerationTrace` equals the one traced
alone (within float tolerance; tests/integration/test_shared_prefix.py, every family).

Samples share a prefix when their prefix tokens and image inputs (``pixel_values``, ``image_grid_thw``, ...) are
equal. A prompt whose image is not followed by text of its own (nothing to generate from after the prefix) or
that has no image is traced the ordinary way. :class:`PrefixCache` keeps the last image's prefix across calls, so
the questions of one image that arrive in consecutive batches of a dataset share one prefill. A fork costs no copy:
the cache's layers grow by concatenation, leaving the shared tensors as they are.

Questions of different lengths generate together with pads between the prefix and their own tokens, except on a
model with sliding-window layers (Gemma 3), where only questions of equal length do (the window counts pads).

A family whose model keeps position state between forwards (Qwen-VL's ``rope_deltas``: ``AdapterSpec.position_state``)
gets it restored to what the prefix left before each question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from vlm_lens.batch import PER_POSITION_PAD, pad_positions
from vlm_lens.capture import CapturedGeneration, cut_at_eos, full_cache, generate_from_cache, plain_capture, split_batch
from vlm_lens.inputs import VLMInputs, check_positions
from vlm_lens.surgery import get_attribute


@dataclass
class ImagePrefix:
    """One image prefix run: its ``length`` in tokens, the tensors that identify it (``ids`` ``[length]`` and the image
    inputs), the KV cache of every decoder layer, the recorded residuals ``[1, length, d]`` per hook name, and the
    model's position state after it (or None)."""

    length: int
    ids: Tensor
    images: dict[str, Tensor]
    kv: list[tuple[Tensor, Tensor]]
    chunks: dict[str, Tensor]
    position_state: Any = None

    def matches(self, ids: Tensor, images: dict[str, Tensor]) -> bool:
        return same_prefix((self.ids, self.images), (ids, images))


def same_prefix(a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]]) -> bool:
    """Whether two ``(prefix ids, image inputs)`` are equal (shapes and values)."""
    (ids_a, images_a), (ids_b, images_b) = a, b
    same = ids_a.shape == ids_b.shape and bool(torch.equal(ids_a, ids_b)) and images_a.keys() == images_b.keys()
    return same and all(images_a[k].shape == images_b[k].shape and bool(torch.equal(images_a[k], images_b[k]))
                        for k in images_a)  # fmt: skip


@dataclass
class PrefixCache:
    """The image prefixes of the last ``size`` images (default 1: a dataset's consecutive questions about one image);
    ``prefills``: prefixes run, ``shared``: prompts that reused a prefix instead of running it. Keep one per run of
    one model: an entry is only valid for the weights that computed it."""

    size: int = 1
    entries: list[ImagePrefix] = field(default_factory=list)
    prefills: int = 0
    shared: int = 0

    def find(self, ids: Tensor, images: dict[str, Tensor]) -> ImagePrefix | None:
        return next((entry for entry in self.entries if entry.matches(ids, images)), None)

    def add(self, entry: ImagePrefix) -> None:
        self.entries = ([entry] + self.entries)[: max(1, self.size)]


def prefix_length(model, sample: VLMInputs) -> int | None:
    """The number of tokens up to and including the last image / video token, or None when the prompt has no such
    token or nothing after it (no question of its own to generate from)."""
    ids = sample.input_ids[0]
    marks = torch.isin(ids, torch.tensor(model.placeholder_ids, device=ids.device))
    if not bool(marks.any()):
        return None
    length = int(torch.nonzero(marks)[-1]) + 1
    return length if length < ids.shape[0] else None


def _image_inputs(sample: VLMInputs) -> dict[str, Tensor]:
    return {k: v for k, v in sample.model_inputs.items() if k not in PER_POSITION_PAD}


def _run_prefix(model, sample: VLMInputs, length: int, names: Sequence[str]) -> ImagePrefix:
    inputs = {k: (v[:, :length] if k in PER_POSITION_PAD else v) for k, v in sample.model_inputs.items()}
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad(), plain_capture(model, names, store):
        out = model.hf_model(**inputs, use_cache=True, past_key_values=full_cache(), logits_to_keep=1)
    state_path = model.adapter.position_state
    state = get_attribute(model.hf_model, state_path) if state_path else None
    return ImagePrefix(length, sample.input_ids[0, :length].clone(), _image_inputs(sample),
                       [(layer.keys, layer.values) for layer in out.past_key_values.layers],
                       {n: torch.cat(store[n], dim=1) for n in names}, state)  # fmt: skip


def _generate_group(model, samples: Sequence[VLMInputs], prefix: ImagePrefix, names: Sequence[str],
                    max_new_tokens: int, stop_at_eos: bool) -> list[CapturedGeneration]:  # fmt: skip
    """Greedy-generate ``samples`` (all with ``prefix``) together from a fork of its KV cache: each row is the prefix,
    pads, then the sample's own tokens (attention mask 0 on the pads, so positions and attention skip them, as with
    left padding), recorded on the plain HF modules and split per sample."""
    length, batch = prefix.length, len(samples)
    width = max(int(s.input_ids.shape[1]) for s in samples) - length  # the longest own part
    inputs: dict[str, Tensor] = {}
    for key, fill in PER_POSITION_PAD.items():
        if key == "attention_mask" or key in samples[0].model_inputs:
            rows = []
            for sample in samples:
                values = sample.model_inputs.get(key, torch.ones_like(sample.input_ids))
                tail = values[:, length:]  # the sample's own positions
                padded = pad_positions(tail, width - tail.shape[1], 0, model.pad_token_id if fill is None else fill)
                rows.append(torch.cat([values[:, :length], padded], dim=1))
            inputs[key] = torch.cat(rows)
    kv = [(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in prefix.kv]  # a fork: no copy
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    out = generate_from_cache(model, inputs, kv, max_new_tokens, stop_at_eos, with_logits=True,
                              position_state=prefix.position_state, names=names, store=store)  # fmt: skip
    eos = model.tokenizer.eos_token_id
    generated = [cut_at_eos(out.sequences[i, length + width :], eos).detach().clone() for i in range(batch)]
    logits = torch.stack(out.logits)  # [step, batch, vocab]
    pads = [width - (int(s.input_ids.shape[1]) - length) for s in samples]  # pads before each sample's own tokens
    own = split_batch(store, pads, [len(g) for g in generated])
    return [CapturedGeneration({n: [prefix.chunks[n], mine[n]] for n in names}, g, logits[: len(g), i].float().detach().clone())
            for i, (g, mine) in enumerate(zip(generated, own))]  # fmt: skip


def capture_shared(model, samples: Sequence[VLMInputs], names: Sequence[str], max_new_tokens: int, stop_at_eos: bool,
                   prefixes: PrefixCache) -> list[CapturedGeneration | None]:  # fmt: skip
    """Per sample, its recording from a shared image prefix, or None for a sample to trace the ordinary way (batched
    with the others). A sample shares when ``prefixes`` holds its image prefix or another sample of the call has the
    same one; the samples of one prefix generate together; a prefix run here is stored in ``prefixes``."""
    groups: list[tuple[tuple[Tensor, dict[str, Tensor]], list[int]]] = []  # (prefix key, samples with it)
    for i, sample in enumerate(samples):
        length = prefix_length(model, sample)
        if length is None:
            continue
        key = (sample.input_ids[0, :length], _image_inputs(sample))
        group = next((g for g in groups if same_prefix(key, g[0])), None)
        if group is not None:
            group[1].append(i)
        else:
            groups.append((key, [i]))
    out: list[CapturedGeneration | None] = [None] * len(samples)
    for key, members in groups:
        prefix = prefixes.find(*key)
        if prefix is None and len(members) < 2:
            continue  # nothing to share it with: the batched generation serves it better
        for i in members:
            check_positions(model, samples[i].input_ids.shape[1], max_new_tokens)
        if prefix is None:
            prefix = _run_prefix(model, samples[members[0]], len(key[0]), names)
            prefixes.add(prefix)
            prefixes.prefills += 1
            prefixes.shared += len(members) - 1
        else:
            prefixes.shared += len(members)
        for batch in _batches(model, samples, members):
            for i, one in zip(batch, _generate_group(model, [samples[i] for i in batch], prefix, names,
                                                     max_new_tokens, stop_at_eos)):  # fmt: skip
                out[i] = one
    return out


def _batches(model, samples: Sequence[VLMInputs], members: list[int]) -> list[list[int]]:
    """The samples of one prefix that generate together: all of them; or, when some layer attends within a sliding
    window (Gemma 3's local layers), those of equal length: the window counts padded positions, so pads between the
    prefix and a question would hide some of its real keys."""
    text = model.hf_model.config.get_text_config()
    if "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
        return [members]
    by_length: dict[int, list[int]] = {}
    for i in members:
        by_length.setdefault(int(samples[i].input_ids.shape[1]), []).append(i)
    return list(by_length.values())
