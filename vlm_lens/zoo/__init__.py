"""The embedded shapes-world models shipped inside the package, and their recipe (:mod:`vlm_lens.zoo.recipe.train`)."""

from __future__ import annotations

from pathlib import Path

from vlm_lens.errors import NotFoundError

MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED = {
    "shapes-llava": "shapes-llava",
    "shapes-qwen2-vl": "shapes-qwen2-vl",
    # shapes-llava with a planted language prior in its last decoder layers (vlm_lens.zoo.recipe.plant)
    "shapes-llava-prior": "shapes-llava-prior",
    # shapes-llava fine-tuned with text blind to the image below decoder layer 3 / 5 (vlm_lens.zoo.recipe.gate)
    "shapes-llava-gate3": "shapes-llava-gate3",
    "shapes-llava-gate5": "shapes-llava-gate5",
}
DEFAULT_MODEL = "shapes-llava"


def embedded_names() -> list[str]:
    """Names of the embedded models present in this installation."""
    return [name for name, folder in EMBEDDED.items() if (MODELS_DIR / folder / "config.json").exists()]


def model_folder(name: str) -> Path | None:
    """The folder a model was loaded from: the embedded model's, or ``name`` itself when it is a folder; None for an
    id resolved through the HF cache."""
    if name in EMBEDDED:
        return embedded_path(name)
    return Path(name) if Path(name).is_dir() else None


def embedded_path(name: str) -> Path | None:
    """The folder of embedded model ``name``; None when ``name`` is not an embedded name."""
    if name not in EMBEDDED:
        return None
    folder = MODELS_DIR / EMBEDDED[name]
    if not (folder / "config.json").exists():
        remake = ("`vlm-lens zoo plant --out DIR --export`" if name == "shapes-llava-prior" else
                  f"`vlm-lens zoo gate --k {name[-1]} --out DIR --export`" if "-gate" in name else
                  f"`vlm-lens zoo train --family {name.removeprefix('shapes-')} --out DIR` and load DIR/model")  # fmt: skip
        raise NotFoundError(f"embedded model {name!r} is not in this installation ({folder}); rebuild it with {remake}")
    return folder
