"""HookedVLM: a HuggingFace vision-language model with TransformerLens hook names, token roles and generation traces.

The face of the package; each job lives in its own module: loading (:mod:`vlm_lens.loading`), inputs and their
layout (:mod:`vlm_lens.inputs`, :mod:`vlm_lens.layout`, :mod:`vlm_lens.batch`), hooked forwards through the
TransformerLens bridge (here), generation traces (:mod:`vlm_lens.trace`), the bridge's module surgery
(:mod:`vlm_lens.surgery`), the unembedding (:mod:`vlm_lens.unembed`), TransformerLens names
(:mod:`vlm_lens.conventions`), and the nnsight backend (:mod:`vlm_lens.nnsight_backend`). Caches, traces and probes
type the model with the leaf :class:`vlm_lens.protocol.VLMModel`.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterable, Literal, Sequence, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens import checks
from vlm_lens import inputs as inputs_module
from vlm_lens import trace as trace_module
from vlm_lens.adapters import AdapterSpec
from vlm_lens.batch import VLMBatch
from vlm_lens.cache import VLMCache, resid_names
from vlm_lens.capture import GenerationCapture, TransformerLensCapture, cut_at_eos
from vlm_lens.checks import HookFn, shape_checked
from vlm_lens.conventions import TransformerLensNames
from vlm_lens.errors import InputError, InputTypeError, OutOfRangeError, UnknownNameError
from vlm_lens.inputs import VLMInputs
from vlm_lens.surgery import get_module, is_library_hook, original, unwrapped
from vlm_lens.trace import GenerationTrace
from vlm_lens.unembed import Unembedder

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
class HookedVLM(TransformerLensNames):
    """A vision-language model with TransformerLens hook points (``blocks.{i}.hook_resid_post`` ...).

    Build one with :func:`vlm_lens.load`. ``hf_model`` is the HF model (mutated in place by the bridge: wrapped
    layers, eager attention); ``bridge`` is the TransformerLens ``TransformerBridge``.
    """

    fixture_block: Any = None  # a fixture's permanent attention block (vlm_lens.loading.with_fixture_block)

    def __init__(self, hf_model, processor, adapter: AdapterSpec, bridge, *, name: str, keepalive: Any = None):
        self.hf_model = hf_model
        self.processor = processor
        self.adapter = adapter
        self.bridge = bridge
        self.name = name
        self._keepalive = keepalive  # a temporary processor folder that must outlive the model
        self.image_token_id = adapter.image_token_id(hf_model.config)
        d_model = int(original(get_module(hf_model, adapter.embed_tokens)).weight.shape[1])
        self.unembedder = Unembedder(original(get_module(hf_model, adapter.final_norm)),
                                     original(get_module(hf_model, adapter.lm_head)), d_model)  # fmt: skip
        # how this backend records a generation (the seam trace / batch_trace use; docs/backends.md)
        self.capture: GenerationCapture = self.make_capture()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return self.unembedder.d_vocab

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def resid_names(self) -> list[str]:
        """The hook names of the residual stack for this family (``names_filter=model.resid_names``)."""
        return resid_names(self.n_layers, self.adapter.resid_read)

    def __repr__(self) -> str:
        return f"HookedVLM({self.name!r}, family={self.family}, n_layers={self.n_layers}, d_model={self.d_model})"

    def hook_names(self) -> list[str]:
        """Every hook name the model offers."""
        return list(self.bridge.hook_dict)

    # -- inputs ---------------------------------------------------------------------------------------------
    def forward_args(self, inputs: VLMInputs | VLMBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """``(input_ids, other forward keyword arguments)`` of prepared inputs, on the model's device."""
        if not isinstance(inputs, (VLMInputs, VLMBatch)):
            raise InputTypeError(f"expected VLMInputs from model.prepare(images, prompt), got {type(inputs).__name__}")
        for sample in inputs.samples if isinstance(inputs, VLMBatch) else [inputs]:
            checks.inputs_fit(self, sample)
        kwargs = dict(inputs.model_inputs)
        return kwargs.pop("input_ids"), kwargs

    # -- hooked forwards ------------------------------------------------------------------------------------
    def run_with_cache(
        self, inputs: VLMInputs, names_filter: NamesFilter = None, *, grad: bool = False
    ) -> tuple[Float[Tensor, "1 pos vocab"], VLMCache]:
        """Logits and the activations named by ``names_filter`` (all hooks when None: ~2x a forward)."""
        input_ids, kwargs = self.forward_args(inputs)
        if isinstance(names_filter, (list, tuple)):
            self.check_hook_names(names_filter)
        elif isinstance(names_filter, str):
            self.check_hook_names([names_filter])
        with torch.set_grad_enabled(grad):
            logits, cache = self.bridge.run_with_cache(input_ids, names_filter=names_filter, **kwargs)
        if isinstance(inputs, VLMBatch):  # split per sample with cache.sample(i)
            return logits, VLMCache(dict(cache.items()), inputs.layouts[0], self, inputs.input_ids, inputs.layouts)
        return logits, VLMCache(dict(cache.items()), inputs.layout, self, inputs.input_ids)

    @overload
    def run_with_hooks(self, inputs: VLMInputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *,
                       grad: bool = False, return_type: Literal["logits"] = "logits") -> Float[Tensor, "1 pos vocab"]: ...

    @overload
    def run_with_hooks(self, inputs: VLMInputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *,
                       grad: bool = False, return_type: None) -> None: ...

    def run_with_hooks(
        self, inputs: VLMInputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *, grad: bool = False,
        return_type: Literal["logits"] | None = "logits",
    ) -> Float[Tensor, "1 pos vocab"] | None:
        """Logits of a forward with ``fwd_hooks`` (``(name, fn(activation, hook))``); removed afterwards, even
        when a hook raises. ``return_type=None`` returns nothing (the hooks' side effects are the point)."""
        checks.return_type(return_type)
        input_ids, kwargs = self.forward_args(inputs)
        fwd_hooks = checks.hook_pairs(fwd_hooks)
        self.check_hook_names([n for n, _ in fwd_hooks if isinstance(n, str)])
        with torch.set_grad_enabled(grad), self.hooks(fwd_hooks):
            logits = self.bridge(input_ids, **kwargs)
        return logits if return_type == "logits" else None

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = ()):
        """Context manager: ``fwd_hooks`` are attached inside the block and removed on exit, raise or not."""
        fwd_hooks = [(name, shape_checked(name, fn)) for name, fn in checks.hook_pairs(fwd_hooks)]
        self.check_hook_names([n for n, _ in fwd_hooks if isinstance(n, str)])
        with self.bridge.hooks(fwd_hooks=fwd_hooks):
            yield self

    def block_attention(self, queries, keys, layers, heads=None):
        """Context manager blocking attention from ``queries`` to ``keys`` in decoder ``layers`` (all heads, or ``heads``)
        around any forward, trace or generation; removed on exit (:class:`vlm_lens.attention_block.AttentionBlock`)."""
        from vlm_lens.attention_block import AttentionBlock

        return AttentionBlock(self.hf_model, self.adapter, queries, keys, layers, heads)

    def check_hook_names(self, names: Iterable[str]) -> None:
        """Raise :class:`~vlm_lens.errors.UnknownNameError` (with close matches) for a name this model does not offer."""
        known = set(self.hook_names())  # each backend says which names it offers
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; list them with model.hook_names()"
                raise UnknownNameError(f"unknown hook name {name!r}{hint}")

    # -- lens -----------------------------------------------------------------------------------------------
    def unembed(
        self, resid: Float[Tensor, "... d_model"], layer: int | None = None, *, normed: bool = False, grad: bool = False
    ) -> Float[Tensor, "... vocab"]:
        """Logits (float32) of residual-stream vectors: final norm, then ``lm_head``. ``layer`` is the index in
        :meth:`VLMCache.resid_stack` the vectors came from (0 = embeddings, ``n_layers`` = last block); it is
        range-checked. ``normed=True`` skips the norm, for vectors that are already normed (HF's ``hidden_states[-1]``,
        ``ln_final.hook_normalized``) or to reproduce the paper's no-norm lens. ``grad=True`` keeps the autograd graph
        (gradients flow to ``resid`` and, if they require them, to the norm and ``lm_head``); by default nothing is
        recorded."""
        if layer is not None and not 0 <= layer <= self.n_layers:
            raise OutOfRangeError(f"layer {layer} out of range: the residual stack has layers 0..{self.n_layers}")
        return self.unembedder(resid, normed=normed, grad=grad)

    # -- generation -----------------------------------------------------------------------------------------
    @property
    def placeholder_ids(self) -> list[int]:
        """Token ids that stand for image/video features (never generated: see :meth:`generate_ids`)."""
        return self.adapter.placeholder_ids(self.hf_model.config)

    def generate_ids(self, inputs: VLMInputs, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> Int[Tensor, " step"]:
        """Greedy generation with HF (KV cache), stopping at EOS (which is kept).

        Image/video placeholder ids are suppressed: a generated placeholder would be read as an image slot by any
        later forward over the sequence (and fail for want of features). ``stop_at_eos=False`` suppresses EOS too,
        so exactly ``max_new_tokens`` tokens come out (fixed-length benchmarks).
        """
        return self.greedy_generate(inputs, checks.new_tokens(max_new_tokens), stop_at_eos)[0]

    def suppressed_ids(self, stop_at_eos: bool) -> list[int]:
        """Ids greedy generation never emits: the image/video placeholders, and EOS without ``stop_at_eos``."""
        eos = self.tokenizer.eos_token_id
        return self.placeholder_ids + ([] if stop_at_eos or eos is None else [eos])

    @property
    def pad_token_id(self) -> int:
        """The id padded batches and generation use: the tokenizer's pad token, else EOS, else 0."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def greedy_kwargs(self, max_new_tokens: int, stop_at_eos: bool, with_logits: bool) -> dict:
        """The keyword arguments of every greedy HF ``generate`` call (single and batched): no sampling, EOS and pad
        ids, placeholders suppressed (and EOS too without ``stop_at_eos``)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                    top_k=None, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id,
                    suppress_tokens=self.suppressed_ids(stop_at_eos), return_dict_in_generate=True,
                    output_logits=with_logits)  # fmt: skip

    def greedy_generate(self, inputs: VLMInputs, max_new_tokens: int, stop_at_eos: bool, with_logits: bool = False):
        """``(generated ids, step logits or None)`` of one greedy HF generation (:meth:`greedy_kwargs`): the ids up to
        and including the first EOS, and with ``with_logits`` the float32 logits that chose each of them."""
        kwargs = self.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits)
        inputs_module.check_positions(self, inputs.input_ids.shape[1], max_new_tokens)
        with torch.no_grad():
            out = self.hf_model.generate(**inputs.model_inputs, **kwargs)
        generated = cut_at_eos(out.sequences[0, inputs.input_ids.shape[1] :], self.tokenizer.eos_token_id)
        logits = torch.stack(out.logits)[: len(generated), 0].float() if with_logits else None
        return generated, logits

    def image_grids(self, inputs: VLMInputs | None = None, n_image_tokens: int | None = None) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's tokens in ``inputs`` (row-major within an image, images in order): the
        family's rule (:meth:`~vlm_lens.adapters.AdapterSpec.grids`; Qwen-VL reads ``image_grid_thw`` from the
        inputs, LLaVA needs only the number of image tokens)."""
        if n_image_tokens is None:
            if inputs is None:
                raise InputError("image_grids needs the prepared inputs (model.prepare(...)) or the number of image tokens")
            n_image_tokens = int(inputs.layout.image.sum())
        return self.adapter.grids(self.hf_model.config, None if inputs is None else inputs.model_inputs, n_image_tokens)

    def extend(self, inputs: VLMInputs, new_ids: Int[Tensor, " step"]) -> VLMInputs:
        """``inputs`` followed by ``new_ids`` (marked ``generated`` in the layout; :func:`vlm_lens.inputs.extend`)."""
        return inputs_module.extend(self, inputs, new_ids)

    def make_capture(self) -> GenerationCapture:
        """This backend's :class:`~vlm_lens.capture.GenerationCapture` (a backend subclass returns its own)."""
        return TransformerLensCapture(self)

    def user_hooks_active(self) -> bool:
        """Whether a user's forward hook sits where unwrapping would skip it: on a hook point, or on a
        TransformerLens wrapper. Hooks on the HF modules themselves keep firing unwrapped, and the libraries' own
        bookkeeping hooks (transformers' output capturing, the bridge's capture wiring) are not the user's."""
        if any(point._forward_hooks or point._forward_pre_hooks for point in self.bridge.hook_dict.values()):
            return True
        with unwrapped(self.hf_model):
            kept = {id(module) for module in self.hf_model.modules()}
        for module in self.hf_model.modules():
            if id(module) in kept:
                continue
            hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
            if any(not is_library_hook(hook) for hook in hooks):
                return True
        return False

    # -- inputs (vlm_lens.inputs) -------------------------------------------------------------------------------
    @overload
    def prepare(self, images: Any, prompt: str) -> VLMInputs: ...

    @overload
    def prepare(self, images: Any, prompt: Sequence[str]) -> VLMInputs | VLMBatch: ...

    def prepare(self, images: Any, prompt: str | Sequence[str]) -> VLMInputs | VLMBatch:
        """Model inputs for ``images`` (PIL images or paths; one, a list, or none) and ``prompt``
        (:func:`vlm_lens.inputs.prepare`: chat template, image placeholders, family inputs, token layout).

        A list of prompts gives a :class:`~vlm_lens.batch.VLMBatch` (one padded forward, per-sample layouts).
        """
        return inputs_module.prepare(self, images, prompt)

    # -- generation traces (vlm_lens.trace) ---------------------------------------------------------------------
    def trace_generation(self, inputs: VLMInputs, max_new_tokens: int = 32, names_filter: NamesFilter = None, *,
                         stop_at_eos: bool = True,
                         capture: Literal["auto", "generate", "reforward"] = "auto") -> GenerationTrace:  # fmt: skip
        """Greedy-generate and cache the activations of every processed position (:func:`vlm_lens.trace.trace_generation`:
        recorded during HF generation itself; ``capture="reforward"`` re-runs one cached forward)."""
        return trace_module.trace_generation(self, inputs, max_new_tokens, names_filter, stop_at_eos=stop_at_eos,
                                             capture=capture)  # fmt: skip

    def trace_batch(self, inputs: list[VLMInputs] | VLMBatch, max_new_tokens: int = 32, *, stop_at_eos: bool = True,
                    prefixes=None) -> list[GenerationTrace]:  # fmt: skip
        """One :class:`GenerationTrace` per sample, equal to ``trace_generation(sample, max_new_tokens)``, from a
        single batched HF generation (:func:`vlm_lens.batch_trace.trace_generation_batch`: left padding, the residual
        stack and ``ln_final.hook_normalized`` recorded on the plain HF modules, split per sample). With a hook of
        yours active, or on the nnsight backend, one at a time instead. ``prefixes`` (a
        :class:`~vlm_lens.shared_prefix.PrefixCache`): questions about one image share its prefill."""
        max_new_tokens = checks.new_tokens(max_new_tokens)
        from vlm_lens.batch_trace import trace_generation_batch

        return trace_generation_batch(self, inputs, max_new_tokens, stop_at_eos=stop_at_eos, prefixes=prefixes)
