"""The lens on image tokens, laid out on each image's own grid: what the model "reads" at every patch, layer by layer.

For chosen stack layers, the lens at every image-token position gives the probability of chosen words (and, on
request, the top-k tokens); the positions are put back on their image's token grid (LLaVA's square patch grid;
Qwen-VL's ``image_grid_thw`` after the 2 x 2 merge; several images per prompt kept apart; a tiling family's image is
several grids, each its own slot on the ``image`` axis: LLaVA-NeXT / OneVision's thumbnail, then its tiles with the
row-end newlines as the last column; Idefics3 / SmolVLM: one grid per tile and per global image). Computed by the streaming
lens pass (:func:`vlm_lens.probes.lens_stats.lens_pass`): never ``[layers, image tokens, vocab]`` in memory.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.probes.base import Probe, Source, layer_labels, register_probe
from vlm_lens.probes.lens_stats import lens_pass
from vlm_lens.probes.lenses import Lens, LogitLens
from vlm_lens.probes.result import ProbeResult


def on_grids(values: Float[Tensor, "layer pos *rest"], grids: Sequence[tuple[int, int]]) -> Float[Tensor, "layer image row col *rest"]:
    """Image-token values in sequence order -> ``[layer, image, row, col, ...]`` (row-major per image; cells past a
    smaller image's grid are NaN)."""
    rows, cols = max(r for r, _ in grids), max(c for _, c in grids)
    out = torch.full((values.shape[0], len(grids), rows, cols, *values.shape[2:]), float("nan"), dtype=values.dtype)
    start = 0
    for index, (r, c) in enumerate(grids):
        out[:, index, :r, :c] = values[:, start : start + r * c].reshape(values.shape[0], r, c, *values.shape[2:])
        start += r * c
    return out


@register_probe
class ImagePatchLens(Probe):
    """The lens over the image-token positions, on each image's grid.

    ``words``: the words whose probability is read at every patch (each must be one token; an int is a token id);
    ``layers``: stack indices
    (default all: 0 = embeddings, l = after decoder layer l-1); ``variant``: ``"correct"`` (final norm + unembedding)
    or ``"paper"`` (the authors' lens); ``lens``: another :class:`~vlm_lens.probes.lenses.Lens` (a tuned lens);
    ``top_k`` > 0 also keeps the top-k token ids and probabilities per patch.

    Result: ``prob`` ``[layer, image, row, col, word]`` (NaN outside a smaller image's grid), and with ``top_k``
    ``topk_ids`` / ``topk_prob`` ``[layer, image, row, col, k]``. ``probe(trace)``; a cache needs the prepared inputs
    for the grid: ``probe(cache, inputs=inputs)``. ``provenance["grids"]`` gives each grid's ``(rows, cols)`` and
    ``provenance["grid_roles"]`` what it is (``"patch k"``, ``"thumbnail k"``: a tiling family's image has several).
    """

    name = "image_patch_lens"

    def __init__(self, words: Sequence[str | int], layers: Sequence[int] | None = None,
                 variant: Literal["correct", "paper"] = "correct", lens: Lens | None = None, top_k: int = 0,
                 chunk_rows: int | None = None):  # fmt: skip
        if isinstance(words, str) or not words:
            raise InputError("words is a list of words, e.g. ImagePatchLens(words=['red'])")
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        self.words, self.layers, self.variant, self.top_k, self.chunk_rows = list(words), layers, variant, top_k, chunk_rows
        self.lens = lens if lens is not None else LogitLens(variant)

    def run(self, source: Source, inputs: Any = None) -> ProbeResult:
        model = source.model
        inputs = inputs if inputs is not None else source.inputs
        positions = source.layout.positions("image")
        if not len(positions):
            raise InputError("this input has no image tokens: ImagePatchLens reads the lens at image positions")
        grids = model.image_grids(inputs, n_image_tokens=len(positions))
        grid_roles = self.grid_roles(model, inputs, positions, grids) if inputs is not None else None
        ids = torch.tensor([model.to_single_token(w) if isinstance(w, str) else int(w) for w in self.words])
        layers = list(range(model.n_layers + 1)) if self.layers is None else [int(layer) for layer in self.layers]
        stats = lens_pass(model, source.cache.resid_stack(positions), lens=self.lens, layers=layers,
                          target_ids=ids.expand(len(positions), -1), top_k=max(1, self.top_k),
                          stats=("target",) + (("topk",) if self.top_k else ()), js_variant=self.variant,
                          chunk_rows=self.chunk_rows)  # fmt: skip
        arrays: dict[str, Tensor] = {"prob": on_grids(stats.target_prob, grids)}  # type: ignore[arg-type]
        dims: dict[str, tuple[str, ...]] = {"prob": ("layer", "image", "row", "col", "word")}
        if self.top_k:
            arrays["topk_ids"] = on_grids(stats.topk_ids.double(), grids)  # type: ignore[union-attr]  # NaN pads
            arrays["topk_prob"] = on_grids(stats.topk_prob, grids)  # type: ignore[arg-type]
            dims.update(topk_ids=("layer", "image", "row", "col", "k"), topk_prob=("layer", "image", "row", "col", "k"))
        every = layer_labels(model.n_layers)
        coords: dict[str, list] = {"layer": [every[layer] for layer in layers], "image": [str(i) for i in range(len(grids))],
                  "row": list(range(max(r for r, _ in grids))), "col": list(range(max(c for _, c in grids))),
                  "word": [w if isinstance(w, str) else model.tokenizer.convert_ids_to_tokens(int(w)) for w in self.words],
                  "k": list(range(self.top_k))}  # fmt: skip
        coords = {k: v for k, v in coords.items() if any(k in d for d in dims.values())}
        return ProbeResult(self.name, arrays, dims, coords,
                           provenance=self.provenance(source, **self.lens.describe(), grids=[list(g) for g in grids],
                                                      grid_roles=grid_roles))  # fmt: skip

    @staticmethod
    def grid_roles(model, inputs, positions, grids) -> list[str]:
        """What each grid is (:mod:`vlm_lens.roles`): ``"patch k"`` (image k, or one of its tiles) or ``"thumbnail k"``
        (a tiling family's downscaled whole image), from the fine role of its first position."""
        from vlm_lens.roles import position_roles

        fine = position_roles(model, inputs)
        image_roles = [fine[int(p)] for p in positions]
        out, start = [], 0
        for rows, cols in grids:
            out.append(image_roles[start])
            start += rows * cols
        return out
