"""Token ablation: remove what chosen image positions carry into the language model, and measure the answer.

The image features enter the language model at stack index 0 (``blocks.0.hook_resid_pre``: the token embeddings with
the projected image features merged in). Ablating a set of positions replaces their vectors there — by the mean of
this input's image-token vectors (``mode="mean"``: the positions still look like image tokens, their content is gone)
or by zeros (``mode="zero"``) — for the forward that scores the answer and for the whole greedy generation (the
prefill carries them into the KV cache). Qwen3-VL adds deepstack image features after its first decoder layers: those
are not ablated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.probes.base import Probe, Source, register_probe
from vlm_lens.probes.result import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.inputs import VLMInputs

ENTRY = "blocks.0.hook_resid_pre"  # where the image features enter the language model


def ablation_hook(positions: Tensor, image: Tensor, mode: str):
    """A hook replacing ``positions`` of ``[batch, pos, d]`` by the image tokens' mean (``mode="mean"``) or zeros."""

    def hook(activation: Tensor, hook: Any = None) -> Tensor | None:
        if activation.shape[1] <= int(positions.max()):  # a decoding step: the image positions are in the KV cache
            return None
        out = activation.clone()
        if mode == "mean":
            out[:, positions] = activation[:, image].mean(1, keepdim=True).to(out.dtype)
        else:
            out[:, positions] = 0
        return out

    return hook


@register_probe
class TokenAblation(Probe):
    """Ablate image-token ``positions`` (indices into the sequence, or ``"image"`` for all of them) and compare the
    answer with and without: ``answer_prob`` ``[condition]`` (the probability of ``answer``'s token at the last prompt
    position, with ``condition`` = ``["original", "ablated"]``) and, in the provenance, both greedy generations.

    ``probe(inputs, positions, answer, model=model, mode="mean")``; ``mode``: ``"mean"`` (this input's mean image-token
    vector) or ``"zero"``.
    """

    name = "token_ablation"

    def __init__(self, mode: Literal["mean", "zero"] = "mean", max_new_tokens: int = 4):
        if mode not in ("mean", "zero"):
            raise InputError(f"mode must be 'mean' or 'zero', got {mode!r}")
        self.mode, self.max_new_tokens = mode, max_new_tokens

    def __call__(self, inputs: "VLMInputs", positions: Sequence[int] | Tensor | str, answer: str, *,  # type: ignore[override]
                 model: Any) -> ProbeResult:  # fmt: skip
        image = inputs.layout.image
        chosen = inputs.layout.positions("image") if isinstance(positions, str) else torch.as_tensor(positions).long().reshape(-1)
        if not len(chosen) or not bool(image[chosen].all()):
            raise InputError("positions must be image-token positions of these inputs (inputs.layout.positions('image'))")
        target = model.to_single_token(answer)
        last = inputs.layout.last_prompt_position
        hook = [(ENTRY, ablation_hook(chosen, image, self.mode))]
        probs, texts = [], []
        for hooks in ([], hook):
            logits = model.run_with_hooks(inputs, fwd_hooks=hooks)
            probs.append(logits[0, last].float().softmax(-1)[target])
            with model.hooks(hooks):
                ids = model.generate_ids(inputs, self.max_new_tokens)
            texts.append(model.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return ProbeResult(self.name, {"answer_prob": torch.stack(probs)}, {"answer_prob": ("condition",)},
                           {"condition": ["original", "ablated"]},
                           provenance={"probe": self.name, "model": model.name, "mode": self.mode, "answer": answer,
                                       "positions": chosen.tolist(), "generated": texts},
                           layout=inputs.layout)  # fmt: skip

    def run(self, source: Source) -> ProbeResult:  # pragma: no cover - ablation runs the model on inputs
        raise InputError("TokenAblation is called as probe(inputs, positions, answer, model=model)")
