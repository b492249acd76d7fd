"""The nnsight backend: the same ``HookedVLM`` API, run through nnsight on the adapter's hook map.

``vlm_lens.load(source, backend="nnsight")`` wraps the plain HF model in ``nnsight.NNsight`` (no TransformerLens
bridge is booted, the model is not mutated). Hook names are the adapter's map (:meth:`AdapterSpec.hook_map`: name ->
module path and side), so caches, hooks, patching and the probes read the same values as on the TransformerLens
backend:

- ``run_with_cache`` / ``run_with_hooks`` / ``model(inputs)`` are one ``nnsight`` trace each: activations are saved,
  and a hook ``fn(activation, hook)`` replaces the module's output (or input) when it returns a tensor. Within a
  trace, modules are visited in execution order (nnsight requires it).
- ``trace_generation`` records activations with nnsight's generation tracing (``TransformersModel.generate``,
  ``tracer.iter[:]``: every forward of the decode loop). ``hooks(...)`` (persistent hooks inside a ``with`` block, used
  by layer skipping during a generation) are PyTorch hooks on the same modules of the map.
- ``model.nnsight`` is the ``NNsight`` object for your own interventions; ``remote=True`` passes nnsight's own
  ``remote=True`` to every trace, for NDIF (docs/backends.md: not exercised offline).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Literal, overload

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens import checks
from vlm_lens.cache import VLMCache
from vlm_lens.capture import CapturedGeneration, cut_at_eos
from vlm_lens.checks import HookFn, shape_checked
from vlm_lens.errors import InputTypeError
from vlm_lens.hooked import HookedVLM
from vlm_lens.surgery import get_module


class HookInfo:
    """What a hook function receives as ``hook`` (TransformerLens passes a HookPoint with ``.name``)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"HookInfo({self.name!r})"


def _by_name(fwd_hooks: Iterable[tuple[str | Callable, HookFn]]) -> list[tuple[str, HookFn]]:
    """``(hook name, fn)`` pairs; a name filter (a callable) is refused: nnsight hooks modules by name."""
    pairs = list(fwd_hooks)
    named = [(name, fn) for name, fn in pairs if isinstance(name, str)]
    if len(named) != len(pairs):
        raise InputTypeError("the nnsight backend takes hooks by name: (hook_name, fn) pairs")
    return named


def _first(value):
    return value[0] if isinstance(value, tuple) else value


class NNsightVLM(HookedVLM):
    """:class:`HookedVLM` on nnsight (see the module docstring)."""

    backend = "nnsight"

    def __init__(self, hf_model, processor, adapter, *, name: str, keepalive=None, remote: bool = False):
        from nnsight import NNsight

        self.nnsight = NNsight(hf_model)
        self.remote = remote
        self._n_layers = len(get_module(hf_model, adapter.layers))
        self._d_model = int(get_module(hf_model, adapter.embed_tokens).weight.shape[1])
        super().__init__(hf_model, processor, adapter, None, name=name, keepalive=keepalive)

    # -- what the bridge provided on the other backend -----------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def cfg(self):
        return SimpleNamespace(n_layers=self.n_layers, d_model=self.d_model, d_vocab=self.d_vocab,
                               model_name=self.name, backend="nnsight")  # fmt: skip

    def __repr__(self) -> str:
        return f"HookedVLM({self.name!r}, family={self.family}, n_layers={self.n_layers}, backend=nnsight)"

    def hook_names(self) -> list[str]:
        return list(self.adapter.hook_map(self.n_layers, self.hf_model.config))

    def user_hooks_active(self) -> bool:
        return False  # no bridge wrappers: the plain-module capture is always safe

    def _ordered(self, names: Iterable[str]) -> list[str]:
        """``names`` in execution order (nnsight requires it): token embeddings, the vision side, then per decoder layer its
        input, attention, MLP and output, then the final norm and the head."""
        vision_first = self.adapter.vision_before_embed
        order = {"hook_embed": (-1 if vision_first else -2, 0), "vision_projector.hook_out": (-2 if vision_first else -1, 0),
                 "ln_final.hook_normalized": (10**6, 0), "unembed.hook_out": (10**6 + 1, 0)}  # fmt: skip
        within = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_cross_attn_out": 1, "hook_resid_mid": 2, "hook_mlp_out": 3,
                  "hook_resid_post": 4}  # fmt: skip

        def key(name: str):
            if name in order:
                return order[name]
            _, layer, suffix = name.split(".", 2)
            return (int(layer), within[suffix])

        return sorted(dict.fromkeys(names), key=key)

    def _envoy(self, name: str, root=None):
        point = self.adapter.hook_map(self.n_layers, self.hf_model.config)[name]
        envoy = self.nnsight if root is None else root  # the nnsight root mirrors the HF module tree
        for part in point.path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy, point.side

    # -- forwards -----------------------------------------------------------------------------------------------
    def _names(self, names_filter) -> list[str]:
        every = self.hook_names()
        if names_filter is None:
            return every
        if isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            return [n for n in every if names_filter(n)]
        else:
            names = list(names_filter)
        self.check_hook_names(names)
        return names

    def run_with_cache(self, inputs, names_filter=None, *, grad: bool = False
                       ) -> tuple[Float[Tensor, "batch pos vocab"], VLMCache]:  # fmt: skip
        """Logits and the activations named by ``names_filter``, saved in one nnsight trace."""
        from vlm_lens.batch import VLMBatch

        input_ids, kwargs = self.forward_args(inputs)
        names = self._ordered(self._names(names_filter))
        saved = {}
        with torch.set_grad_enabled(grad), self.nnsight.trace(input_ids=input_ids, **kwargs, remote=self.remote):
            for name in names:
                envoy, side = self._envoy(name)
                if side == "input":
                    args, call_kwargs = envoy.inputs
                    value = args[0] if args else call_kwargs["hidden_states"]
                else:
                    value = _first(envoy.output)  # attention returns (output, weights)
                saved[name] = value.save()
            logits = self.nnsight.output.logits.save()
        activations = dict(saved)
        if isinstance(inputs, VLMBatch):
            return logits, VLMCache(activations, inputs.layouts[0], self, inputs.input_ids, inputs.layouts)
        return logits, VLMCache(activations, inputs.layout, self, inputs.input_ids)

    @overload
    def run_with_hooks(self, inputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *, grad: bool = False,
                       return_type: Literal["logits"] = "logits") -> Float[Tensor, "batch pos vocab"]: ...  # fmt: skip

    @overload
    def run_with_hooks(self, inputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *, grad: bool = False,
                       return_type: None) -> None: ...  # fmt: skip

    def run_with_hooks(self, inputs, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = (), *, grad: bool = False,
                       return_type: Literal["logits"] | None = "logits") -> Float[Tensor, "batch pos vocab"] | None:  # fmt: skip
        """Logits of one nnsight trace in which each ``fn(activation, hook)`` may replace its activation."""
        checks.return_type(return_type)
        input_ids, kwargs = self.forward_args(inputs)
        by_name: dict[str, list[Callable]] = {}
        for name, fn in _by_name(fwd_hooks):
            by_name.setdefault(name, []).append(fn)
        self.check_hook_names(list(by_name))
        with torch.set_grad_enabled(grad), self.nnsight.trace(input_ids=input_ids, **kwargs, remote=self.remote):
            for name in self._ordered(by_name):
                envoy, side = self._envoy(name)
                if side == "input":
                    args, call_kwargs = envoy.inputs
                    value = args[0] if args else call_kwargs["hidden_states"]
                else:
                    value = _first(envoy.output)
                for fn in by_name[name]:
                    new = fn(value, HookInfo(name))
                    value = value if new is None else new
                if side == "input":
                    if args:
                        envoy.inputs = ((value, *args[1:]), call_kwargs)
                    else:
                        envoy.inputs = (args, {**call_kwargs, "hidden_states": value})
                elif isinstance(envoy.output, tuple):
                    envoy.output = (value, *envoy.output[1:])
                else:
                    envoy.output = value
            logits = self.nnsight.output.logits.save()
        return logits if return_type == "logits" else None

    def __call__(self, inputs, *, grad: bool = False) -> Float[Tensor, "batch pos vocab"]:
        return self.run_with_hooks(inputs, [], grad=grad)

    def make_capture(self) -> "NNsightCapture":
        return NNsightCapture(self)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable, HookFn]] = ()):
        """Hooks attached for the duration of the block (PyTorch hooks on the map's modules; removed on exit)."""
        named = [(name, shape_checked(name, fn)) for name, fn in _by_name(fwd_hooks)]
        self.check_hook_names([name for name, _ in named])
        points = self.adapter.hook_map(self.n_layers, self.hf_model.config)
        handles = []
        try:
            for name, fn in named:
                module = get_module(self.hf_model, points[name].path)
                info = HookInfo(name)
                if points[name].side == "output":
                    def post(m, args, out, fn=fn, info=info):
                        new = fn(_first(out), info)
                        if new is None:
                            return None
                        return (new, *out[1:]) if isinstance(out, tuple) else new

                    handles.append(module.register_forward_hook(post))
                else:
                    def pre(m, args, kwargs, fn=fn, info=info):
                        value = args[0] if args else kwargs["hidden_states"]
                        new = fn(value, info)
                        if new is None:
                            return None
                        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()


class NNsightCapture:
    """Generation capture of the nnsight backend (the :class:`~vlm_lens.capture.GenerationCapture` protocol)."""

    def __init__(self, model: NNsightVLM):
        self.model = model
        self.generator: Any = None  # nnsight's TransformersModel over the same HF model, made on first use

    def generation(self, inputs, names, max_new_tokens: int, stop_at_eos: bool) -> CapturedGeneration:
        """Greedy generation traced by nnsight (``TransformersModel.generate``, iterating ``tracer.iter[:]``): every forward
        of the decode loop saves the mapped activations of ``names`` and the head's logits. The generated ids are
        the greedy choices over those logits (placeholders, and EOS when ``stop_at_eos=False``, suppressed), which
        is what HF's greedy decoding does; generation stops after EOS."""
        from nnsight.modeling.transformers import TransformersModel

        model = self.model
        if self.generator is None:
            self.generator = TransformersModel(model.hf_model, task="image-text-to-text", processor=model.processor,
                                                tokenizer=model.tokenizer)  # fmt: skip
        generator = self.generator
        kwargs = model.greedy_kwargs(max_new_tokens, stop_at_eos, with_logits=False)
        kwargs.pop("return_dict_in_generate"), kwargs.pop("output_logits")  # nnsight returns its own tracer
        suppressed = kwargs["suppress_tokens"]
        names = model._ordered(names)
        chunks: dict[str, list] = {name: [] for name in names}
        head_outputs: list = []
        with torch.no_grad(), generator.generate(**inputs.model_inputs, **kwargs) as tracer:
            for _ in tracer.iter[:]:  # every forward of the decode loop (nothing after this loop in the block runs)
                for name in names:
                    envoy, side = model._envoy(name, root=generator)
                    if side == "input":
                        args, call_kwargs = envoy.inputs
                        chunks[name].append(args[0] if args else call_kwargs["hidden_states"])
                    else:
                        chunks[name].append(_first(envoy.output))
                head_outputs.append(model._envoy("unembed.hook_out", root=generator)[0].output)
        step_logits = torch.stack([out[0, -1] for out in head_outputs]).float()
        masked = step_logits.clone()
        masked[:, suppressed] = float("-inf")
        generated = cut_at_eos(masked.argmax(-1), model.tokenizer.eos_token_id)
        store = {name: [chunk.detach() for chunk in chunks[name]] for name in names}
        return CapturedGeneration(store, generated.to(model.device), step_logits[: len(generated)])

    def generation_batch(self, samples, names, max_new_tokens: int, stop_at_eos: bool) -> None:
        return None  # nnsight traces one generation at a time: the caller traces the samples one by one
