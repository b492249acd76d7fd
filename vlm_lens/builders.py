"""Build random models of the real HF vision-language classes, with offline processors, from a size spec.

Used by :mod:`vlm_lens.testing` (tiny and medium random models) and :mod:`vlm_lens.zoo` (the embedded shapes-world
models, trained from these initialisations). What differs per family lives in its adapter
(:attr:`~vlm_lens.adapters.AdapterSpec.random_model`, ``word_processor``); the settings every family shares are
here. Token ids (image, pad, eos ...) are read from the tokenizer and written into the config, never hard-coded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from vlm_lens.adapters import ModelSize, adapter_by_family
from vlm_lens.errors import InputError

__all__ = ["ModelSize", "build_model", "build_processor", "text_settings"]


def text_settings(tokenizer, size: ModelSize) -> dict:
    """The text-model config every family shares: dimensions from ``size``, vocabulary and special ids from
    ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.d_model,
        intermediate_size=size.d_mlp,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        max_position_embeddings=size.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=size.tie_embeddings,
    )


def _buildable(family: str):
    spec = adapter_by_family(family)
    if spec.random_model is None or spec.word_processor is None:
        raise InputError(f"the {family} adapter declares no random_model / word_processor: it cannot build models")
    return spec


def build_model(family: str, tokenizer, size: ModelSize, *, seed: int = 0):
    """A randomly initialised model of ``family`` whose vocabulary and special ids come from ``tokenizer``."""
    import torch

    spec = _buildable(family)
    torch.manual_seed(seed)
    model = spec.random_model(tokenizer, size, text_settings(tokenizer, size))
    # TransformerLens and nnsight read the architecture name from the config.
    model.config.architectures = [type(model).__name__]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_processor(family: str, words: Iterable[str], size: ModelSize, folder: str | Path):
    """An offline processor for ``family`` over ``words``, saved to ``folder`` and reloaded from it."""
    from vlm_lens.loading import save_and_reload

    return save_and_reload(_buildable(family).word_processor(words, size), folder)
