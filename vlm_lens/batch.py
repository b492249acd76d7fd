"""Batches of prepared samples: one padded forward, per-sample layouts.

``model.prepare(images, ["q1", "q2"])`` returns a :class:`VLMBatch`; ``run_with_cache`` / ``run_with_hooks`` / calling
the model accept it, and ``cache.sample(i)`` gives sample i's cache (its positions, layout and token ids), equal to a
forward of that sample alone. Sequences are padded on the right, so every sample keeps its own positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int, Shaped
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.layout import TokenLayout

# inputs with one entry per sequence position (along dim 1): padded on the right (value), everything else is
# concatenated. Mllama's cross_attention_mask [batch, pos, n_images, n_tiles]: pads see no image.
PER_POSITION_PAD = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0,
                    "cross_attention_mask": 0}


def concat_per_image(values: list[Tensor]) -> Tensor:
    """Per-image inputs of several samples (``pixel_values``, ``image_grid_thw``, ``image_sizes``) in sample order.
    Rows that differ past the first axis are zero-padded at the end of every dimension to the largest, as the family's
    own processor pads a batch: Pixtral keeps each image's aspect ratio (the forward crops each image back to its
    ``image_sizes``); LLaVA-NeXT / OneVision ``pixel_values`` ``[image, view, 3, h, w]`` hold as many views as the
    image's anyres tiling needs (the model reads only those). Equal shapes are concatenated unchanged."""
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    padded = []
    for v in values:
        pads = [p for d in reversed(range(1, v.dim())) for p in (0, shape[d - 1] - v.shape[d])]
        padded.append(torch.nn.functional.pad(v, pads) if any(pads) else v)
    return torch.cat(padded)


def pad_per_position(values: list[Shaped[Tensor, "1 _ *rest"]], lengths: list[tuple[int, int]],
                     fill: int | float) -> Shaped[Tensor, "batch padded *rest"]:  # fmt: skip
    """Per-position inputs ``[1, pos, ...]`` of several samples in one tensor, each padded along the positions by its
    ``(before, after)``. Trailing axes must agree: Mllama's ``cross_attention_mask`` ``[1, pos, n_images, n_tiles]``
    of samples with different numbers of images is refused (zero-padding the missing image slot, as HF's processor
    does, changed the logits of the 1-image sample by 0.026 on the tiny model: not exact, so not done)."""
    if len({tuple(v.shape[2:]) for v in values}) > 1:
        raise InputError(f"these samples' per-position inputs differ past the positions ({sorted({tuple(v.shape[2:]) for v in values})}: "
                         "different numbers of images for a cross-attention family); batch samples with the same "
                         "number of images together, in separate batches")  # fmt: skip
    return torch.cat([pad_positions(v, before, after, fill) for v, (before, after) in zip(values, lengths)])


def pad_positions(value: Shaped[Tensor, "batch pos *rest"], before: int, after: int,
                  fill: int | float) -> Shaped[Tensor, "batch padded *rest"]:  # fmt: skip
    """``value`` ``[batch, pos, ...]`` with ``before`` / ``after`` entries of ``fill`` added along the positions."""
    return torch.nn.functional.pad(value, (0, 0) * (value.ndim - 2) + (before, after), value=fill)


def join_inputs(per_sample: list[dict[str, Tensor]], lengths: list[tuple[int, int]], pad_id: int) -> dict[str, Tensor]:
    """Several samples' model inputs as one batch: per-position inputs (:data:`PER_POSITION_PAD`) padded along the
    positions by each sample's ``(before, after)`` (pad id for ``input_ids``, 0 for the others; an attention mask of
    ones is made for a sample without one), everything else concatenated in sample order
    (:func:`concat_per_image`). Shared by right-padded forwards (:class:`VLMBatch`) and left-padded generation."""
    per_sample = [{"attention_mask": torch.ones_like(values["input_ids"]), **values} for values in per_sample]
    joined: dict[str, Tensor] = {}
    for key in dict.fromkeys(k for values in per_sample for k in values):  # samples without images lack some keys
        present = [values[key] for values in per_sample if key in values]
        if key not in PER_POSITION_PAD:
            joined[key] = concat_per_image(present)  # pixel_values, image_grid_thw: one row per image (or patch)
        elif len(present) != len(per_sample):
            raise InputError(f"{key!r} is missing for some samples: prepare every sample with the same model")
        else:
            fill = PER_POSITION_PAD[key]
            joined[key] = pad_per_position(present, lengths, pad_id if fill is None else fill)
    return joined


@dataclass
class VLMBatch:
    """Prepared samples (``samples[i]`` is what ``prepare`` returns for one) and their padded model inputs."""

    samples: list
    model_inputs: dict[str, Tensor]

    @classmethod
    def pad(cls, samples: list, pad_id: int) -> "VLMBatch":
        if not samples:
            raise InputError("a batch needs at least one sample")
        length = max(s.input_ids.shape[1] for s in samples)
        inputs = join_inputs([s.model_inputs for s in samples], [(0, length - s.input_ids.shape[1]) for s in samples],
                             pad_id)  # fmt: skip
        return cls(list(samples), inputs)

    @property
    def input_ids(self) -> Int[Tensor, "batch pos"]:
        return self.model_inputs["input_ids"]

    @property
    def layouts(self) -> list[TokenLayout]:
        return [s.layout for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]

    def __repr__(self) -> str:
        lengths = [s.layout.n_positions for s in self.samples]
        return f"VLMBatch({len(self)} samples, positions {lengths}, padded to {self.input_ids.shape[1]})"
