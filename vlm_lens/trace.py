"""Generation traces: greedy generation with the activations of every processed position recorded as it runs.

:func:`trace_generation` is ``HookedVLM.trace_generation``; :class:`GenerationTrace` carries its model
(``trace.model``), inputs, generated tokens and cache. The recording itself is the backend's
(``model.capture``, :mod:`vlm_lens.capture`); this module uses only the model's public members.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlm_lens import checks
from vlm_lens.batch import VLMBatch
from vlm_lens.cache import VLMCache
from vlm_lens.errors import InputError
from vlm_lens.inputs import VLMInputs
from vlm_lens.layout import TokenLayout


@dataclass
class GenerationTrace:
    """A greedy generation with the activations of every position the model processed.

    ``inputs`` holds the prompt and every generated token but the last (which was emitted, never fed back), so
    ``cache`` covers positions ``0 .. n_prompt + n_steps - 2``. ``step_positions[j]`` is the position whose output
    predicted generated token ``j`` (the last prompt position for ``j = 0``). ``step_logits[j]`` are the logits
    that chose token ``j``. ``lens_agrees[j]`` says whether the lens at the last layer reproduces token ``j``.
    ``logits`` (all positions) is only kept by the ``capture="reforward"`` mode.
    """

    inputs: VLMInputs
    generated_ids: Int[Tensor, " step"]
    generated_tokens: list[str]
    text: str
    step_positions: Int[Tensor, " step"]
    step_logits: Float[Tensor, "step vocab"]
    cache: VLMCache
    lens_agrees: Bool[Tensor, " step"] = field(repr=False)
    prompt_inputs: VLMInputs | None = field(default=None, repr=False)
    logits: Float[Tensor, "1 pos vocab"] | None = field(default=None, repr=False)
    capture: str = "generate"

    @property
    def layout(self) -> TokenLayout:
        return self.inputs.layout

    @property
    def model(self):
        """The model that generated this trace."""
        return self.cache.model

    @property
    def n_steps(self) -> int:
        return int(self.generated_ids.shape[0])

    def __repr__(self) -> str:
        return (f"GenerationTrace(text={self.text!r}, steps={self.n_steps}, positions={self.layout.n_positions}, "
                f"cached={len(self.cache)} hooks, capture={self.capture!r}, lens_agrees={bool(self.lens_agrees.all())})")


_PER_POSITION = re.compile(
    r"^(hook_embed|embed\.hook_out|ln_final\.hook_(in|normalized|out)|"
    r"blocks\.\d+\.(hook_(in|out|resid_pre|resid_mid|resid_post|attn_out|mlp_out)|ln[12]\.hook_normalized))$"
)


def trace_generation(
    model,
    inputs: VLMInputs,
    max_new_tokens: int = 32,
    names_filter=None,
    *,
    stop_at_eos: bool = True,
    capture: Literal["auto", "generate", "reforward"] = "auto",
) -> GenerationTrace:
    """Greedy-generate and cache the activations of every processed position.

    ``names_filter`` (a list of hook names) defaults to the residual stack plus ``ln_final.hook_normalized``.
    ``capture="generate"`` records them with hooks during HF generation itself (prefill, then one position per
    decoding step; no second forward). When every name is a residual-stream value (``blocks.{i}.hook_resid_pre``
    / ``hook_resid_post``, ``ln_final.hook_normalized``) and no hook of yours is active on the model, that
    generation runs through the plain HF modules (wrappers swapped out, sdpa attention, torch hooks on the
    decoder layers), ~1.3x faster; the bridge is restored afterwards. Otherwise it runs through the bridge so
    that every hook fires. ``"reforward"`` generates, then runs one cached forward over the same
    positions: needed for hooks that are not one vector per position (attention patterns), and it also keeps
    the logits of every position. ``"auto"`` picks ``"generate"`` when every requested hook allows it.
    """
    if isinstance(inputs, VLMBatch):
        raise InputError("trace_generation follows one sample: call it per sample (batch[i]); run_with_cache takes batches")
    max_new_tokens = checks.new_tokens(max_new_tokens)
    names = list(model.resid_names + ["ln_final.hook_normalized"] if names_filter is None else
                 ([names_filter] if isinstance(names_filter, str) else names_filter))  # fmt: skip
    if capture == "auto":
        capture = "generate" if all(_PER_POSITION.match(n) for n in names) else "reforward"
    if capture not in ("generate", "reforward"):
        raise InputError(f"capture must be 'auto', 'generate' or 'reforward', got {capture!r}")
    model.check_hook_names(names)
    logits = None
    if capture == "generate":
        bad = [n for n in names if not _PER_POSITION.match(n)]
        if bad:
            raise InputError(f"capture='generate' records one vector per position; {bad[:3]} are not: use capture='reforward'")
        captured = model.capture.generation(inputs, names, max_new_tokens, stop_at_eos)
        generated, step_logits = captured.generated, captured.step_logits
        processed = model.extend(inputs, generated[:-1])
        cache = cache_of(captured, processed, model)
    else:
        generated = model.generate_ids(inputs, max_new_tokens, stop_at_eos=stop_at_eos)
        processed = model.extend(inputs, generated[:-1])
        logits, cache = model.run_with_cache(processed, names_filter=names)
        step_logits = None
    return finish_trace(model, inputs, processed, generated, cache, step_logits, logits, capture, stop_at_eos)


def cache_of(captured, processed: VLMInputs, model) -> VLMCache:
    """The cache of a :class:`~vlm_lens.capture.CapturedGeneration`: each name's chunks joined along positions and cut
    to the positions the generation processed (the prompt and every generated token but the last)."""
    n_positions = processed.layout.n_positions
    activations = {n: torch.cat(chunks, dim=1)[:, :n_positions] for n, chunks in captured.chunks.items()}
    if any(a.shape[1] != n_positions for a in activations.values()):
        raise RuntimeError(f"the capture recorded fewer than the {n_positions} processed positions")  # a backend bug
    return VLMCache(activations, processed.layout, model)


def finish_trace(model, inputs: VLMInputs, processed: VLMInputs, generated: Int[Tensor, " step"], cache: VLMCache,
                 step_logits: Float[Tensor, "step vocab"] | None, logits: Tensor | None, capture: str,
                 stop_at_eos: bool, stacklevel: int = 3) -> GenerationTrace:  # fmt: skip
    """The :class:`GenerationTrace` of a generation whose activations are in ``cache`` (one sample's positions):
    token ids for the cache, the step positions, the last-layer lens check (warned about, not fatal)."""
    # the sequence the cache reads plus the last emitted token: every step position predicts its generated token
    cache.input_ids = torch.cat([processed.input_ids[0].cpu(), generated[-1:].cpu()])
    step_positions = torch.arange(generated.shape[0]) + inputs.layout.n_prompt - 1
    if logits is not None:
        step_logits = logits[0, step_positions.to(logits.device)].float()
    agrees = lens_agreement(model, cache, step_logits, step_positions, generated, stop_at_eos)
    if not bool(agrees.all()):
        warnings.warn(
            f"the lens at the last layer does not reproduce generated tokens at steps "
            f"{torch.nonzero(~agrees).flatten().tolist()} (near-tied logits between the KV-cached generation "
            "and the cached forward); per-step analyses of those steps describe the cached forward",
            stacklevel=stacklevel,
        )
    if step_logits is None:
        raise ValueError("finish_trace needs the step logits, or the logits of every position")  # a caller bug
    generated_cpu = generated.cpu()
    return GenerationTrace(
        inputs=processed,
        generated_ids=generated_cpu,
        generated_tokens=model.tokenizer.convert_ids_to_tokens(generated_cpu.tolist()),
        text=model.tokenizer.decode(generated_cpu.tolist(), skip_special_tokens=True),
        step_positions=step_positions,
        step_logits=step_logits.cpu(),
        cache=cache,
        lens_agrees=agrees,
        prompt_inputs=inputs,
        logits=logits,
        capture=capture,
    )


def lens_agreement(model, cache, step_logits, step_positions, generated, stop_at_eos) -> Tensor:
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"
    if last in cache:
        scores = model.unembed(cache[last][0, step_positions.to(cache[last].device)])
    else:
        scores = step_logits.clone()
    scores[:, model.suppressed_ids(stop_at_eos)] = float("-inf")  # never generated
    return (scores.argmax(-1).cpu() == generated.cpu())
