"""Intervention probes: skip decoder layers, patch activations from one run into another."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from vlm_lens import checks
from vlm_lens.cache import act_name
from vlm_lens.errors import InputError, InputTypeError, OutOfRangeError
from vlm_lens.probes.base import Probe, Source, as_source, register_probe
from vlm_lens.probes.metrics import kl_divergence
from vlm_lens.probes.result import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.prefix_skip import PrefixSkipper
    from vlm_lens.protocol import VLMModel as HookedVLM


def skip_layer_hooks(layers: Iterable[int]) -> list[tuple[str, Callable]]:
    """Forward hooks that make each decoder layer in ``layers`` an identity map (its output := its input).

    The skipped layer still runs (and fills its KV cache, which no other layer reads), so this equals removing it.
    """
    hooks = []
    for layer in sorted(set(int(i) for i in layers)):
        saved: dict[str, Tensor] = {}

        def keep(activation, hook, saved=saved):
            saved["input"] = activation
            return activation

        def restore(activation, hook, saved=saved):
            return saved.pop("input")

        hooks += [(f"blocks.{layer}.hook_resid_pre", keep), (f"blocks.{layer}.hook_resid_post", restore)]
    return hooks


def _layer_set(model: "HookedVLM", layers: Iterable[int] | range) -> list[int]:
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < model.n_layers]
    if bad:
        raise OutOfRangeError(f"decoder layers must be in 0..{model.n_layers - 1}, got {bad}")
    return chosen


@register_probe
class LayerSkip(Probe):
    """Skip a set of decoder layers and measure what changes (paper §6.1).

    On a trace: a teacher-forced forward over prompt + generated tokens with the layers skipped (``kl`` =
    KL(original || skipped) and ``answer_prob`` = probability of the originally generated token, per step;
    ``forced_agreement`` = share of steps whose top-1 is unchanged), and a whole greedy generation with the layers
    skipped (``generated_text``, ``generation_agreement`` = share of original tokens reproduced in place).

    ``reuse``: ``"auto"`` (default) recomputes only the layers from the lowest skipped one on, seeded by the
    trace's cached residual and KV prefix (:mod:`vlm_lens.prefix_skip`), whenever the trace cached the residual stack
    and no hook of yours is active, else the naive way; ``"none"``: always the naive way (a whole teacher-forced
    forward and a whole generation through the hook points, your hooks firing); ``"prefix"``: the prefix path or an
    error saying why not. Both give the same numbers within float tolerance (tests/integration/test_prefix_skip.py).
    """

    name = "layer_skip"

    def __init__(self, layers: Iterable[int] | range = (), reuse: str = "auto"):
        if reuse not in ("auto", "prefix", "none"):
            raise InputError(f"reuse must be 'auto', 'prefix' or 'none', got {reuse!r}")
        self.layers = list(layers)
        self.reuse = reuse

    def skipper(self, source: Any) -> "PrefixSkipper | None":
        """The :class:`~vlm_lens.prefix_skip.PrefixSkipper` this probe uses on ``source`` (None: the naive way)."""
        from vlm_lens.prefix_skip import PrefixSkipper, can_reuse

        src = as_source(source)
        if self.reuse == "none" or src.trace is None:
            return None
        if can_reuse(src.model, src.trace):
            return PrefixSkipper(src.trace)
        if self.reuse == "prefix":
            raise InputError("reuse='prefix' needs a trace that cached the residual stack (names_filter=None) and no "
                             "active hook of yours: pass reuse='auto' to fall back to the naive skip")  # fmt: skip
        return None

    def run(self, source: Source) -> ProbeResult:
        return self.run_with(source, self.skipper(source))

    def run_with(self, source: Any, skipper: "PrefixSkipper | None") -> ProbeResult:
        """:meth:`run` with a given skipper (None: the naive way), to share one over several sets of one trace."""
        source = as_source(source)
        if source.trace is None:
            raise InputError("LayerSkip needs a GenerationTrace (model.trace_generation(...)), not a bare cache")
        model, trace = source.model, source.trace
        layers = _layer_set(model, self.layers)
        if skipper is not None:
            outcome = skipper.run(layers)
            skipped_logits, generated = outcome.step_logits.float().cpu(), outcome.generated.cpu()
        else:
            skipped_logits, generated = _naive_skip(model, trace, layers)
        original = trace.step_logits.float()
        kl = kl_divergence(original.double(), skipped_logits.double()).float().cpu()
        ids = trace.generated_ids
        answer_prob = skipped_logits.softmax(-1).gather(-1, ids.unsqueeze(-1))[:, 0]
        scores = skipped_logits.clone()
        scores[:, model.placeholder_ids] = float("-inf")  # never generated
        forced = (scores.argmax(-1) == ids).float()
        n = min(len(generated), len(ids))
        agreement = (generated[:n] == ids[:n]).float().sum().item() / max(len(ids), 1)
        text = model.tokenizer.decode(generated.tolist(), skip_special_tokens=True)
        return ProbeResult(
            self.name,
            {"kl": kl, "answer_prob": answer_prob, "forced_agreement": forced,
             "generated_ids": generated, "generation_agreement": torch.tensor([agreement])},
            {"kl": ("step",), "answer_prob": ("step",), "forced_agreement": ("step",),
             "generated_ids": ("new_step",), "generation_agreement": ("scalar",)},
            {"step": trace.generated_tokens},
            provenance=self.provenance(source, skipped_layers=layers, generated_text=text, original_text=trace.text,
                                       reuse="none" if skipper is None else "prefix"),
            layout=source.layout,
        )  # fmt: skip

    def run_sets(self, source: Any, sets: Mapping[str, Sequence[int]]) -> dict[str, ProbeResult]:
        """Each named skip set on one trace (one result each), sharing one skipper (so the original KV cache a
        continuation needs is computed once per trace); ``reuse`` as this probe's."""
        src = as_source(source)
        if src.trace is None:
            raise InputError("LayerSkip needs a GenerationTrace (model.trace_generation(...)), not a bare cache")
        skipper = self.skipper(src)
        return {name: LayerSkip(layers, self.reuse).run_with(src, skipper) for name, layers in sets.items()}

    def sweep(self, source: Any) -> ProbeResult:
        """Skip each single decoder layer in turn: mean KL, answer probability and agreements per layer."""
        src = as_source(source)
        rows: dict[str, list[Tensor]] = {"kl": [], "answer_prob": [], "forced_agreement": [], "generation_agreement": []}
        texts = []
        for result in self.run_sets(src, {str(i): [i] for i in range(src.model.n_layers)}).values():
            for key in rows:
                rows[key].append(result[key].float().mean())
            texts.append(result.provenance["generated_text"])
        return ProbeResult(
            "layer_skip_sweep",
            {k: torch.stack(v) for k, v in rows.items()},
            {k: ("skipped_layer",) for k in rows},
            {"skipped_layer": [str(i) for i in range(src.model.n_layers)]},
            provenance=self.provenance(src, generated_texts=texts, original_text=src.trace.text if src.trace else None),
        )


def _naive_skip(model: "HookedVLM", trace: Any, layers: list[int]) -> tuple[Tensor, Tensor]:
    """Teacher-forced step logits and a whole greedy generation, both through the hook points with ``layers`` skipped."""
    hooks = skip_layer_hooks(layers)
    skipped_logits = model.run_with_hooks(trace.inputs, fwd_hooks=hooks)[0, trace.step_positions].float().cpu()
    with model.hooks(hooks):
        generated = model.generate_ids(trace.prompt_inputs, max_new_tokens=trace.n_steps).cpu()
    return skipped_logits, generated


def _token_id(model: "HookedVLM", token: int | str) -> int:
    if isinstance(token, int):
        if not 0 <= token < model.d_vocab:
            from vlm_lens.errors import VocabularyError

            raise VocabularyError(f"token id {token} is outside the vocabulary 0..{model.d_vocab - 1}: pass an id of "
                                  "this model's tokenizer, or the token's text")  # fmt: skip
        return token
    return model.to_single_token(token)  # patching compares two single tokens; unknown words are refused there


def _inputs_of(item: Any) -> "VLMInputs":
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.trace import GenerationTrace

    if isinstance(item, GenerationTrace):
        return item.inputs
    if isinstance(item, VLMInputs):
        return item
    raise InputTypeError(f"expected VLMInputs (model.prepare) or a GenerationTrace, got {type(item).__name__}")


@register_probe
class ActivationPatching(Probe):
    """Patch the residual stream from a *source* run (e.g. another image) into a *target* run, layer by layer.

    Metric: ``logit[token_a] - logit[token_b]`` at the target's last prompt position. Arrays: ``logit_diff`` and
    ``effect`` = (patched − target) / (source − target) per patched block (``[decoder_layer]``, or
    ``[decoder_layer, position]`` with ``per_position=True``). The coordinate is ``decoder_layer`` (0..n-1, the
    ``blocks.{i}`` a hook name counts), not the lens's stack ``layer`` (0..n): patching ``blocks.i.hook_resid_post``
    changes stack index i+1.

    ``hook``: what is patched in each block: a hook suffix (``"hook_resid_post"``, the default; ``"hook_attn_out"``,
    ``"hook_mlp_out"``), a TransformerLens short name (``"resid_post"``, ``"attn_out"``), or one full hook name
    (``"blocks.6.hook_attn_out"``: that block only, unless ``layers`` says otherwise).
    """

    name = "activation_patching"

    def __init__(self, layers: Sequence[int] | None = None, positions: str | Sequence[int] = "all",
                 hook: str = "hook_resid_post", per_position: bool = False):  # fmt: skip
        if hook.startswith("blocks."):  # a full hook name: its block, and the suffix in every block patched
            _, block, suffix = hook.split(".", 2)
            if not block.isdigit():
                raise InputError(f"hook {hook!r}: a full hook name reads blocks.<layer>.<name>, e.g. 'blocks.6.hook_attn_out'")
            layers, hook = ([int(block)] if layers is None else layers), suffix
        self.layers, self.positions, self.hook, self.per_position = layers, positions, hook, per_position

    def __call__(self, target: Any, source: Any, token_a: int | str, token_b: int | str, model: "HookedVLM | None" = None) -> ProbeResult:  # type: ignore[override]
        target_inputs, source_inputs = _inputs_of(target), _inputs_of(source)
        if model is None:
            model = as_source(target).model if not hasattr(target, "model_inputs") else None
        if model is None:
            raise InputError("pass model=... when patching VLMInputs")
        return self.run_inputs(model, target_inputs, source_inputs, _token_id(model, token_a), _token_id(model, token_b))

    def run_inputs(self, model: "HookedVLM", target: "VLMInputs", source: "VLMInputs", a: int, b: int) -> ProbeResult:
        if target.input_ids.shape != source.input_ids.shape:
            raise InputError(
                f"target and source have {target.input_ids.shape[1]} and {source.input_ids.shape[1]} tokens; "
                "patching needs aligned sequences (same prompt, images with the same number of image tokens)"
            )
        layers = _layer_set(model, range(model.n_layers) if self.layers is None else self.layers)
        names = [f"blocks.{i}.{self.hook}" if "." in self.hook else act_name(self.hook, i) for i in layers]
        position = target.layout.last_prompt_position
        positions = _positions(target, self.positions)

        def metric(logits: Tensor) -> float:
            row = logits[0, position].float()
            return (row[a] - row[b]).item()

        target_logits = model.run_with_hooks(target)
        source_logits, source_cache = model.run_with_cache(source, names_filter=names)
        clean, corrupt = metric(target_logits), metric(source_logits)
        groups = [positions[i : i + 1] for i in range(len(positions))] if self.per_position else [positions]
        diffs = torch.empty(len(layers), len(groups))
        for li, name in enumerate(names):
            for gi, group in enumerate(groups):
                diffs[li, gi] = metric(model.run_with_hooks(target, fwd_hooks=[(name, _patch(source_cache[name], group))]))
        denominator = corrupt - clean
        effect = (diffs - clean) / denominator if denominator != 0 else torch.full_like(diffs, float("nan"))
        if not self.per_position:
            diffs, effect = diffs[:, 0], effect[:, 0]
        dims = ("decoder_layer", "position") if self.per_position else ("decoder_layer",)
        coords = {"decoder_layer": [str(i) for i in layers]}
        if self.per_position:
            coords["position"] = positions.tolist()
        return ProbeResult(
            self.name,
            {"logit_diff": diffs, "effect": effect},
            {"logit_diff": dims, "effect": dims},
            coords,
            provenance={"probe": self.name, "model": model.name, "hook": self.hook, "target_logit_diff": clean,
                        "source_logit_diff": corrupt, "token_a": a, "token_b": b},
            layout=target.layout,
        )  # fmt: skip

    def run(self, source: Source) -> ProbeResult:  # pragma: no cover - patching needs two runs
        raise InputTypeError("ActivationPatching is called as probe(target, source, token_a, token_b)")


def patch_all_layers(model: "HookedVLM", target: "VLMInputs", source: "VLMInputs", hook: str = "hook_resid_post") -> Tensor:
    """Logits of ``target`` with every layer's full ``hook`` activation replaced by ``source``'s."""
    names = [f"blocks.{i}.{hook}" for i in range(model.n_layers)]
    _, cache = model.run_with_cache(source, names_filter=names)
    everything = torch.arange(target.layout.n_positions)
    return model.run_with_hooks(target, fwd_hooks=[(n, _patch(cache[n], everything)) for n in names])


def _positions(inputs: "VLMInputs", which: str | Sequence[int]) -> Tensor:
    if isinstance(which, str):
        if which == "last_prompt":
            return torch.tensor([inputs.layout.last_prompt_position])
        return inputs.layout.positions(which)
    positions = torch.as_tensor(which).reshape(-1).long()
    checks.positions_in(positions, inputs.layout.n_positions)
    return positions


def _patch(source_activation: Tensor, positions: Tensor):
    def hook(activation, hook):
        patched = activation.clone()
        patched[:, positions] = source_activation[:, positions].to(activation.dtype)
        return patched

    return hook
