"""TransformerLens conventions on :class:`~vlm_lens.hooked.HookedVLM`: the names a TransformerLens user reaches for.

==========================  ===================================================================================
TransformerLens             vlm-lens
==========================  ===================================================================================
``model(tokens)``           ``model(inputs)``: logits ``[batch, pos, vocab]`` of prepared inputs (a plain forward)
``model.cfg``               the bridge's TransformerLens config (``n_layers``, ``d_model``, ``d_vocab`` ...)
``model.W_U``               ``lm_head`` weight as ``[d_model, d_vocab]`` (shared with the model, not a copy)
``model.to_str_tokens``     token strings of prepared inputs, of a string, or of ids
``model.to_single_token``   the id of a string that is exactly one token (ValueError naming the count otherwise)
``model.to_tokens``         ids of a string (no special tokens, no chat template)
``model.generate``          greedy text of prepared inputs (``return_type="tokens"``: the ids)
``model.blocks``            the decoder blocks (the bridge's on TransformerLens, the HF layers on nnsight)
``model.hook_dict``         hook name -> hook point (TransformerLens) or the HF module it reads (nnsight)
==========================  ===================================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlm_lens.errors import InputError, InputTypeError


class TransformerLensNames:
    """Mixin for :class:`HookedVLM` (which provides ``bridge``, ``tokenizer``, ``unembedder``, ``forward_args``)."""

    if TYPE_CHECKING:  # what the model class provides
        bridge: Any
        unembedder: Any
        hf_model: Any
        adapter: Any

        @property
        def n_layers(self) -> int: ...

        def generate_ids(self, inputs: Any, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> Tensor: ...

        @property
        def tokenizer(self) -> Any: ...

        def forward_args(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]: ...

    @property
    def cfg(self):
        """The TransformerLens config of the bridge (``cfg.n_layers``, ``cfg.d_model``, ...)."""
        return self.bridge.cfg

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding as TransformerLens lays it out, ``[d_model, d_vocab]`` (a view of ``lm_head.weight``)."""
        return self.unembedder.W_U

    def __call__(self, inputs, *, grad: bool = False) -> Float[Tensor, "batch pos vocab"]:
        """Logits of prepared inputs (``model.prepare(...)``), through the hooked model; no cache kept."""
        input_ids, kwargs = self.forward_args(inputs)
        with torch.set_grad_enabled(grad):
            return self.bridge(input_ids, **kwargs)

    @property
    def blocks(self) -> Any:
        """The decoder blocks, indexable by decoder layer: the bridge's (TransformerLens backend) or the HF layers."""
        from vlm_lens.surgery import get_module

        if self.bridge is not None:
            return self.bridge.blocks
        return get_module(self.hf_model, self.adapter.layers)

    @property
    def hook_dict(self) -> dict[str, Any]:
        """Hook name -> the hook point (TransformerLens backend), or -> the HF module the name reads (nnsight)."""
        from vlm_lens.surgery import get_module

        if self.bridge is not None:
            return dict(self.bridge.hook_dict)
        return {name: get_module(self.hf_model, point.path) for name, point in self.adapter.hook_map(self.n_layers, self.hf_model.config).items()}

    def generate(self, inputs: Any, max_new_tokens: int = 32, *, stop_at_eos: bool = True, return_type: str = "str",
                 correction: Any = None) -> Any:  # fmt: skip
        """Greedy generation of prepared inputs (``model.prepare(image, question)``), as TransformerLens's
        ``model.generate`` (greedy only): the text (``return_type="str"``) or the generated ids (``"tokens"``).

        ``correction``: a decoding correction choosing every token (:mod:`vlm_lens.probes.decoding`: ``Skip``,
        ``DeCo``, ``DoLa``, ``VCD``; ``vlm_lens.experiments.analysis.evidence_decoding.Evidence``), run by
        :func:`vlm_lens.guided.generate_corrected`; ``return_type="result"`` then returns its
        :class:`~vlm_lens.guided.CorrectedGeneration` (ids, text, what it did at each step)."""
        if return_type not in ("str", "tokens", "result"):
            raise InputError(f"return_type must be 'str', 'tokens' or 'result', got {return_type!r}")
        if correction is not None:
            from vlm_lens.guided import generate_corrected

            result = generate_corrected(self, inputs, correction, max_new_tokens, stop_at_eos=stop_at_eos)
            return {"str": result.text, "tokens": result.ids, "result": result}[return_type]
        if return_type == "result":
            raise InputError("return_type='result' describes a corrected generation: pass correction=...")
        ids = self.generate_ids(inputs, max_new_tokens, stop_at_eos=stop_at_eos)
        if return_type == "tokens":
            return ids
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def to_tokens(self, text: str) -> Int[Tensor, " pos"]:
        """Token ids of ``text`` as the tokenizer encodes it (no special tokens, no chat template)."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def to_str_tokens(self, value: Any) -> list[str]:
        """Token strings of prepared inputs (one sample), of a string, or of a sequence / tensor of ids."""
        from vlm_lens.inputs import VLMInputs

        if isinstance(value, VLMInputs):
            ids = value.input_ids[0].tolist()
        elif isinstance(value, str):
            ids = self.to_tokens(value).tolist()
        elif isinstance(value, Tensor):
            ids = value.reshape(-1).tolist()
        elif isinstance(value, Sequence):
            ids = [int(i) for i in value]
        else:
            raise InputTypeError(f"to_str_tokens takes VLMInputs, a string or token ids, got {type(value).__name__}")
        return self.tokenizer.convert_ids_to_tokens(ids)

    def to_single_token(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token."""
        ids = self.to_tokens(text).tolist()
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise InputError(f"{text!r} is {len(ids)} tokens {pieces}, not one: pass a single-token string")
        unk = self.tokenizer.unk_token_id
        if unk is not None and ids[0] == unk and text != self.tokenizer.unk_token:
            from vlm_lens.errors import VocabularyError

            raise VocabularyError(f"{text!r} is not in this model's vocabulary (it encodes to {self.tokenizer.unk_token}): "
                                  "pick a word the model knows (model.to_str_tokens shows how text is split)")
        return ids[0]
