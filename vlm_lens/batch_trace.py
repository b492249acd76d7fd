"""Batched generation traces: several samples greedy-generated in one HF ``generate`` call, split per sample.

:func:`trace_generation_batch` is ``HookedVLM.trace_batch``. Every sample's :class:`~vlm_lens.trace.GenerationTrace`
equals the one ``model.trace_generation(sample, max_new_tokens)`` returns (same ids, layout, token ids; activations,
step logits and lens statistics within float32 noise of a batch-of-one forward). The batched recording is the
backend's (``model.capture.generation_batch``, :mod:`vlm_lens.capture`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_lens.batch import VLMBatch
from vlm_lens.errors import InputError, InputTypeError
from vlm_lens.inputs import VLMInputs
from vlm_lens.trace import GenerationTrace, cache_of, finish_trace

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.shared_prefix import PrefixCache


def trace_generation_batch(
    model, inputs: "list[VLMInputs] | VLMBatch", max_new_tokens: int = 32, *, stop_at_eos: bool = True,
    prefixes: "PrefixCache | None" = None,
) -> list[GenerationTrace]:
    """Greedy-generate every sample of ``inputs`` in one batched HF ``generate`` call (KV cache) and return one
    :class:`~vlm_lens.trace.GenerationTrace` per sample, as ``model.trace_generation(sample, max_new_tokens)`` would.

    ``inputs``: a list of ``model.prepare(image, prompt)`` results, or a :class:`~vlm_lens.batch.VLMBatch` (its
    ``samples`` are used; its right-padded tensors are not). The residual stack plus ``ln_final.hook_normalized`` is
    recorded (:meth:`vlm_lens.capture.TransformerLensCapture.generation_batch`: left padding, plain HF modules).
    Each sample keeps its own positions, its generated ids up to its first EOS (kept) and the positions it
    processed. Exact for LLaVA, Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tests/integration/test_batch_trace.py).

    Falls back to one ``model.trace_generation`` per sample (same results, no batching) when the backend cannot
    batch: a hook of yours is active (it must fire, so generation has to run through the TransformerLens bridge), or
    the nnsight backend (it traces generation with nnsight).

    ``prefixes`` (a :class:`~vlm_lens.shared_prefix.PrefixCache`): samples about the same image run its prefill once
    and generate from a fork of its KV cache (:mod:`vlm_lens.shared_prefix`; kept across calls for the last image);
    the others are batched as above. Same traces within float tolerance. Not with a hook of yours active.
    """
    samples = list(inputs.samples if isinstance(inputs, VLMBatch) else inputs)
    if not samples:
        raise InputError("trace_batch needs at least one sample: pass [model.prepare(image, prompt), ...]")
    for sample in samples:
        if not isinstance(sample, VLMInputs):
            raise InputTypeError(f"expected VLMInputs from model.prepare(image, prompt), got {type(sample).__name__}")
    model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=True)  # the argument checks, before any work
    names = list(model.resid_names + ["ln_final.hook_normalized"])
    model.check_hook_names(names)
    captured: list = [None] * len(samples)
    if prefixes is not None and not model.user_hooks_active():
        from vlm_lens.shared_prefix import PrefixCache, capture_shared

        if not isinstance(prefixes, PrefixCache):
            raise InputTypeError(f"prefixes must be a vlm_lens.shared_prefix.PrefixCache, got {type(prefixes).__name__}")

        captured = capture_shared(model, samples, names, max_new_tokens, stop_at_eos, prefixes)
    rest = [i for i, one in enumerate(captured) if one is None]
    batched = model.capture.generation_batch([samples[i] for i in rest], names, max_new_tokens, stop_at_eos) if rest else []
    if batched is None:  # the backend cannot batch: trace the rest one by one
        single = {i: model.trace_generation(samples[i], max_new_tokens, stop_at_eos=stop_at_eos) for i in rest}
    else:
        single = {}
        for i, one in zip(rest, batched):
            captured[i] = one
    traces = []
    for i, (sample, one) in enumerate(zip(samples, captured)):
        if i in single:
            traces.append(single[i])
            continue
        processed = model.extend(sample, one.generated[:-1])
        cache = cache_of(one, processed, model)
        traces.append(finish_trace(model, sample, processed, one.generated, cache, one.step_logits, None, "generate",
                                   stop_at_eos, 3))  # fmt: skip
    return traces
