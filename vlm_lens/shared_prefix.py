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

A family whose model keeps position state between forwards (Qwen-VL's ``rope_deltas``: ``AdapterSpec.position_state``)
gets it restored to what the prefix left before each question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from vlm_lens.batch import PER_POSITION_PAD
from vlm_lens.capture import CapturedGeneration, cut_at_eos, plain_capture
from vlm_lens.inputs import VLMInputs, check_positions
from vlm_lens.surgery import get_module


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
        return (ids.shape == self.ids.shape and bool(torch.equal(ids, self.ids)) and images.keys() == self.images.keys()
                and all(images[k].shape == v.shape and bool(torch.equal(images[k], v)) for k, v in self.images.items()))  # fmt: skip


@dataclass
class PrefixCache:
    """The image prefixes of the last ``size`` images (default 1: a dataset's consecutive questions about one image),
    and how many prompts were served from a stored prefix (``hits``) or had to run one (``misses``). Keep one per run
    of one model: an entry is only valid for the weights that computed it."""

    size: int = 1
    entries: list[ImagePrefix] = field(default_factory=list)
    hits: int = 0
    misses: int = 0

    def find(self, ids: Tensor, images: dict[str, Tensor]) -> ImagePrefix | None:
        for entry in self.entries:
            if entry.matches(ids, images):
                self.hits += 1
                return entry
        return None

    def add(self, entry: ImagePrefix) -> None:
        self.misses += 1
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
        out = model.hf_model(**inputs, use_cache=True, logits_to_keep=1)
    state_path = model.adapter.position_state
    state = _get(model.hf_model, state_path) if state_path else None
    return ImagePrefix(length, sample.input_ids[0, :length].clone(), _image_inputs(sample),
                       [(layer.keys, layer.values) for layer in out.past_key_values.layers],
                       {n: torch.cat(store[n], dim=1) for n in names}, state)  # fmt: skip


def _get(root, path: str):
    parent, _, name = path.rpartition(".")
    return getattr(get_module(root, parent) if parent else root, name)


def _set(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def _generate_from(model, sample: VLMInputs, prefix: ImagePrefix, names: Sequence[str], max_new_tokens: int,
                   stop_at_eos: bool) -> CapturedGeneration:  # fmt: skip
    from transformers import DynamicCache

    if model.adapter.position_state:
        _set(model.hf_model, model.adapter.position_state, prefix.position_state)
    inputs = {k: v for k, v in sample.model_inputs.items() if k in PER_POSITION_PAD}  # the image is in the cache
    kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=True)
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad(), plain_capture(model, names, store):
        past = DynamicCache(ddp_cache_data=prefix.kv, config=model.hf_model.config)  # a fork: the shared tensors stay
        out = model.hf_model.generate(**inputs, past_key_values=past, **kwargs)
    generated = cut_at_eos(out.sequences[0, sample.input_ids.shape[1] :], model.tokenizer.eos_token_id).detach().clone()
    step_logits = torch.stack(out.logits)[: len(generated), 0].float().detach().clone()
    return CapturedGeneration({n: [prefix.chunks[n], *store[n]] for n in names}, generated, step_logits)


def _same(a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]]) -> bool:
    return ImagePrefix(0, a[0], a[1], [], {}).matches(*b)


def capture_shared(model, samples: Sequence[VLMInputs], names: Sequence[str], max_new_tokens: int, stop_at_eos: bool,
                   prefixes: PrefixCache) -> list[CapturedGeneration | None]:  # fmt: skip
    """Per sample, its recording from a shared image prefix, or None for a sample to trace the ordinary way (batched
    with the others). A sample shares when ``prefixes`` holds its image prefix or another sample of the call has the
    same one; a prefix run here is stored in ``prefixes``."""
    keys: list[tuple[Tensor, dict[str, Tensor]] | None] = []
    for sample in samples:
        length = prefix_length(model, sample)
        keys.append(None if length is None else (sample.input_ids[0, :length], _image_inputs(sample)))
    out: list[CapturedGeneration | None] = []
    for i, (sample, key) in enumerate(zip(samples, keys)):
        if key is None:
            out.append(None)
            continue
        prefix = prefixes.find(*key)
        if prefix is None and not any(other is not None and j != i and _same(key, other) for j, other in enumerate(keys)):
            out.append(None)  # nothing to share it with: the batched generation serves it better
            continue
        check_positions(model, sample.input_ids.shape[1], max_new_tokens)
        if prefix is None:
            prefix = _run_prefix(model, sample, len(key[0]), names)
            prefixes.add(prefix)
        out.append(_generate_from(model, sample, prefix, names, max_new_tokens, stop_at_eos))
    return out
