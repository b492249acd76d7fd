"""Decoding corrections that read intermediate layers or a contrast input, for :func:`vlm_lens.guided.generate_corrected`.

Each method is one small pure function over logits (its formula and shapes in the docstring) and one small class that
feeds it from a decoding step. Layers are stack indices (0 = embeddings, l = after decoder layer l-1); the published
layer choices, given for 32-layer models, are scaled to depth as elsewhere (``round(l * n / 32)``). The intermediate
layers are read with the correct lens (the model's final norm and unembedding).

- ``Skip(layers)``: decoder layers skipped for the whole generation (the paper's skip.2 as a decoder).
- ``DeCo(alpha=0.6, top_p=0.9, layers=20-28 of 32)``: Wang et al. 2024, "MLLM can see? Dynamic correction decoding".
- ``DoLa(alpha=1, head=0.1, layers="high")``: Chuang et al. 2024, "DoLa: decoding by contrasting layers".
- ``VCD(alpha=1, beta=0.2, noise_step=500)``: Leng et al. 2024, "Visual contrastive decoding" (the noised image is a
  second batch row whose KV cache grows alongside).

Each has a neutral setting (``alpha=0``, an empty skip set) under which it reproduces plain greedy decoding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.probes.metrics import js_divergence

NEG_INF = float("-inf")


def scaled(layer: int, n_layers: int) -> int:
    """A layer index given for a 32-layer model, at the same relative depth of an ``n_layers`` model."""
    return round(layer * n_layers / 32)


def top_p_mask(logits: Float[Tensor, " vocab"], top_p: float) -> Tensor:
    """The smallest set of tokens whose probability mass reaches ``top_p`` (the top-1 always in it), as a bool mask."""
    probs = logits.float().softmax(-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(-1) - probs[order]  # mass of the tokens ranked above each one
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order[before < top_p]] = True
    return mask


def deco_scores(final: Float[Tensor, " vocab"], layers: Float[Tensor, "layer vocab"], alpha: float,
                top_p: float) -> Float[Tensor, " vocab"]:  # fmt: skip
    """DeCo: candidates C = the top-p set of softmax(final); for each layer j, c_j = max_{v in C} softmax(layers[j])_v;
    j* = argmax_j c_j; out_v = final_v + alpha * c_{j*} * layers[j*]_v for v in C, -inf elsewhere."""
    candidates = top_p_mask(final, top_p)
    confidence = layers.float().softmax(-1)[:, candidates].amax(-1)  # [layer]
    anchor = int(confidence.argmax())
    out = final.float() + alpha * confidence[anchor] * layers[anchor].float()
    return out.masked_fill(~candidates, NEG_INF)


def dola_scores(final: Float[Tensor, " vocab"], layers: Float[Tensor, "layer vocab"], alpha: float = 1.0,
                head: float = 0.1) -> Float[Tensor, " vocab"]:  # fmt: skip
    """DoLa: q_N = softmax(final), q_j = softmax(layers[j]); M = argmax_j JS(q_N, q_j) (the premature layer that differs
    most); out_v = log q_N(v) - alpha * log q_M(v) for v with q_N(v) >= head * max q_N, -inf elsewhere (alpha = 1 is the
    published contrast)."""
    log_final = final.float().log_softmax(-1)
    premature = int(js_divergence(final.float().expand_as(layers), layers.float()).argmax())
    out = log_final - alpha * layers[premature].float().log_softmax(-1)
    return out.masked_fill(log_final < log_final.max() + torch.log(torch.tensor(head)), NEG_INF)


def vcd_scores(logits: Float[Tensor, " vocab"], contrast: Float[Tensor, " vocab"], alpha: float = 1.0,
               beta: float = 0.2) -> Float[Tensor, " vocab"]:  # fmt: skip
    """VCD: out_v = (1 + alpha) * logits_v - alpha * contrast_v for v with p(v) >= beta * max p (p = softmax(logits)),
    -inf elsewhere; ``contrast``: the logits of the same sequence with the image noised."""
    logits = logits.float()
    out = (1 + alpha) * logits - alpha * contrast.float()
    return out.masked_fill(logits < logits.max() + torch.log(torch.tensor(beta)), NEG_INF)


def noised_pixels(pixel_values: Tensor, step: int = 500, seed: int = 0) -> Tensor:
    """VCD's distortion: the forward diffusion process at ``step`` of 1000 (betas = sigmoid(linspace(-6, 6)) scaled to
    [1e-5, 5e-3]): sqrt(a_t) x + sqrt(1 - a_t) eps, eps ~ N(0, 1) from ``seed``, on the processor's pixel values."""
    if not 0 <= step < 1000:
        raise InputError(f"noise_step must be in 0..999, got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[step]
    noise = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(seed)).to(pixel_values)
    return alpha_bar.sqrt() * pixel_values + (1 - alpha_bar).sqrt() * noise


class Method:
    """What every correction shares: no contrast input, nothing held during generation, layers not read."""

    name: ClassVar[str] = "greedy"
    reads_layers: ClassVar[bool] = False

    def contrast_inputs(self, model: Any, inputs: Any) -> Any:
        return None

    def active(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def scores(self, model: Any, inputs: Any, step: Any) -> Tensor:
        return step.logits

    def layer_logits(self, model: Any, step: Any, layers: Sequence[int]) -> Tensor:
        return model.unembed(step.stack[list(layers)])


@dataclass
class Skip(Method):
    layers: Sequence[int] = ()
    name: ClassVar[str] = "skip"

    def active(self, model: Any) -> contextlib.AbstractContextManager:
        from vlm_lens.prefix_skip import skipping

        bad = [l for l in self.layers if not 0 <= l < model.n_layers]
        if bad:
            raise InputError(f"skip: decoder layers are 0..{model.n_layers - 1}, got {bad}")
        return skipping(model, self.layers)


@dataclass
class DeCo(Method):
    alpha: float = 0.6
    top_p: float = 0.9
    layers: Sequence[int] | None = None  # stack layers; default 20..28 of 32, scaled (never the output layer)
    name: ClassVar[str] = "deco"
    reads_layers: ClassVar[bool] = True

    def chosen(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return list(range(scaled(20, n_layers), min(scaled(28, n_layers), n_layers - 1) + 1))

    def scores(self, model: Any, inputs: Any, step: Any) -> Tensor:
        layers = self.chosen(model.n_layers)
        return deco_scores(step.logits, self.layer_logits(model, step, layers), self.alpha, self.top_p)


@dataclass
class DoLa(Method):
    alpha: float = 1.0
    head: float = 0.1
    layers: str | Sequence[int] = "high"  # "high" / "low" half of the stack (every 2nd of 32, scaled) or stack layers
    name: ClassVar[str] = "dola"
    reads_layers: ClassVar[bool] = True

    def chosen(self, n_layers: int) -> list[int]:
        if not isinstance(self.layers, str):
            return list(self.layers)
        stride = max(1, scaled(2, n_layers))
        if self.layers not in ("high", "low"):
            raise InputError(f"DoLa layers must be 'high', 'low' or stack layers, got {self.layers!r}")
        return list(range(n_layers // 2, n_layers, stride) if self.layers == "high" else range(1, n_layers // 2, stride))

    def scores(self, model: Any, inputs: Any, step: Any) -> Tensor:
        layers = self.chosen(model.n_layers)
        return dola_scores(step.logits, self.layer_logits(model, step, layers), self.alpha, self.head)


@dataclass
class VCD(Method):
    alpha: float = 1.0
    beta: float = 0.2
    noise_step: int = 500
    seed: int = 0
    name: ClassVar[str] = "vcd"

    def contrast_inputs(self, model: Any, inputs: Any) -> Any:
        import dataclasses

        if "pixel_values" not in inputs.model_inputs:
            raise InputError("VCD contrasts with a noised image: these inputs have none")
        noised = noised_pixels(inputs.model_inputs["pixel_values"], self.noise_step, self.seed)
        return dataclasses.replace(inputs, model_inputs={**inputs.model_inputs, "pixel_values": noised})

    def scores(self, model: Any, inputs: Any, step: Any) -> Tensor:
        return vcd_scores(step.logits, step.contrast, self.alpha, self.beta)
