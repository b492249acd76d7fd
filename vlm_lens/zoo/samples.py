"""Sample images for the main job: bundled shapes-world images with questions and answers, and the natural photos
that scikit-image and scikit-learn ship (for running any real checkpoint offline)."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"
DESCRIBE_PROMPT = "Please describe this image in detail."  # the paper's captioning prompt
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def shapes_samples() -> list[dict]:
    """``[{"path", "task", "question", "answer", "seed"}]`` for the bundled shapes-world images."""
    meta = json.loads((SAMPLES_DIR / "samples.json").read_text())
    return [{**m, "path": SAMPLES_DIR / m["file"]} for m in meta]


def real_photos() -> dict:
    """``{name: PIL image}`` of the photos bundled with scikit-image and scikit-learn (empty if neither is installed)."""
    from PIL import Image

    photos = {}
    try:
        from skimage import data

        for name in SKIMAGE_PHOTOS:
            photos[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in SKLEARN_PHOTOS:
            photos[name.removesuffix(".jpg")] = Image.fromarray(load_sample_image(name)).convert("RGB")
    except ImportError:
        pass
    return photos
