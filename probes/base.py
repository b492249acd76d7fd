"""The Probe base class, the probe registry, and how probes read a trace or a cache.

A probe is a small class: parameters in ``__init__``, the computation in ``run(source) -> ProbeResult``. Calling a
probe on a :class:`~vlm_lens.hooked.GenerationTrace` or a :class:`~vlm_lens.cache.VLMCache` normalises it to a
:class:`Source`. Register a new probe with ``@register_probe`` to make it discoverable by name
(``vlm_lens.probes.PROBES["my_probe"]``); see docs/extending.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from vlm_lens.errors import InputError, InputTypeError, OutOfRangeError
from vlm_lens.probes.result import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.cache import VLMCache
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.layout import TokenLayout
    from vlm_lens.protocol import VLMModel as HookedVLM
    from vlm_lens.trace import GenerationTrace

PROBES: dict[str, type["Probe"]] = {}


def register_probe(cls: type["Probe"]) -> type["Probe"]:
    """Class decorator: add ``cls`` to :data:`PROBES` under ``cls.name`` (names are unique)."""
    name = getattr(cls, "name", None)
    if not name or name == Probe.name:
        raise InputError(f"{cls.__name__} needs a class attribute `name` to be registered")
    existing = PROBES.get(name)
    redefined = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and existing is not cls and not redefined:  # re-running a notebook cell is fine
        raise InputError(f"a probe named {name!r} is already registered ({PROBES[name].__name__})")
    PROBES[name] = cls
    return cls


@dataclass
class Source:
    """What a probe reads: the model, the cache, the layout, and the trace when there is one."""

    model: "HookedVLM"
    cache: "VLMCache"
    layout: "TokenLayout"
    trace: "GenerationTrace | None" = None

    @property
    def inputs(self) -> "VLMInputs | None":
        return None if self.trace is None else self.trace.inputs

    @property
    def input_ids(self) -> Int[Tensor, " pos"] | None:
        """The token sequence the cache holds (a trace's cache includes the last emitted token), when known."""
        ids = getattr(self.cache, "input_ids", None)
        if ids is None and self.trace is not None:
            ids = torch.cat([self.trace.inputs.input_ids[0].cpu(), self.trace.generated_ids[-1:].cpu()])
        return ids

    def positions(self, which: str | Sequence[int] | Tensor) -> Int[Tensor, " n"]:
        """Sequence positions: ``"steps"`` (the positions predicting each generated token, a trace is needed),
        ``"last_prompt"``, a token role (``"image"``, ``"text"``, ``"generated"``, ``"all"``) or explicit indices."""
        if isinstance(which, str):
            if which == "steps":
                if self.trace is None:
                    raise InputError("positions='steps' needs a GenerationTrace (model.trace_generation(...))")
                return self.trace.step_positions.clone()
            if which == "last_prompt":
                return torch.tensor([self.layout.last_prompt_position])
            return self.layout.positions(which)
        index = torch.as_tensor(which).reshape(-1).long()
        n = self.layout.n_positions
        if index.numel() and (index.min() < 0 or index.max() >= n):
            raise OutOfRangeError(f"positions must be in 0..{n - 1}, got {index.tolist()}")
        return index

    def token_strings(self, positions: Tensor) -> list[str]:
        """The input token at each position (when the ids are known), else the position number."""
        ids = self.input_ids
        if ids is None:
            return [str(int(p)) for p in positions]
        return self.model.tokenizer.convert_ids_to_tokens(ids[positions].tolist())

    def next_tokens(self, positions: Tensor) -> Int[Tensor, " n"]:
        """The token each position predicts: the next token of the sequence (for a trace's step positions, the
        generated token), or the model's top-1 where the sequence ends or is unknown."""
        ids = self.input_ids
        final = self.cache.resid_stack(positions)[-1]
        top1 = self.model.unembed(final).argmax(-1).cpu()
        if ids is None:
            return top1
        nxt = positions + 1
        inside = nxt < ids.shape[0]
        out = top1.clone()
        out[inside] = ids[nxt[inside]]
        return out


def as_source(source: Any) -> Source:
    """A :class:`Source` from a ``GenerationTrace``, a ``VLMCache`` or a ``Source``."""
    from vlm_lens.cache import VLMCache
    from vlm_lens.trace import GenerationTrace

    if isinstance(source, Source):
        return source
    if isinstance(source, GenerationTrace):
        return Source(source.cache.model, source.cache, source.layout, source)
    if isinstance(source, VLMCache):
        if source.layouts is not None:
            raise InputError("this cache holds a batch: a probe reads one sample, e.g. probe(cache.sample(0))")
        return Source(source.model, source, source.layout, None)
    raise InputTypeError(
        f"a probe reads a GenerationTrace (model.trace_generation) or a VLMCache (model.run_with_cache), "
        f"got {type(source).__name__}"
    )


class Probe:
    """Base class of all probes: ``probe(trace_or_cache) -> ProbeResult``."""

    name: ClassVar[str] = "probe"

    def __call__(self, source: Any, **kwargs: Any) -> ProbeResult:
        return self.run(as_source(source), **kwargs)

    def run(self, source: Source) -> ProbeResult:  # pragma: no cover - abstract
        """The probe's work on one source; a subclass may take keyword options after ``source`` (``probe(trace,
        option=...)`` passes them on)."""
        raise NotImplementedError

    def provenance(self, source: Source, **extra: Any) -> dict:
        return {"probe": self.name, "model": source.model.name, "family": source.model.family, **extra}


def layer_labels(n_layers: int) -> list[str]:
    """``["0", "1", ..., str(n_layers)]``: the residual-stack layers, one numbering everywhere (stack index
    0 = embeddings, l = after decoder layer l-1, ``n_layers`` = the model's output)."""
    return [str(i) for i in range(n_layers + 1)]


def transition_labels(labels: Sequence[str]) -> list[str]:
    """``"0→1"``, ``"1→2"`` ...: adjacent-layer transitions (stack indices)."""
    return [f"{a}→{b}" for a, b in zip(labels[:-1], labels[1:])]
