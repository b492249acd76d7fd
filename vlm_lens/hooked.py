"""HookedVLM: a HuggingFace vision-language model with TransformerLens hook names, token roles and generation traces.

Data flow: :func:`load` reads the model and its processor from local files (or takes them in memory), picks the
family's adapter and boots a TransformerLens ``TransformerBridge`` on it. :meth:`HookedVLM.prepare` turns images and
a question into model inputs plus a :class:`~vlm_lens.layout.TokenLayout`. :meth:`HookedVLM.run_with_cache` runs one
hooked forward; :meth:`HookedVLM.trace_generation` generates greedily with HF (KV cache) and then runs one cached
forward over prompt + generated tokens, which for a causal model equals per-step capture.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlm_lens.adapters import AdapterSpec, adapter_for
from vlm_lens.conventions import TransformerLensNames
from vlm_lens.unembed import Unembedder
from vlm_lens.batch import VLMBatch
from vlm_lens.cache import VLMCache, resid_names
from vlm_lens.layout import TokenLayout

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
HookFn = Callable[..., Any]


@dataclass
class VLMInputs:
    """Inputs of one sample: the tensors handed to the HF forward and the token layout."""

    model_inputs: dict[str, Tensor]
    layout: TokenLayout
    prompt: str
    n_images: int

    @property
    def input_ids(self) -> Int[Tensor, "1 pos"]:
        return self.model_inputs["input_ids"]

    def __repr__(self) -> str:
        layout = self.layout
        return (f"VLMInputs({layout.n_positions} positions: {int(layout.image.sum())} image, {int(layout.text.sum())} "
                f"text, {int(layout.generated.sum())} generated; {self.n_images} image(s); prompt={self.prompt[-60:]!r})")


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
    def n_steps(self) -> int:
        return int(self.generated_ids.shape[0])

    def __repr__(self) -> str:
        return (f"GenerationTrace(text={self.text!r}, steps={self.n_steps}, positions={self.layout.n_positions}, "
                f"cached={len(self.cache)} hooks, capture={self.capture!r}, lens_agrees={bool(self.lens_agrees.all())})")


class HookedVLM(TransformerLensNames):
    """A vision-language model with TransformerLens hook points (``blocks.{i}.hook_resid_post`` ...).

    Build one with :func:`vlm_lens.load`. ``hf_model`` is the HF model (mutated in place by the bridge: wrapped
    layers, eager attention); ``bridge`` is the TransformerLens ``TransformerBridge``.
    """

    def __init__(self, hf_model, processor, adapter: AdapterSpec, bridge, *, name: str, keepalive: Any = None):
        self.hf_model = hf_model
        self.processor = processor
        self.adapter = adapter
        self.bridge = bridge
        self.name = name
        self._keepalive = keepalive  # a temporary processor folder that must outlive the model
        self.image_token_id = adapter.image_token_id(hf_model.config)
        d_model = int(_original(_get_module(hf_model, adapter.embed_tokens)).weight.shape[1])
        self.unembedder = Unembedder(_original(_get_module(hf_model, adapter.final_norm)),
                                     _original(_get_module(hf_model, adapter.lm_head)), d_model)  # fmt: skip

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
    def prepare(self, images: Any, prompt: str | Sequence[str]) -> VLMInputs | VLMBatch:
        """Model inputs for ``images`` (PIL images or paths; one, a list, or none) and ``prompt``.

        ``prompt`` is the user's question: the chat template with one image placeholder per image is applied.
        A raw string that already contains the processor's image token is used as it is.

        A list of prompts gives a :class:`~vlm_lens.batch.VLMBatch` (one padded forward, per-sample layouts):
        ``images`` is then one entry per prompt (an image, a list of images, or None), or a single image shared by
        all of them.
        """
        if isinstance(prompt, (list, tuple)):
            return self._prepare_batch(images, list(prompt))
        image_list = _load_images(images)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: pass the question to ask about the image(s), e.g. 'what is this ?'")
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder and placeholder in prompt:
            n_placeholders = prompt.count(placeholder)
            if n_placeholders != len(image_list):
                raise ValueError(
                    f"the prompt has {n_placeholders} image placeholder(s) {placeholder!r} but {len(image_list)} "
                    "image(s) were given: pass one image per placeholder, or pass the bare question and let "
                    "prepare() apply the chat template"
                )
            text = prompt
        else:
            if not getattr(self.processor, "chat_template", None):
                raise ValueError(
                    "this processor has no chat template: pass a pre-templated prompt containing "
                    f"{placeholder!r} once per image"
                )
            content = [{"type": "image"} for _ in image_list] + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded = self.processor(images=image_list or None, text=[text], return_tensors="pt")
        model_inputs = {k: v for k, v in encoded.items() if isinstance(v, Tensor)}
        if self.adapter.derive_inputs is not None:
            model_inputs = self.adapter.derive_inputs(model_inputs, self.image_token_id)
        model_inputs = {k: v.to(self.device) for k, v in model_inputs.items()}
        if model_inputs["input_ids"].shape[0] != 1:
            raise ValueError("prepare() builds one sample; call it once per sample")
        layout = TokenLayout.from_ids(model_inputs["input_ids"][0].cpu(), self.image_token_id)
        self._warn_unknown_words(prompt, model_inputs["input_ids"])
        if image_list and not layout.image.any():
            raise ValueError("the processor produced no image tokens; check that the prompt template keeps them")
        return VLMInputs(model_inputs, layout, text, len(image_list))

    def _warn_unknown_words(self, prompt: str, input_ids: Tensor) -> None:
        """Warn, naming the words, when part of the prompt becomes the unknown token (the model never saw it)."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not bool((input_ids == unk).any()):
            return
        try:
            encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            words = [prompt[a:b] for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk]
        except (NotImplementedError, TypeError, KeyError):  # slow tokenizers have no offsets
            words = []
        warnings.warn(
            f"{self.name}: {', '.join(repr(w) for w in words) or 'part of the prompt'} not in the vocabulary, read as "
            f"{self.tokenizer.unk_token}; rephrase with words the model knows",
            stacklevel=3,
        )

    def _prepare_batch(self, images: Any, prompts: list[str]) -> VLMBatch:
        if not prompts:
            raise ValueError("the prompt list is empty: pass one question per sample")
        per_sample = isinstance(images, (list, tuple)) and len(images) == len(prompts)
        if isinstance(images, (list, tuple)) and not per_sample:
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts: pass one entry per prompt (an "
                             "image, a list of images, or None), or one image for all")  # fmt: skip
        samples = [self.prepare(images[i] if per_sample else images, p) for i, p in enumerate(prompts)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return VLMBatch.pad(samples, int(pad or 0))

    def _forward_args(self, inputs: VLMInputs | VLMBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(inputs, (VLMInputs, VLMBatch)):
            raise TypeError(f"expected VLMInputs from model.prepare(images, prompt), got {type(inputs).__name__}")
        kwargs = dict(inputs.model_inputs)
        return kwargs.pop("input_ids"), kwargs

    # -- hooked forwards ------------------------------------------------------------------------------------
    def run_with_cache(
        self, inputs: VLMInputs, names_filter: NamesFilter = None, *, grad: bool = False
    ) -> tuple[Float[Tensor, "1 pos vocab"], VLMCache]:
        """Logits and the activations named by ``names_filter`` (all hooks when None: ~2x a forward)."""
        input_ids, kwargs = self._forward_args(inputs)
        if isinstance(names_filter, (list, tuple)):
            self._check_names(names_filter)
        elif isinstance(names_filter, str):
            self._check_names([names_filter])
        with torch.set_grad_enabled(grad):
            logits, cache = self.bridge.run_with_cache(input_ids, names_filter=names_filter, **kwargs)
        if isinstance(inputs, VLMBatch):  # split per sample with cache.sample(i)
            return logits, VLMCache(dict(cache.items()), inputs.layouts[0], self, inputs.input_ids, inputs.layouts)
        return logits, VLMCache(dict(cache.items()), inputs.layout, self, inputs.input_ids)

    def run_with_hooks(
        self, inputs: VLMInputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *, grad: bool = False
    ) -> Float[Tensor, "1 pos vocab"]:
        """Logits of a forward with ``fwd_hooks`` (``(name, fn(activation, hook))``); removed afterwards, even
        when a hook raises."""
        input_ids, kwargs = self._forward_args(inputs)
        fwd_hooks = list(fwd_hooks)
        self._check_names([n for n, _ in fwd_hooks if isinstance(n, str)])
        with torch.set_grad_enabled(grad), self.hooks(fwd_hooks):
            return self.bridge(input_ids, **kwargs)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = ()):
        """Context manager: ``fwd_hooks`` are attached inside the block and removed on exit, raise or not."""
        fwd_hooks = list(fwd_hooks)
        self._check_names([n for n, _ in fwd_hooks if isinstance(n, str)])
        with self.bridge.hooks(fwd_hooks=fwd_hooks):
            yield self

    def _check_names(self, names: Iterable[str]) -> None:
        known = self.bridge.hook_dict
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; list them with model.hook_names()"
                raise KeyError(f"unknown hook name {name!r}{hint}")

    # -- lens -----------------------------------------------------------------------------------------------
    def unembed(
        self, resid: Float[Tensor, "... d_model"], layer: int | None = None, *, normed: bool = False, grad: bool = False
    ) -> Float[Tensor, "... vocab"]:
        """Logits (float32) of residual-stream vectors: final norm, then ``lm_head``.

        ``layer`` is the index in :meth:`VLMCache.resid_stack` the vectors came from (0 = embeddings,
        ``n_layers`` = last block); it is range-checked. ``normed=True`` skips the norm, for vectors that are
        already normed (HF's ``hidden_states[-1]``, ``ln_final.hook_normalized``) or to reproduce the paper's
        no-norm lens. ``grad=True`` keeps the autograd graph (gradients flow to ``resid`` and, if they require
        them, to the norm and ``lm_head``); by default nothing is recorded.
        """
        if layer is not None and not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} out of range: the residual stack has layers 0..{self.n_layers}")
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
        return self._generate(inputs, max_new_tokens, stop_at_eos)[0]

    def _suppressed(self, stop_at_eos: bool) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return self.placeholder_ids + ([] if stop_at_eos or eos is None else [eos])

    def _generate(self, inputs: VLMInputs, max_new_tokens: int, stop_at_eos: bool, with_logits: bool = False):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        with torch.no_grad():
            out = self.hf_model.generate(
                **inputs.model_inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
                suppress_tokens=self._suppressed(stop_at_eos), return_dict_in_generate=True, output_logits=with_logits,
            )  # fmt: skip
        generated = out.sequences[0, inputs.input_ids.shape[1] :]
        if eos is not None and (generated == eos).any():
            generated = generated[: int(torch.nonzero(generated == eos)[0]) + 1]
        logits = torch.stack(out.logits)[: len(generated), 0].float() if with_logits else None
        return generated, logits

    def extend(self, inputs: VLMInputs, new_ids: Int[Tensor, " step"]) -> VLMInputs:
        """``inputs`` followed by ``new_ids`` (marked ``generated`` in the layout)."""
        new_ids = new_ids.to(self.device).reshape(1, -1)
        n_new = new_ids.shape[1]
        model_inputs = self.adapter.extend_inputs(dict(inputs.model_inputs), new_ids)  # the family knows its inputs
        layout = TokenLayout.from_ids(
            model_inputs["input_ids"][0].cpu(), self.image_token_id, n_prompt=inputs.layout.n_prompt
        )
        if n_new == 0:
            layout = inputs.layout
        return VLMInputs(model_inputs, layout, inputs.prompt, inputs.n_images)

    def trace_generation(
        self,
        inputs: VLMInputs,
        max_new_tokens: int = 32,
        names_filter: NamesFilter = None,
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
            raise ValueError("trace_generation follows one sample: call it per sample (batch[i]); run_with_cache takes batches")
        names = list(self.resid_names + ["ln_final.hook_normalized"] if names_filter is None else
                     ([names_filter] if isinstance(names_filter, str) else names_filter))  # fmt: skip
        if capture == "auto":
            capture = "generate" if all(_PER_POSITION.match(n) for n in names) else "reforward"
        if capture not in ("generate", "reforward"):
            raise ValueError(f"capture must be 'auto', 'generate' or 'reforward', got {capture!r}")
        self._check_names(names)
        logits = None
        if capture == "generate":
            bad = [n for n in names if not _PER_POSITION.match(n)]
            if bad:
                raise ValueError(f"capture='generate' records one vector per position; {bad[:3]} are not: use capture='reforward'")
            store: dict[str, list[Tensor]] = {n: [] for n in names}

            def grab(activation, hook, key):
                store[key].append(activation.detach())
                return activation

            from functools import partial

            if all(_PLAIN.match(n) for n in names) and not self._wrapper_hooks_active():
                # Only residual-stream values are wanted and no user hook must fire: generate through the plain HF
                # modules (no wrapper dispatch, sdpa attention) and read them with torch hooks (docs/performance.md).
                capture_context = self._plain_capture(names, store)
            else:
                capture_context = self.hooks([(n, partial(grab, key=n)) for n in names])
            with capture_context:
                generated, step_logits = self._generate(inputs, max_new_tokens, stop_at_eos, with_logits=True)
            processed = self.extend(inputs, generated[:-1])
            n_positions = processed.layout.n_positions
            activations = {n: torch.cat(chunks, dim=1)[:, :n_positions] for n, chunks in store.items()}
            cache = VLMCache(activations, processed.layout, self)
        else:
            generated = self.generate_ids(inputs, max_new_tokens, stop_at_eos=stop_at_eos)
            processed = self.extend(inputs, generated[:-1])
            logits, cache = self.run_with_cache(processed, names_filter=names)
            step_logits = None
        # the sequence the cache reads plus the last emitted token: every step position predicts its generated token
        cache.input_ids = torch.cat([processed.input_ids[0].cpu(), generated[-1:].cpu()])
        n_prompt = inputs.layout.n_prompt
        step_positions = torch.arange(generated.shape[0]) + n_prompt - 1
        if logits is not None:
            step_logits = logits[0, step_positions.to(logits.device)].float()
        agrees = self._lens_agreement(cache, step_logits, step_positions, generated, stop_at_eos)
        if not bool(agrees.all()):
            warnings.warn(
                f"the lens at the last layer does not reproduce generated tokens at steps "
                f"{torch.nonzero(~agrees).flatten().tolist()} (near-tied logits between the KV-cached generation "
                "and the cached forward); per-step analyses of those steps describe the cached forward",
                stacklevel=2,
            )
        generated_cpu = generated.cpu()
        return GenerationTrace(
            inputs=processed,
            generated_ids=generated_cpu,
            generated_tokens=self.tokenizer.convert_ids_to_tokens(generated_cpu.tolist()),
            text=self.tokenizer.decode(generated_cpu.tolist(), skip_special_tokens=True),
            step_positions=step_positions,
            step_logits=step_logits.cpu(),
            cache=cache,
            lens_agrees=agrees,
            prompt_inputs=inputs,
            logits=logits,
            capture=capture,
        )

    def _wrapper_hooks_active(self) -> bool:
        """Whether a user's forward hook sits where unwrapping would skip it: on a hook point, or on a
        TransformerLens wrapper. Hooks on the HF modules themselves keep firing unwrapped, and the libraries' own
        bookkeeping hooks (transformers' output capturing, the bridge's capture wiring) are not the user's."""
        if any(point._forward_hooks or point._forward_pre_hooks for point in self.bridge.hook_dict.values()):
            return True
        with _unwrapped(self.hf_model):
            kept = {id(module) for module in self.hf_model.modules()}
        for module in self.hf_model.modules():
            if id(module) in kept:
                continue
            hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
            if any(not _is_library_hook(hook) for hook in hooks):
                return True
        return False

    @contextlib.contextmanager
    def _plain_capture(self, names: Sequence[str], store: dict[str, list[Tensor]]):
        """Within the block, the HF model runs as plain HF: every TransformerLens wrapper is swapped for the module it
        wraps, attention is sdpa, and torch hooks append the residual-stream values of ``names`` to ``store``.
        Everything is put back on exit, also when the block raises."""
        def keep(key: str, value) -> None:
            store[key].append((value[0] if isinstance(value, tuple) else value).detach())

        previous = self.hf_model.config._attn_implementation
        with _unwrapped(self.hf_model), contextlib.ExitStack() as cleanup:
            try:
                self.hf_model.set_attn_implementation("sdpa")
                cleanup.callback(self.hf_model.set_attn_implementation, previous)
            except (ValueError, ImportError):  # an architecture without sdpa: keep its attention, still unwrapped
                pass
            points = self.adapter.hook_map(self.n_layers)
            for name in names:
                module = _original(_get_module(self.hf_model, points[name].path))  # the map says where and which side
                if points[name].side == "output":
                    handle = module.register_forward_hook(lambda m, a, out, key=name: keep(key, out))
                else:
                    handle = module.register_forward_pre_hook(
                        lambda m, args, kwargs, key=name: keep(key, args[0] if args else kwargs["hidden_states"]),
                        with_kwargs=True,
                    )
                cleanup.callback(handle.remove)
            yield

    def _lens_agreement(self, cache, step_logits, step_positions, generated, stop_at_eos) -> Tensor:
        last = f"blocks.{self.n_layers - 1}.hook_resid_post"
        if last in cache:
            scores = self.unembed(cache[last][0, step_positions.to(cache[last].device)])
        else:
            scores = step_logits.clone()
        scores[:, self._suppressed(stop_at_eos)] = float("-inf")  # never generated
        return (scores.argmax(-1).cpu() == generated.cpu())


# residual-stream names a plain-HF capture can read (decoder layer inputs/outputs, the final norm's output)
_PLAIN = re.compile(r"^(blocks\.\d+\.hook_resid_(pre|post)|ln_final\.hook_normalized)$")
_PER_POSITION = re.compile(
    r"^(hook_embed|embed\.hook_out|ln_final\.hook_(in|normalized|out)|"
    r"blocks\.\d+\.(hook_(in|out|resid_pre|resid_mid|resid_post|attn_out|mlp_out)|ln[12]\.hook_normalized))$"
)


# -- loading -------------------------------------------------------------------------------------------------


def load(
    source: Any,
    *,
    processor: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "transformer_lens",
    remote: bool = False,
) -> HookedVLM:
    """Load a vision-language model as a :class:`HookedVLM`, offline.

    ``source``: an embedded model name (``vlm_lens.zoo.embedded_names()``), a local checkpoint folder with its
    processor files, a model id already in the local HF cache, or an in-memory ``PreTrainedModel`` (then
    ``processor`` is required). Nothing is downloaded; no subprocess is started.

    ``backend``: ``"transformer_lens"`` (default: a TransformerBridge, every TransformerLens hook name) or
    ``"nnsight"`` (:mod:`vlm_lens.nnsight_backend`: the same API through nnsight on the adapter's hook map, the HF
    model left unmodified; ``remote=True`` sends traces to NDIF, see docs/backends.md).
    """
    if backend not in ("transformer_lens", "nnsight"):
        raise ValueError(f"backend must be 'transformer_lens' or 'nnsight', got {backend!r}")
    if remote and backend != "nnsight":
        raise ValueError("remote=True runs on NDIF through nnsight: pass backend='nnsight'")
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{dtype} on CPU is ~250x slower than float32 on these machines: pass dtype=torch.float32 (the "
            "default), or device='cuda' for half precision"
        )
    keepalive = None
    if isinstance(source, (str, Path)):
        from vlm_lens.zoo import embedded_path

        name = str(source)
        folder = embedded_path(name) or (Path(source) if Path(source).is_dir() else None)
        architecture = _architecture_of(folder if folder is not None else name)
        spec = adapter_for(architecture)
        hf_model = _load_hf_model(folder if folder is not None else name, dtype)
        if processor is None:
            from vlm_lens.processors import load_processor

            processor = load_processor(folder if folder is not None else name)
    else:
        from transformers import PreTrainedModel

        if not isinstance(source, PreTrainedModel):
            raise TypeError(
                f"source must be a folder, a cached model id, an embedded name or a PreTrainedModel, "
                f"got {type(source).__name__}"
            )
        if processor is None:
            raise ValueError("an in-memory model needs its processor: load(model, processor=processor)")
        hf_model = source.to(dtype=dtype)
        spec = adapter_for(type(hf_model).__name__)
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(f"processor must be a multimodal processor with a .tokenizer, got {type(processor).__name__}")
    if backend == "nnsight":
        from vlm_lens.nnsight_backend import NNsightVLM

        return NNsightVLM(hf_model.to(device).eval(), processor, spec, name=name, remote=remote)
    if not getattr(tokenizer, "name_or_path", ""):
        # TransformerLens cannot boot on an in-memory tokenizer: give the bridge a copy that comes from a folder. The
        # user's processor stays the one they passed (it need not survive save_pretrained -> from_pretrained).
        from vlm_lens.processors import tokenizer_from_folder

        keepalive = tempfile.TemporaryDirectory(prefix="vlm-lens-tokenizer-")
        tokenizer = tokenizer_from_folder(tokenizer, keepalive.name)
    hf_model = hf_model.to(device).eval()
    from vlm_lens._boot import boot_bridge

    bridge = boot_bridge(hf_model, tokenizer, spec, name, str(device))
    return HookedVLM(hf_model, processor, spec, bridge, name=name, keepalive=keepalive)


def _architecture_of(source: str | Path) -> str:
    if isinstance(source, Path):
        config_path = source / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{source} has no config.json: is it a saved model folder?")
        config = json.loads(config_path.read_text())
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True).to_dict()
        except OSError as error:
            raise FileNotFoundError(
                f"{source!r} is neither an embedded model, a local folder, nor a model in the local HF cache "
                "(nothing is downloaded); pass a checkpoint folder or one of vlm_lens.zoo.embedded_names()"
            ) from error
    architectures = config.get("architectures") or [""]
    return architectures[0]


def _load_hf_model(source: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=dtype)
    model.config.architectures = [type(model).__name__]
    return model


def _load_images(images: Any) -> list:
    from PIL import Image, UnidentifiedImageError

    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    loaded = []
    for image in images:
        if isinstance(image, Image.Image):
            loaded.append(image.convert("RGB"))
            continue
        if not isinstance(image, (str, Path)):
            raise TypeError(f"images must be PIL images or paths, got {type(image).__name__}")
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                loaded.append(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read {path} as an image ({error}); pass a PNG/JPEG file or a PIL image") from error
    return loaded


def _get_module(model, dotted: str):
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _is_library_hook(hook) -> bool:
    function = getattr(hook, "func", hook)
    return (getattr(function, "__module__", None) or "").split(".")[0] in ("transformers", "transformer_lens")


@contextlib.contextmanager
def _unwrapped(root):
    """Within the block every TransformerLens wrapper under ``root`` is swapped for the HF module it wraps; the
    wrappers are put back on exit, also when the block raises."""
    swaps = []
    pending = [root]
    try:
        while pending:
            module = pending.pop()
            for name, child in list(module._modules.items()):
                original = _original(child) if child is not None else None
                if original is not child:
                    swaps.append((module, name, child))
                    module._modules[name] = original
                if original is not None:
                    pending.append(original)
        yield
    finally:
        for parent, name, wrapper in reversed(swaps):
            parent._modules[name] = wrapper


def _original(module):
    """The HF module under a TransformerLens wrapper (calling it fires no hooks)."""
    return getattr(module, "original_component", module)
