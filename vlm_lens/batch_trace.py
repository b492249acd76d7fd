"""Batched generation traces: several samples greedy-generated in one HF ``generate`` call, split per sample.

:func:`trace_generation_batch` is ``HookedVLM.trace_batch``. Every sample's :class:`~vlm_lens.trace.GenerationTrace`
equals the one ``model.trace_generation(sample, max_new_tokens)`` returns (same ids, layout, token ids; activations,
step logits and lens statistics within float32 noise of a batch-of-one forward).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.batch import _PER_POSITION_PAD, VLMBatch
from vlm_lens.cache import VLMCache
from vlm_lens.hooked import cut_at_eos
from vlm_lens.inputs import VLMInputs, check_positions
from vlm_lens.trace import GenerationTrace, finish_trace, plain_capture
from vlm_lens.errors import InputError, InputTypeError


def trace_generation_batch(
    model, inputs: "list[VLMInputs] | VLMBatch", max_new_tokens: int = 32, *, stop_at_eos: bool = True
) -> list[GenerationTrace]:
    """Greedy-generate every sample of ``inputs`` in one batched HF ``generate`` call (KV cache) and return one
    :class:`~vlm_lens.trace.GenerationTrace` per sample, as ``model.trace_generation(sample, max_new_tokens)`` would.

    ``inputs``: a list of ``model.prepare(image, prompt)`` results, or a :class:`~vlm_lens.batch.VLMBatch` (its
    ``samples`` are used; its right-padded tensors are not). The samples are padded on the **left** (attention mask
    0 on the pads: LLaVA's and Qwen-VL's generation derive position ids, Qwen's 3-D rope positions included, from the
    mask), and the residual stack plus ``ln_final.hook_normalized`` is recorded with torch hooks on the plain HF
    decoder layers (:func:`vlm_lens.trace.plain_capture`: wrappers swapped out, sdpa attention). Each sample keeps
    its own positions (left pads dropped), its generated ids up to its first EOS (kept) and the positions it
    processed. Exact for LLaVA, Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tests/integration/test_batch_trace.py).

    Falls back to one ``model.trace_generation`` per sample (same results, no batching) when a hook of yours is
    active on the model (it must fire, so generation has to run through the TransformerLens bridge) or when the
    model generates its own way (the nnsight backend traces generation with nnsight, not with the plain modules).
    """
    samples = list(inputs.samples if isinstance(inputs, VLMBatch) else inputs)
    if not samples:
        raise InputError("trace_batch needs at least one sample: pass [model.prepare(image, prompt), ...]")
    for sample in samples:
        if not isinstance(sample, VLMInputs):
            raise InputTypeError(f"expected VLMInputs from model.prepare(image, prompt), got {type(sample).__name__}")
    kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=True)
    if not _plain_route(model):
        return [model.trace_generation(x, max_new_tokens, stop_at_eos=stop_at_eos) for x in samples]
    for sample in samples:
        check_positions(model, sample.input_ids.shape[1], max_new_tokens)
    names = list(model.resid_names + ["ln_final.hook_normalized"])
    model._check_names(names)
    batch_inputs, n_pads = left_pad(model, samples)
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad(), plain_capture(model, names, store):
        out = model.hf_model.generate(**batch_inputs, **kwargs)
    width = batch_inputs["input_ids"].shape[1]
    del batch_inputs
    eos = model.tokenizer.eos_token_id
    generated = [cut_at_eos(out.sequences[i, width:], eos).detach().clone() for i in range(len(samples))]
    all_logits: Float[Tensor, "step batch vocab"] = torch.stack(out.logits)
    step_logits = [all_logits[: len(g), i].float().detach().clone() for i, g in enumerate(generated)]
    del out, all_logits
    activations = _split(store, samples, n_pads, [len(g) for g in generated])
    return [_trace(model, x, g, s, a, stop_at_eos)
            for x, g, s, a in zip(samples, generated, step_logits, activations)]  # fmt: skip


def _plain_route(model) -> bool:
    """Whether generation may run through the plain HF modules: no user hook that must fire, and the model records
    generation the TransformerLens backend's way (the nnsight backend overrides ``_capture_generation``)."""
    from vlm_lens.hooked import HookedVLM

    if getattr(model, "backend", "transformer_lens") != "transformer_lens":
        return False
    if type(model)._capture_generation is not HookedVLM._capture_generation:
        return False
    return not model._wrapper_hooks_active()


def left_pad(model, samples: list[VLMInputs]) -> tuple[dict[str, Tensor], list[int]]:
    """The samples' model inputs as one batch padded on the left, and each sample's number of pads.

    Per-position inputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``) are left-padded (pad id, 0, 0);
    the others (``pixel_values``, ``image_grid_thw``: one row per image or patch) are concatenated in sample order."""
    pad = model.pad_token_id
    width = max(s.input_ids.shape[1] for s in samples)
    n_pads = [width - s.input_ids.shape[1] for s in samples]
    per_sample = [dict(s.model_inputs) for s in samples]
    for values, s in zip(per_sample, samples):
        values.setdefault("attention_mask", torch.ones_like(s.input_ids))
    batch: dict[str, Tensor] = {}
    for key in dict.fromkeys(k for values in per_sample for k in values):
        present = [values[key] for values in per_sample if key in values]
        if key in _PER_POSITION_PAD:
            if len(present) != len(samples):
                raise InputError(f"{key!r} is missing for some samples: prepare every sample with the same model")
            fill = pad if _PER_POSITION_PAD[key] is None else _PER_POSITION_PAD[key]
            batch[key] = torch.cat([torch.nn.functional.pad(v, (n, 0), value=fill) for v, n in zip(present, n_pads)])
        else:
            batch[key] = torch.cat(present)
    return batch, n_pads


def _split(store: dict[str, list[Tensor]], samples: list[VLMInputs], n_pads: list[int],
           n_steps: list[int]) -> list[dict[str, Float[Tensor, "1 pos d_model"]]]:  # fmt: skip
    """Per sample, its processed positions of every recorded name (left pads and positions after its last fed token
    dropped): the prefill chunk ``[batch, width, d]`` from the sample's first real position, then one decoding chunk
    ``[batch, 1, d]`` per token it fed back. The padded chunks are freed name by name."""
    out: list[dict[str, Tensor]] = [{} for _ in samples]
    for name in list(store):
        prefill, *steps = store.pop(name)
        for i, (n_pad, n_step) in enumerate(zip(n_pads, n_steps)):
            pieces = [prefill[i : i + 1, n_pad:]] + [chunk[i : i + 1] for chunk in steps[: n_step - 1]]
            out[i][name] = torch.cat(pieces, dim=1).detach()  # a copy: no view keeps the padded chunks alive
        del prefill, steps
    return out


def _trace(model, inputs: VLMInputs, generated: Int[Tensor, " step"], step_logits: Float[Tensor, "step vocab"],
           activations: dict[str, Tensor], stop_at_eos: bool) -> GenerationTrace:  # fmt: skip
    """One sample's trace, built as :func:`vlm_lens.trace.trace_generation` builds it."""
    processed = model.extend(inputs, generated[:-1])
    n_positions = processed.layout.n_positions
    assert all(a.shape[1] == n_positions for a in activations.values()), "batched capture lost positions"
    cache = VLMCache(activations, processed.layout, model)
    return finish_trace(model, inputs, processed, generated, cache, step_logits, None, "generate", stop_at_eos, 4)
