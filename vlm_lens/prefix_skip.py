"""Layer skipping that starts where the skip does: a trace's cached prefix stands in for the layers below it.

Skipping a set S of decoder layers (lowest k) changes nothing below layer k: on the trace's own sequence, every
layer < k computes what the original generation computed, and the trace's cache holds the residual entering layer
k at every processed position (stack index k). So :class:`PrefixSkipper` runs, per skip set:

1. **Teacher-forced**: one forward of the plain HF modules over the trace's positions (prompt + generated but the
   last) in which decoder layers < k are pass-throughs, layer k's input is replaced by the cached residual, and the
   layers of S are pass-throughs (output := input); the logits at the step positions only (``logits_to_keep``).
   Cost: the layers >= k (minus S), against a whole forward.
2. **Greedy generation with S skipped**, derived rather than rerun: while the skipped model's choice (argmax of the
   step's teacher-forced logits, placeholders suppressed, as :meth:`~vlm_lens.hooked.HookedVLM.greedy_kwargs`)
   agrees with the original token, greedy generation would feed the same prefix, so it emits the original token;
   at the first disagreement j it emits the skipped model's choice. Only after that (and only if tokens remain and
   that choice is not EOS) does HF ``generate`` continue, from a KV cache built, not recomputed: layers < k (and the
   skipped ones, never read) from one forward of the original model over the trace's positions (computed once per
   trace, on the first continuation that needs it), layers >= k from step 1's forward, both cut to the prefix of
   j tokens. The continuation computes only the remaining decode steps (skipped layers as identity maps).

The naive sweep (:class:`~vlm_lens.probes.interventions.LayerSkip` with ``reuse="none"``) runs a whole
teacher-forced forward and a whole generation (prefill included) per set: ``2`` forwards over the sequence against
``(n - k) / n`` (+ ``1 / n_sets`` when a continuation needs the original KV cache). Equal to it within float
tolerance (tests/integration/test_prefix_skip.py, every family, both backends).

The forwards run on the plain HF modules (TransformerLens wrappers swapped out, sdpa attention, as the trace's own
capture): hooks on hook points do not fire, so the probe uses this path only when no hook of the user's is active.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlm_lens.capture import cut_at_eos, full_cache, generate_from_cache, plain_capture
from vlm_lens.surgery import get_attribute, get_module, original


class PassThrough(nn.Module):
    """Stands in for a decoder layer: returns the hidden states it is given (computes nothing, caches nothing)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@dataclass
class SkipOutcome:
    """One skip set on one trace: ``step_logits`` ``[step, vocab]`` (float32, teacher-forced on the original prefix,
    one row per original token) and ``generated`` (greedy generation with the layers skipped, up to the first EOS)."""

    step_logits: Float[Tensor, "step vocab"]
    generated: Int[Tensor, " new_step"]
    diverged_at: int | None  # the first step whose skipped choice differs from the original token (None: none)


def can_reuse(model, trace) -> bool:
    """Whether ``trace`` can seed skips: its cache holds the residual stack at every processed position and no hook
    of the user's must fire (the reused forwards run on the plain HF modules)."""
    cache = trace.cache
    return all(name in cache for name in model.resid_names) and not model.user_hooks_active()


@contextlib.contextmanager
def _swapped(layers: nn.ModuleList, indices: Sequence[int]) -> Iterator[None]:
    saved = {i: layers._modules[str(i)] for i in indices}
    try:
        for i in indices:
            layers._modules[str(i)] = PassThrough()
        yield
    finally:
        for i, module in saved.items():
            layers._modules[str(i)] = module


@contextlib.contextmanager
def skipping(model, layers: Sequence[int]) -> Iterator[None]:
    """Decoder ``layers`` act as identity maps (output := input) on the plain HF modules inside the block. They still
    run, so each fills its KV cache slot (never read) and the cache lengths stay equal during generation."""
    handles = []

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    try:
        for layer in layers:
            module = original(get_module(model.hf_model, f"{model.adapter.layers}.{layer}"))
            handles.append(module.register_forward_hook(identity, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _injected(layer: nn.Module, residual: Tensor) -> Iterator[None]:
    """``layer`` reads ``residual`` ``[1, pos, d]`` as its input hidden states."""

    def replace(module, args, kwargs):
        if args:
            return (residual, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": residual}

    handle = layer.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class PrefixSkipper:
    """Skip sets on one :class:`~vlm_lens.trace.GenerationTrace`, each recomputing only the layers from its lowest
    skipped layer (see the module docstring). ``stop_at_eos`` and the number of new tokens follow the naive probe:
    greedy generation of the trace's prompt for ``trace.n_steps`` tokens, stopping at EOS. Keep one per trace for a
    sweep: the original model's KV cache, when a continuation needs it, is computed once and shared."""

    def __init__(self, trace):
        self.trace = trace
        self.model = trace.model
        self.original_kv: list[tuple[Tensor, Tensor]] | None = None
        self.position_state = None

    def _layers(self) -> nn.ModuleList:
        return get_module(self.model.hf_model, self.model.adapter.layers)

    def _forward(self, below: int, skipped: Sequence[int], use_cache: bool):
        """The plain HF forward over the trace's positions from decoder layer ``below`` on, ``skipped`` passed
        through; logits at the step positions (the last ``n_steps`` positions of the processed sequence)."""
        model, trace = self.model, self.trace
        inputs = dict(trace.inputs.model_inputs)
        with torch.no_grad(), plain_capture(model, [], {}), contextlib.ExitStack() as context:
            layers = self._layers()
            context.enter_context(_swapped(layers, sorted(set(range(below)) | set(skipped))))
            if below > 0:
                residual = trace.cache[model.resid_names[below]].to(model.device, model.hf_model.dtype)
                context.enter_context(_injected(layers[below], residual))
            past = full_cache() if use_cache else None  # every position kept: the continuation cuts it by position
            out = model.hf_model(**inputs, use_cache=use_cache, past_key_values=past, logits_to_keep=trace.n_steps)
        if model.adapter.position_state:  # left by a forward over this trace's sequence: kept for its continuations
            self.position_state = get_attribute(model.hf_model, model.adapter.position_state)
        return out.logits[0].float(), out.past_key_values

    def forced_logits(self, layers: Sequence[int]) -> Float[Tensor, "step vocab"]:
        """Teacher-forced logits at the step positions with ``layers`` skipped (float32, on the model's device)."""
        chosen = sorted(set(int(i) for i in layers))
        if not chosen:
            return self.trace.step_logits.to(self.model.device).float()
        return self._forward(chosen[0], chosen, use_cache=False)[0]

    def run(self, layers: Sequence[int]) -> SkipOutcome:
        """Teacher-forced logits and greedy generation with ``layers`` skipped."""
        model, trace = self.model, self.trace
        chosen = sorted(set(int(i) for i in layers))
        original = trace.generated_ids
        if chosen:
            logits, cache = self._forward(chosen[0], chosen, use_cache=True)
        else:  # nothing skipped: the trace's own logits (a trace made without EOS may still differ from a generation with it)
            logits, cache = trace.step_logits.to(model.device).float(), None
        scores = logits.clone()
        scores[:, model.suppressed_ids(True)] = float("-inf")
        choices = scores.argmax(-1).cpu()
        differs = torch.nonzero(choices != original).flatten()
        if len(differs) == 0:
            return SkipOutcome(logits.cpu(), original.clone(), None)
        j = int(differs[0])
        emitted = torch.cat([original[:j], choices[j : j + 1]])
        eos = model.tokenizer.eos_token_id
        remaining = trace.n_steps - j - 1
        if remaining > 0 and not (eos is not None and int(choices[j]) == eos):
            emitted = self._continue(chosen, cache, emitted, remaining)
        return SkipOutcome(logits.cpu(), cut_at_eos(emitted, eos), j)

    def _original_kv(self) -> list[tuple[Tensor, Tensor]]:
        if self.original_kv is None:
            cache = self._forward(0, [], use_cache=True)[1]
            self.original_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self.original_kv

    def _continue(self, skipped: Sequence[int], cache, emitted: Int[Tensor, " step"], remaining: int) -> Tensor:
        """Greedy generation of ``remaining`` more tokens after ``emitted`` with ``skipped`` as identity maps, from
        the KV cache of the prompt and ``emitted[:-1]`` (layers below the lowest skip and the skipped ones: the
        original model's; the others: the skipped forward's)."""
        model, trace = self.model, self.trace
        n_kept = trace.prompt_inputs.input_ids.shape[1] + len(emitted) - 1
        below, skipped_set = (skipped[0] if skipped else model.n_layers), set(skipped)
        original = self._original_kv()
        image_kv = set(model.adapter.cross_layers(model.hf_model.config))  # image features, not positions: kept whole
        data = []
        for i in range(model.n_layers):
            keys, values = original[i] if i < below or i in skipped_set else (cache.layers[i].keys, cache.layers[i].values)
            data.append((keys, values) if i in image_kv else (keys[..., :n_kept, :], values[..., :n_kept, :]))
        prefix = model.extend(trace.prompt_inputs, emitted.to(trace.prompt_inputs.input_ids.device))
        with skipping(model, sorted(skipped_set)):  # position state: this trace's (Qwen's rope offset)
            out = generate_from_cache(model, prefix.model_inputs, data, remaining, True, with_logits=False,
                                      position_state=self.position_state)  # fmt: skip
        new = out.sequences[0, prefix.input_ids.shape[1] :].cpu()
        return torch.cat([emitted, new])
