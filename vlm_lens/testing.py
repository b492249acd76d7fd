"""Random models of the real HF vision-language classes with real offline processors, for tests and benchmarks.

``tiny``: a few layers, ~100k parameters, 4 image tokens: fast enough to build for every test session.
``medium``: LLaVA-1.5-like, ~300M parameters, 336 px / patch 14 = 576 image tokens, 32k vocabulary: benchmarks.
Models are built deterministically (fixed seeds); processors are saved to a temporary folder and reloaded from it
(TransformerLens needs a tokenizer that comes from a folder).
"""

from __future__ import annotations

import tempfile

from vlm_lens.adapters import adapter_by_family
from vlm_lens.builders import ModelSize, build_model, build_processor

TINY = ModelSize(
    d_model=64, n_layers=4, n_heads=4, d_mlp=128, vision_width=32, vision_layers=2, vision_heads=2,
    image_size=32, patch_size=16, max_positions=256,
)  # fmt: skip
MEDIUM = ModelSize(
    d_model=1024, n_layers=24, n_heads=16, d_mlp=2816, vision_width=256, vision_layers=2, vision_heads=4,
    image_size=336, patch_size=14, max_positions=2048,
)  # fmt: skip
SIZES = {"tiny": TINY, "medium": MEDIUM}
MEDIUM_VOCAB = 32000


def size_for(family: str, size: str = "tiny") -> ModelSize:
    """The size spec of ``size`` adapted to ``family`` (:attr:`~vlm_lens.adapters.AdapterSpec.adapt_size`; Qwen:
    patch halved, so a 2 x 2 merge keeps the count)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    adapt = adapter_by_family(family).adapt_size  # the family's own version of the size, if it has one
    return SIZES[size] if adapt is None else adapt(SIZES[size], size)


def _words(size: str) -> list[str]:
    from vlm_lens.zoo.shapes_world import vocabulary

    words = vocabulary()
    if size == "medium":
        words = words + [f"w{i:05d}" for i in range(MEDIUM_VOCAB - len(words) - 16)]
    return words


_FOLDERS: list[tempfile.TemporaryDirectory] = []


def build(family: str, size: str = "tiny", *, seed: int = 0):
    """``(hf_model, processor)`` of a random ``family`` model of ``size`` (float32, eval mode)."""
    spec = size_for(family, size)
    folder = tempfile.TemporaryDirectory(prefix=f"vlm-lens-{family}-")
    _FOLDERS.append(folder)  # keep the processor files for the life of the process
    processor = build_processor(family, _words(size), spec, folder.name)
    model = build_model(family, processor.tokenizer, spec, seed=seed)
    return model, processor


def save(family: str, folder, size: str = "tiny", *, seed: int = 0):
    """Save a random ``family`` model and its processor to ``folder`` (a checkpoint folder ``load`` accepts)."""
    model, processor = build(family, size, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hooked(family: str, size: str = "tiny", *, seed: int = 0):
    """A :class:`~vlm_lens.hooked.HookedVLM` over a random ``family`` model of ``size``."""
    from vlm_lens.loading import load

    model, processor = build(family, size, seed=seed)
    return load(model, processor=processor)


def sample_image(seed: int = 0, size: int = 32):
    """A deterministic shapes-world image resized to ``size`` px."""
    from PIL import Image

    from vlm_lens.zoo.shapes_world import example

    return example(seed).image.resize((size, size), Image.Resampling.BICUBIC)
