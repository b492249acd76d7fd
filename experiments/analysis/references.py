"""Reference images: the other pictures a mutation candidate is re-run with, to ask whether the overturn needs *this* image.

The image-swap test (:mod:`vlm_lens.experiments.analysis.confirmation`) re-runs a traced sequence (same prompt, same
generated tokens, teacher-forced) with the image replaced by each of ``k`` reference images. A run's *pool* is fixed
once for the whole run: its first ``pool + 1`` distinct images, in source order. Sample ``i`` (its index in the run)
takes ``k`` of them, rotating through the pool (``i k, i k + 1, ...`` modulo its size, its own image left out), so
that samples do not all share one small set: with one fixed set, a set whose pictures happen to share an answer
would confirm that answer on every sample. Fixed per run and chosen by the sample's index, so a sample's evidence
does not depend on how the run was batched, interrupted, resumed or shared between workers, and memory stays flat
(``pool + 1`` images kept).

A single trace analysed alone (:func:`~vlm_lens.experiments.analysis.knowledge_evolution.token_evidence`) takes the
references it is given; without any it uses the images bundled with the package (:data:`vlm_lens.zoo.samples.SAMPLES_DIR`),
which only stand in for "another picture": a prior that fires only when the question's subject is in the picture
is best tested against other images of the same kind (docs/experiments.md, "Mutation events").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

DEFAULT_COUNT = 4
POOL = 16  # distinct pictures kept per run; each sample takes DEFAULT_COUNT of them, rotating


def image_key(image: Any) -> str:
    """An identity for ``image`` (a path, or a PIL image): the resolved path, or a digest of the pixels."""
    from pathlib import Path

    if isinstance(image, (str, Path)):
        return str(Path(image).resolve())
    rgb = image.convert("RGB")
    return f"{rgb.size}:" + hashlib.sha1(rgb.tobytes()).hexdigest()


def open_rgb(image: Any):
    """``image`` (a path or a PIL image) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


@dataclass
class References:
    """The reference pictures of a run: a pool of at most ``pool + 1`` distinct images (each kept with its identity
    key), ``count`` of which serve each sample."""

    count: int = DEFAULT_COUNT
    pool: int = POOL
    images: list = field(default_factory=list)  # [(key, PIL image)]

    @classmethod
    def from_images(cls, images: Iterable[Any], count: int = DEFAULT_COUNT, pool: int = POOL) -> "References":
        """The first ``max(pool, count) + 1`` distinct readable images of ``images`` (paths or PIL images; None and
        unreadable entries are passed over). Reads lazily: stops as soon as it has enough."""
        refs = cls(count, max(pool, count))
        seen: set[str] = set()
        for image in images:
            if len(refs.images) > refs.pool:
                break
            if image is None:
                continue
            try:
                key = image_key(image)
                if key not in seen:
                    refs.images.append((key, open_rgb(image)))
                    seen.add(key)
            except (OSError, ValueError):
                continue
        return refs

    @classmethod
    def bundled(cls, count: int = DEFAULT_COUNT) -> "References":
        """The images bundled with the package (six shapes-world pictures)."""
        from vlm_lens.zoo.samples import SAMPLES_DIR

        return cls.from_images(sorted(SAMPLES_DIR.glob("*.png")), count)

    def for_image(self, image: Any, index: int = 0) -> list:
        """The (at most ``count``) reference pictures of sample ``index`` whose own image is ``image`` (never itself):
        ``count`` consecutive pictures of the pool from position ``index * count``, wrapping around."""
        own = None
        if image is not None:
            try:
                own = image_key(image)
            except (OSError, ValueError):
                own = None
        others = [picture for key, picture in self.images if key != own]
        if len(others) <= self.count:
            return others
        start = (index * self.count) % len(others)
        return [others[(start + j) % len(others)] for j in range(self.count)]
