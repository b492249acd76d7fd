"""The unembedding as one public object: the model's final norm and ``lm_head``, shared (not copied).

``model.unembedder(resid)`` is the logit lens; :class:`~vlm_lens.probes.TunedLens` trains through it;
``model.unembed`` and ``model.W_U`` are its shortcuts (as tuned-lens's ``Unembed`` does for a causal LM).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError


class Unembedder:
    """``logits = lm_head(norm(h))``, float32. The modules are the model's own: nothing is copied, and gradients
    reach their parameters only if those require grad (the model's do unless you freeze them)."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Linear, d_model: int):
        self.norm, self.head, self.d_model = norm, head, d_model

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.head.weight.T

    @property
    def d_vocab(self) -> int:
        return int(self.head.weight.shape[0])

    def normalize(self, resid: Float[Tensor, "... d_model"], *, grad: bool = False) -> Float[Tensor, "... d_model"]:
        """The final norm of every vector (in the model's dtype and device)."""
        weight = self.head.weight
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.norm(resid.to(device=weight.device, dtype=weight.dtype))

    def __call__(self, resid: Float[Tensor, "... d_model"], *, normed: bool = False, grad: bool = False
                 ) -> Float[Tensor, "... vocab"]:  # fmt: skip
        """Logits of residual vectors; ``normed=True`` skips the norm (vectors already normed, or the paper's lens)."""
        if resid.shape[-1] != self.d_model:
            raise InputError(f"expected residual vectors of size d_model={self.d_model}, got {resid.shape[-1]}")
        weight = self.head.weight
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            h = resid.to(device=weight.device, dtype=weight.dtype)
            return self.head(h if normed else self.norm(h)).float()
