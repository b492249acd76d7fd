"""The capture seam: how a backend records the activations of a greedy generation while it runs.

A backend's model carries a ``capture`` object (:class:`GenerationCapture`): ``model.capture.generation(...)`` records
one sample, ``model.capture.generation_batch(...)`` several in one batched HF ``generate`` call (or returns None when
the backend cannot, and the caller traces them one by one). :mod:`vlm_lens.trace` and :mod:`vlm_lens.batch_trace`
turn what it returns into :class:`~vlm_lens.trace.GenerationTrace` objects; they use nothing else of the backend.

Two implementations: :class:`TransformerLensCapture` here (the default backend; plain HF modules with torch hooks when
only residual values are wanted and no hook of yours must fire, the bridge's hook points otherwise) and
``NNsightCapture`` in :mod:`vlm_lens.nnsight_backend` (nnsight's generation tracing). A new backend implements the
two methods of the protocol, and nothing in ``trace`` changes.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.batch import PER_POSITION_PAD, join_inputs
from vlm_lens.inputs import VLMInputs, check_positions
from vlm_lens.surgery import get_module, original, set_attribute, unwrapped

# residual-stream names the plain-HF route can read (decoder layer inputs/outputs, the final norm's output)
PLAIN_NAMES = re.compile(r"^(blocks\.\d+\.hook_resid_(pre|post)|ln_final\.hook_normalized)$")


@dataclass
class CapturedGeneration:
    """What a capture recorded for one sample.

    ``chunks[name]``: the recorded values of hook ``name`` in order: the prefill ``[1, n_prompt, ...]``, then one
    ``[1, 1, ...]`` per decoding step (a backend may record a step past the last fed token: the caller keeps the
    processed positions). ``generated``: the greedy ids up to and including the first EOS; ``step_logits``: the
    logits that chose each of them.
    """

    chunks: dict[str, list[Tensor]]
    generated: Int[Tensor, " step"]
    step_logits: Float[Tensor, "step vocab"]


class GenerationCapture(Protocol):
    """The interface a backend implements to record generation (``model.capture``)."""

    def generation(self, inputs: VLMInputs, names: Sequence[str], max_new_tokens: int,
                   stop_at_eos: bool) -> CapturedGeneration:  # fmt: skip
        """Greedy-generate ``inputs`` and record the per-position values of hook ``names``."""
        ...

    def generation_batch(self, samples: Sequence[VLMInputs], names: Sequence[str], max_new_tokens: int,
                         stop_at_eos: bool) -> list[CapturedGeneration] | None:  # fmt: skip
        """Greedy-generate ``samples`` together; per sample, exactly its own processed positions in one chunk each.
        None when this backend (or its current state) cannot batch: the caller then records them one by one."""
        ...


def cut_at_eos(ids: Int[Tensor, " step"], eos: int | None) -> Int[Tensor, " step"]:
    """Generated ids up to and including the first EOS (what follows, in a batch, is padding)."""
    if eos is not None and bool((ids == eos).any()):
        ids = ids[: int(torch.nonzero(ids == eos)[0]) + 1]
    return ids


class TransformerLensCapture:
    """Generation capture of the TransformerLens backend (:class:`~vlm_lens.hooked.HookedVLM`)."""

    def __init__(self, model):
        self.model = model

    def generation(self, inputs: VLMInputs, names: Sequence[str], max_new_tokens: int,
                   stop_at_eos: bool) -> CapturedGeneration:  # fmt: skip
        """HF greedy generation with the values of ``names`` appended chunk by chunk (prefill, then one position per
        step): through the plain HF modules with torch hooks when only residual values are wanted and no hook of
        yours is active (~1.3x faster: no wrapper dispatch, sdpa attention), else through the bridge's hook points."""
        model = self.model
        chunks: dict[str, list[Tensor]] = {n: [] for n in names}

        def grab(activation, hook, key):
            chunks[key].append(activation.detach())
            return activation

        if all(PLAIN_NAMES.match(n) for n in names) and not model.user_hooks_active():
            context = plain_capture(model, names, chunks)
        else:
            context = model.hooks([(n, partial(grab, key=n)) for n in names])
        with context:
            generated, step_logits = model.greedy_generate(inputs, max_new_tokens, stop_at_eos, with_logits=True)
        return CapturedGeneration(chunks, generated, step_logits)

    def generation_batch(self, samples: Sequence[VLMInputs], names: Sequence[str], max_new_tokens: int,
                         stop_at_eos: bool) -> list[CapturedGeneration] | None:  # fmt: skip
        """One HF ``generate`` over the samples padded on the **left** (attention mask 0 on the pads: LLaVA's and
        Qwen-VL's generation derive position ids, Qwen's 3-D rope positions included, from the mask), recorded on the
        plain HF decoder layers, then split per sample (left pads and positions after its last fed token dropped).
        None when a hook of yours is active (it must fire, so generation has to run through the bridge) or a name is
        not a residual-stream value."""
        model = self.model
        if model.user_hooks_active() or not all(PLAIN_NAMES.match(n) for n in names):
            return None
        for sample in samples:
            check_positions(model, sample.input_ids.shape[1], max_new_tokens)
        kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=True)
        batch_inputs, n_pads = left_pad(model, list(samples))
        chunks: dict[str, list[Tensor]] = {n: [] for n in names}
        with torch.no_grad(), plain_capture(model, names, chunks):
            out = model.hf_model.generate(**batch_inputs, **kwargs)
        width = batch_inputs["input_ids"].shape[1]
        del batch_inputs
        eos = model.tokenizer.eos_token_id
        generated = [cut_at_eos(out.sequences[i, width:], eos).detach().clone() for i in range(len(samples))]
        all_logits: Float[Tensor, "step batch vocab"] = torch.stack(out.logits)
        step_logits = [all_logits[: len(g), i].float().detach().clone() for i, g in enumerate(generated)]
        del out, all_logits
        per_sample = split_batch(chunks, n_pads, [len(g) for g in generated])
        return [CapturedGeneration({k: [v] for k, v in a.items()}, g, s)
                for a, g, s in zip(per_sample, generated, step_logits)]  # fmt: skip


@contextlib.contextmanager
def plain_capture(model, names: Sequence[str], store: dict[str, list[Tensor]]):
    """Within the block, the HF model runs as plain HF: every TransformerLens wrapper is swapped for the module it
    wraps, attention is sdpa, and torch hooks append the residual-stream values of ``names`` to ``store``.
    Everything is put back on exit, also when the block raises."""

    def keep(key: str, value) -> None:
        store[key].append((value[0] if isinstance(value, tuple) else value).detach())

    previous = model.hf_model.config._attn_implementation
    with unwrapped(model.hf_model), contextlib.ExitStack() as cleanup:
        try:
            model.hf_model.set_attn_implementation("sdpa")
            cleanup.callback(model.hf_model.set_attn_implementation, previous)
        except (ValueError, ImportError):  # an architecture without sdpa: keep its attention, still unwrapped
            pass
        points = model.adapter.hook_map(model.n_layers, model.hf_model.config)
        for name in names:
            module = original(get_module(model.hf_model, points[name].path))  # the map says where and which side
            if points[name].side == "output":
                handle = module.register_forward_hook(lambda m, a, out, key=name: keep(key, out))
            else:
                handle = module.register_forward_pre_hook(
                    lambda m, args, kwargs, key=name: keep(key, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            cleanup.callback(handle.remove)
        yield


def full_cache():
    """An empty KV cache whose layers keep every position, for a forward whose keys and values seed a cache built
    later (:func:`generate_from_cache`). The cache HF makes from the config trims sliding-window layers (Gemma 3's
    local layers) to their last keys, which could not be cut or continued by position; the masks apply the window
    either way, so the forward computes the same."""
    from transformers import DynamicCache

    return DynamicCache()


def generate_from_cache(model, model_inputs: dict[str, Tensor], kv: Sequence[tuple[Tensor, Tensor]], max_new_tokens: int,
                        stop_at_eos: bool, *, with_logits: bool, position_state: Any = None, names: Sequence[str] = (),
                        store: dict[str, list[Tensor]] | None = None):  # fmt: skip
    """HF greedy ``generate`` on the plain HF modules, continuing a KV cache built elsewhere (a shared image prefix, a
    skipped forward): ``kv`` per decoder layer, ``[batch, kv_heads, kept, head_dim]`` each (left as they are: the cache
    grows by concatenation); ``model_inputs`` the sequence's per-position inputs, the kept positions first (the image
    is in the cache, so image inputs are dropped: a second ``pixel_values`` would be merged again); the family's
    position state (``AdapterSpec.position_state``) set to ``position_state`` first. With ``names``, their values
    are appended to ``store`` (:func:`plain_capture`). Returns HF's generate output."""
    from transformers import DynamicCache

    if model.adapter.position_state:
        set_attribute(model.hf_model, model.adapter.position_state, position_state)
    inputs = {k: v for k, v in model_inputs.items() if k in PER_POSITION_PAD}
    kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=with_logits)
    with torch.no_grad(), plain_capture(model, names, {} if store is None else store):
        past = DynamicCache(ddp_cache_data=list(kv), config=model.hf_model.config)
        return model.hf_model.generate(**inputs, past_key_values=past, **kwargs)


def left_pad(model, samples: list[VLMInputs]) -> tuple[dict[str, Tensor], list[int]]:
    """The samples' model inputs as one batch padded on the left, and each sample's number of pads.

    Per-position inputs (``PER_POSITION_PAD``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, Gemma's
    ``token_type_ids``, Mllama's ``cross_attention_mask``) are left-padded along the positions (pad id, then 0); the
    others (``pixel_values``, ``image_grid_thw``: one row per image or patch) are concatenated in sample order
    (:func:`~vlm_lens.batch.concat_per_image`)."""
    width = max(s.input_ids.shape[1] for s in samples)
    n_pads = [width - s.input_ids.shape[1] for s in samples]
    batch = join_inputs([s.model_inputs for s in samples], [(n, 0) for n in n_pads], model.pad_token_id)
    return batch, n_pads


def split_batch(store: dict[str, list[Tensor]], n_pads: list[int],
                n_steps: list[int]) -> list[dict[str, Float[Tensor, "1 pos d_model"]]]:  # fmt: skip
    """Per sample, its processed positions of every recorded name: the prefill chunk ``[batch, width, d]`` from the
    sample's first real position, then one decoding chunk ``[batch, 1, d]`` per token it fed back. The padded chunks
    are freed name by name."""
    out: list[dict[str, Tensor]] = [{} for _ in n_pads]
    for name in list(store):
        prefill, *steps = store.pop(name)
        for i, (n_pad, n_step) in enumerate(zip(n_pads, n_steps)):
            pieces = [prefill[i : i + 1, n_pad:]] + [chunk[i : i + 1] for chunk in steps[: n_step - 1]]
            out[i][name] = torch.cat(pieces, dim=1).detach()  # a copy: no view keeps the padded chunks alive
        del prefill, steps
    return out
