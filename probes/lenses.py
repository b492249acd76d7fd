"""Lenses: read a next-token distribution off the residual stream at any layer.

A lens maps residual vectors of stack layers (``VLMCache.resid_stack`` indices: 0 = embeddings, ``n_layers`` =
last block) to logits. :class:`LogitLens` applies the model's own final norm and ``lm_head``; :class:`TunedLens`
first applies a learned per-layer affine translator (Belrose et al., tuned-lens), trained here on cached
multimodal activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from vlm_lens.protocol import VLMModel as HookedVLM


class Lens:
    """Base class: ``logits(model, resid, layers)`` with ``resid`` ``[n, pos, d_model]`` for stack ``layers``.

    ``logits`` must return a new tensor: :func:`vlm_lens.probes.lens_stats.lens_pass` normalises it in place.
    """

    name = "lens"
    variant = "correct"

    def logits(
        self, model: "HookedVLM", resid: Float[Tensor, "n pos d_model"], layers: Sequence[int]
    ) -> Float[Tensor, "n pos vocab"]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"lens": self.name, "variant": self.variant}


class LogitLens(Lens):
    """The logit lens.

    ``correct``: ``lm_head(norm(h_l))`` at every layer. The residual stack is raw at every layer, the last
    included, so this is exactly the model's logits at the last layer.

    ``paper``: the authors' lens over HF ``hidden_states`` (paper-spec Q1): ``lm_head(h_l)`` on the raw residual for
    l < n, and ``lm_head(norm(h_n))`` at the last layer, because HF's ``hidden_states[n]`` is already normed.
    """

    name = "logit"

    def __init__(self, variant: Literal["correct", "paper"] = "correct"):
        if variant not in ("correct", "paper"):
            raise InputError(f"variant must be 'correct' or 'paper', got {variant!r}")
        self.variant = variant

    def logits(self, model, resid, layers):
        if self.variant == "correct":
            return model.unembed(resid)
        layers = list(layers)
        out = model.unembed(resid, normed=True)
        last = [i for i, layer in enumerate(layers) if layer == model.n_layers]
        if last:
            out[last] = model.unembed(resid[last])
        return out


class TunedLens(Lens, torch.nn.Module):
    """One affine translator per layer in residual form, ``h + A_l h + b_l`` (identity at init), then the logit lens.

    The last layer (stack index ``n_layers``) has no translator: there the lens is the model's own output.
    Train with :meth:`fit`; :meth:`save` / :meth:`load` use safetensors + JSON and check the model's shape.
    """

    name = "tuned"

    def __init__(self, n_layers: int, d_model: int, d_vocab: int, model_name: str = ""):
        torch.nn.Module.__init__(self)
        self.config: dict[str, Any] = {"n_layers": n_layers, "d_model": d_model, "d_vocab": d_vocab, "model_name": model_name}
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    @classmethod
    def for_model(cls, model: "HookedVLM") -> "TunedLens":
        return cls(model.n_layers, model.d_model, model.d_vocab, model.name)

    def check_model(self, model: "HookedVLM") -> None:
        expected = {"n_layers": model.n_layers, "d_model": model.d_model, "d_vocab": model.d_vocab}
        found = {k: self.config[k] for k in expected}
        if found != expected:
            raise InputError(
                f"this tuned lens was trained for a model with {found} (model {self.config['model_name']!r}), "
                f"not {expected} ({model.name!r}): train one for this model with TunedLens.for_model(model).fit(...)"
            )

    def translate(self, resid: Float[Tensor, "n pos d_model"], layers: Sequence[int]) -> Float[Tensor, "n pos d_model"]:
        """``h + h A_lᵀ + b_l`` for layers below the last; the last layer passes unchanged."""
        n = self.config["n_layers"]
        out = resid.to(self.weight.dtype).clone()
        for i, layer in enumerate(layers):
            if layer < n:
                h = out[i]
                out[i] = h + h @ self.weight[layer].T + self.bias[layer]
        return out

    def logits(self, model, resid, layers):
        self.check_model(model)
        with torch.no_grad():
            return model.unembed(self.translate(resid.float(), list(layers)))

    def describe(self) -> dict:
        return {"lens": self.name, "variant": self.variant, **self.config}

    # -- training -------------------------------------------------------------------------------------------
    def fit(
        self,
        model: "HookedVLM",
        stacks: Iterable[Float[Tensor, "layer pos d_model"]],
        *,
        steps: int = 200,
        lr: float = 1e-2,
        batch_positions: int = 256,
        seed: int = 0,
    ) -> list[float]:
        """Train every translator by KL(final-layer distribution || tuned-lens distribution) with Adam.

        ``stacks``: residual stacks (``cache.resid_stack()``) of multimodal inputs; all positions are used.
        Returns the mean loss per step. The model's norm and ``lm_head`` stay frozen.
        """
        if not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
            raise InputError(f"lr must be a finite positive learning rate, got {lr!r} (e.g. 5e-3)")
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        self.check_model(model)
        stacks = list(stacks)
        if not stacks:
            raise InputError("no residual stacks to fit on: pass cache.resid_stack() of at least one input")
        data = torch.cat([s.detach().float().cpu() for s in stacks], dim=1)  # [layer, pos, d]
        n = self.config["n_layers"]
        if data.shape[0] != n + 1:
            raise InputError(f"expected residual stacks of {n + 1} layers, got {data.shape[0]}")
        with torch.no_grad():
            target = model.unembed(data[n]).log_softmax(-1).cpu()  # [pos, vocab]
        norm, head = model.unembedder.norm, model.unembedder.head  # frozen below, shared with the model
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        frozen = [p for p in list(norm.parameters()) + list(head.parameters())]
        saved = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        try:
            for _ in range(steps):
                index = torch.randint(0, data.shape[1], (min(batch_positions, data.shape[1]),), generator=generator)
                h = data[:n, index]  # [n, b, d]
                translated = h + torch.einsum("lbd,led->lbe", h, self.weight) + self.bias[:, None]
                log_q = head(norm(translated)).float().log_softmax(-1)
                log_p = target[index].unsqueeze(0)
                loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        finally:
            for p, flag in zip(frozen, saved):
                p.requires_grad_(flag)
        return losses

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``lens.safetensors`` and ``lens.json`` to ``folder`` atomically."""
        from safetensors.torch import save_file

        from vlm_lens.atomic import write_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()}
        write_file(folder / "lens.safetensors", lambda path: save_file(tensors, path))
        write_file(folder / "lens.json", json.dumps(self.config, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: "HookedVLM | None" = None) -> "TunedLens":
        """Load a lens saved by :meth:`save`; with ``model``, refuse one trained for another model shape."""
        from safetensors.torch import load_file

        from vlm_lens.errors import LensFileError

        folder = Path(folder)
        if not (folder / "lens.json").exists():
            raise NotFoundError(f"{folder} holds no tuned lens (lens.json missing); save one with lens.save()")
        try:
            config = json.loads((folder / "lens.json").read_text())
            n_layers, d_model, d_vocab = (int(config[k]) for k in ("n_layers", "d_model", "d_vocab"))
        except (ValueError, KeyError, TypeError) as error:
            raise LensFileError(f"{folder / 'lens.json'} is not a valid lens description ({type(error).__name__}: "
                                f"{error}); it needs integer n_layers, d_model, d_vocab: retrain with vlm-lens tune-lens") from None
        if min(n_layers, d_model, d_vocab) < 1:
            raise LensFileError(f"{folder / 'lens.json'}: n_layers, d_model and d_vocab must be positive; retrain the lens")
        try:  # the file's tensors first: their sizes are the file's, so a lens.json claiming huge shapes allocates nothing
            tensors = load_file(str(folder / "lens.safetensors"))
        except Exception as error:  # missing, zero-byte or truncated file (SafetensorError is none of the built-ins)
            raise LensFileError(f"cannot read {folder / 'lens.safetensors'} ({type(error).__name__}: {error}); "
                                "retrain the lens with vlm-lens tune-lens") from None
        shapes = {"weight": (n_layers, d_model, d_model), "bias": (n_layers, d_model)}
        for key in ("weight", "bias"):
            expected = shapes[key]
            if key not in tensors or tuple(tensors[key].shape) != expected:
                found = tuple(tensors[key].shape) if key in tensors else "missing"
                raise LensFileError(f"{folder / 'lens.safetensors'}: {key} is {found}, but lens.json describes "
                                    f"{expected}; the two files are from different lenses: retrain or restore both")
            if not bool(torch.isfinite(tensors[key]).all()):
                raise LensFileError(f"{folder / 'lens.safetensors'}: {key} holds NaN or inf values; retrain the lens "
                                    "(a lower --lr helps if training diverged)")
        lens = cls(n_layers, d_model, d_vocab, config.get("model_name", ""))
        with torch.no_grad():
            lens.weight.copy_(tensors["weight"])
            lens.bias.copy_(tensors["bias"])
        if model is not None:
            lens.check_model(model)
        return lens
