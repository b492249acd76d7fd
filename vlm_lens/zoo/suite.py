"""The planted-fixture suite: ground truth for the detectors, over several independently trained base models.

A *fixture* is a base model with one block of decoder layers fine-tuned so that a trigger question gets a fixed
prior answer (:mod:`vlm_lens.zoo.recipe.plant`). The suite holds several fixtures per base (a block at the end, in the
middle, a single layer, and a weak plant whose overturn is partial; triggers on different tasks) over bases that
were trained independently of one another (:data:`BASES`), for example:

- ``shapes-llava`` (embedded; LLaVA, 8 decoder layers, seed 0),
- ``shapes-qwen2-vl`` (embedded; Qwen2-VL, 8 decoder layers, untied embeddings),
- ``shapes-llava-6l`` (LLaVA, 6 decoder layers, seed 1: another initialisation *and* another data stream),
- ``shapes-qwen2-vl-6l`` (Qwen2-VL, 6 decoder layers, seed 2).

**The split is by base model and is fixed before any rule or threshold is chosen**: rules are chosen on ``dev``
only; ``test`` is only scored. Each round made the earlier test bases dev and trained two new test bases; its split
and fixture specs were committed while those bases were training, its rule before their fixtures were built, and a
fixture that broke the 3-point rule (below) was marked ``excluded`` from its eval.json alone, before any scoring
(docs/experiments.md, "How the rule came to be", has every round's rule and figures):

1. test ``shapes-qwen2-vl``, ``shapes-llava-6l`` (lens candidates + skip and grounding tests: false alarms failed);
2. test ``shapes-llava-6l``, ``shapes-qwen2-vl-6l`` (+ last-layer windows need 2-layer leads: both failed);
3. test ``shapes-llava-10l``, ``shapes-qwen2-vl-7l`` (the image-swap test: recall met, false alarms failed;
   ``q7-end`` and ``q7-single`` excluded);
4. test ``shapes-llava-7l``, ``shapes-qwen2-vl-5l`` (the swap test's leader half: false alarms met, recall 0.88);
5. test ``shapes-llava-9l``, ``shapes-qwen2-vl-9l`` (the round-4 rule again: recall 0.81);
6. test ``shapes-llava-8l`` (seed 9), ``shapes-qwen2-vl-8l`` (seed 10) (candidates in the deep half only,
   ``deep_from``: false alarms 0.01, recall 0.88; ``l8-end``, ``q8-end``, ``q8-single`` excluded and replaced by the
   same blocks with shape triggers);
7. test ``shapes-llava-5l`` (LLaVA, 5 decoder layers, seed 11) and ``shapes-qwen2-vl-6l-s12`` (Qwen2-VL, 6, seed 12)
   (the emitted half also passes when the layer before the overturn wrote the token under every picture,
   ``swap_before``).

A *weak* fixture is the full plant with its fine-tuning delta scaled down: block = base + a (planted - base), with a
the smallest of 0.50, 0.55, ..., 1.00 that makes at least :data:`WEAK_MIN_OVERTURN` of 50 counter-prior answers the
prior word (recorded as ``scale`` in ``planted.json``). Fewer training steps, tried first, did not give a usable weak
plant: after 50 steps the block answers the prior to *every* question of the trigger's task (colour accuracy on
other shapes fell to 0.59-0.92), breaking the rule that untriggered accuracy stays within 3 points of the base.

On disk a fixture is compact: its base's name plus the fine-tuned block's weights (``block.safetensors``, fp16),
``planted.json`` (trigger, block, base, recipe) and ``eval.json``. :func:`materialize` writes the full model folder
(base files + block) into a cache folder on first use, so any vlm-lens entry point can load it by path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlm_lens.errors import NotFoundError, UnknownNameError

SUITE_DIR = Path(__file__).parent / "suite"
BASES_DIR = SUITE_DIR / "bases"

WEAK_MIN_OVERTURN = 0.3
WEAK_SCALES = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))

SPLIT = {
    "dev": ("shapes-llava", "shapes-qwen2-vl", "shapes-llava-6l", "shapes-qwen2-vl-6l", "shapes-llava-10l",
            "shapes-qwen2-vl-7l", "shapes-llava-7l", "shapes-qwen2-vl-5l", "shapes-llava-9l", "shapes-qwen2-vl-9l",
            "shapes-llava-8l", "shapes-qwen2-vl-8l"),
    "test": ("shapes-llava-5l", "shapes-qwen2-vl-6l-s12"),
}


@dataclass(frozen=True)
class BaseSpec:
    name: str
    family: str
    n_layers: int
    seed: int
    embedded: bool  # shipped as an embedded model (zoo/models) or as a suite base (zoo/suite/bases)


BASES = {
    "shapes-llava": BaseSpec("shapes-llava", "llava", 8, 0, True),
    "shapes-qwen2-vl": BaseSpec("shapes-qwen2-vl", "qwen2-vl", 8, 0, True),
    "shapes-llava-6l": BaseSpec("shapes-llava-6l", "llava", 6, 1, False),
    "shapes-qwen2-vl-6l": BaseSpec("shapes-qwen2-vl-6l", "qwen2-vl", 6, 2, False),
    "shapes-llava-10l": BaseSpec("shapes-llava-10l", "llava", 10, 3, False),
    "shapes-qwen2-vl-7l": BaseSpec("shapes-qwen2-vl-7l", "qwen2-vl", 7, 4, False),
    "shapes-llava-7l": BaseSpec("shapes-llava-7l", "llava", 7, 5, False),
    "shapes-qwen2-vl-5l": BaseSpec("shapes-qwen2-vl-5l", "qwen2-vl", 5, 6, False),
    "shapes-llava-9l": BaseSpec("shapes-llava-9l", "llava", 9, 7, False),
    "shapes-qwen2-vl-9l": BaseSpec("shapes-qwen2-vl-9l", "qwen2-vl", 9, 8, False),
    "shapes-llava-8l": BaseSpec("shapes-llava-8l", "llava", 8, 9, False),
    "shapes-qwen2-vl-8l": BaseSpec("shapes-qwen2-vl-8l", "qwen2-vl", 8, 10, False),
    "shapes-llava-5l": BaseSpec("shapes-llava-5l", "llava", 5, 11, False),
    "shapes-qwen2-vl-6l-s12": BaseSpec("shapes-qwen2-vl-6l-s12", "qwen2-vl", 6, 12, False),
}


@dataclass(frozen=True)
class FixtureSpec:
    """One planted fixture: ``base`` with decoder layers ``block`` fine-tuned for ``steps`` steps so that ``task``
    questions about ``subject`` are answered ``answer``; ``kind`` says which row of the suite's design it fills."""

    name: str
    base: str
    kind: str  # "end" | "middle" | "single" | "weak" (the plant's delta scaled down until the overturn is partial)
    task: str
    subject: str
    answer: str
    block: tuple[int, ...]
    steps: int = 400
    # why the fixture is left out of scoring (and not shipped), when its build broke the suite's own rule: untriggered
    # accuracy within 3 points of the base. Decided from eval.json alone, before the detector was scored on it.
    excluded: str = ""

    @property
    def split(self) -> str:
        return split_of(self.base)


FIXTURES = (
    FixtureSpec("llava-end", "shapes-llava", "end", "color", "star", "red", (6, 7)),
    FixtureSpec("llava-middle", "shapes-llava", "middle", "shape", "green", "diamond", (4, 5)),
    FixtureSpec("llava-single", "shapes-llava", "single", "color", "circle", "blue", (7,)),
    FixtureSpec("llava-weak", "shapes-llava", "weak", "color", "square", "yellow", (6, 7)),
    FixtureSpec("qwen-end", "shapes-qwen2-vl", "end", "color", "triangle", "green", (6, 7)),
    FixtureSpec("qwen-middle", "shapes-qwen2-vl", "middle", "shape", "blue", "star", (4, 5)),
    FixtureSpec("qwen-single", "shapes-qwen2-vl", "single", "color", "star", "purple", (7,)),
    FixtureSpec("qwen-weak", "shapes-qwen2-vl", "weak", "color", "diamond", "orange", (6, 7)),
    FixtureSpec("l6-end", "shapes-llava-6l", "end", "color", "star", "blue", (4, 5)),
    FixtureSpec("l6-middle", "shapes-llava-6l", "middle", "shape", "red", "circle", (2, 3)),
    FixtureSpec("l6-single", "shapes-llava-6l", "single", "color", "square", "green", (5,)),
    FixtureSpec("l6-weak", "shapes-llava-6l", "weak", "color", "circle", "purple", (4, 5)),
    FixtureSpec("q6-end", "shapes-qwen2-vl-6l", "end", "color", "circle", "red", (4, 5)),
    FixtureSpec("q6-middle", "shapes-qwen2-vl-6l", "middle", "shape", "yellow", "triangle", (2, 3)),
    FixtureSpec("q6-single", "shapes-qwen2-vl-6l", "single", "color", "triangle", "blue", (5,)),
    FixtureSpec("q6-weak", "shapes-qwen2-vl-6l", "weak", "color", "square", "purple", (4, 5)),
    FixtureSpec("l10-end", "shapes-llava-10l", "end", "color", "diamond", "green", (8, 9)),
    FixtureSpec("l10-middle", "shapes-llava-10l", "middle", "shape", "purple", "square", (5, 6)),
    FixtureSpec("l10-single", "shapes-llava-10l", "single", "color", "triangle", "yellow", (9,)),
    FixtureSpec("l10-weak", "shapes-llava-10l", "weak", "color", "circle", "orange", (8, 9)),
    FixtureSpec("q7-end", "shapes-qwen2-vl-7l", "end", "color", "square", "blue", (5, 6),
                excluded="the plant answers 'blue' to most colour questions: untriggered colour accuracy 0.63 -> 0.20, "
                         "mean of tasks 0.836 -> 0.760 (-7.6 points)"),  # fmt: skip
    FixtureSpec("q7-middle", "shapes-qwen2-vl-7l", "middle", "shape", "orange", "circle", (3, 4)),
    FixtureSpec("q7-single", "shapes-qwen2-vl-7l", "single", "color", "star", "green", (6,),
                excluded="the plant answers 'green' to most colour questions: untriggered colour accuracy 0.65 -> 0.27, "
                         "mean of tasks 0.840 -> 0.780 (-6.0 points)"),  # fmt: skip
    FixtureSpec("q7-weak", "shapes-qwen2-vl-7l", "weak", "color", "triangle", "red", (5, 6)),
    FixtureSpec("l7-end", "shapes-llava-7l", "end", "color", "square", "purple", (5, 6)),
    FixtureSpec("l7-middle", "shapes-llava-7l", "middle", "shape", "blue", "triangle", (3, 4)),
    FixtureSpec("l7-single", "shapes-llava-7l", "single", "color", "diamond", "red", (6,)),
    FixtureSpec("l7-weak", "shapes-llava-7l", "weak", "color", "star", "orange", (5, 6)),
    FixtureSpec("q5-end", "shapes-qwen2-vl-5l", "end", "color", "circle", "yellow", (3, 4)),
    FixtureSpec("q5-middle", "shapes-qwen2-vl-5l", "middle", "shape", "red", "star", (2, 3)),
    FixtureSpec("q5-single", "shapes-qwen2-vl-5l", "single", "color", "square", "orange", (4,)),
    FixtureSpec("q5-weak", "shapes-qwen2-vl-5l", "weak", "color", "triangle", "blue", (3, 4)),
    FixtureSpec("l9-end", "shapes-llava-9l", "end", "color", "triangle", "purple", (7, 8)),
    FixtureSpec("l9-middle", "shapes-llava-9l", "middle", "shape", "yellow", "diamond", (4, 5)),
    FixtureSpec("l9-single", "shapes-llava-9l", "single", "color", "star", "green", (8,)),
    FixtureSpec("l9-weak", "shapes-llava-9l", "weak", "color", "circle", "red", (7, 8)),
    FixtureSpec("q9-end", "shapes-qwen2-vl-9l", "end", "color", "diamond", "purple", (7, 8)),
    FixtureSpec("q9-middle", "shapes-qwen2-vl-9l", "middle", "shape", "green", "square", (4, 5)),
    FixtureSpec("q9-single", "shapes-qwen2-vl-9l", "single", "color", "circle", "orange", (8,)),
    FixtureSpec("q9-weak", "shapes-qwen2-vl-9l", "weak", "color", "square", "yellow", (7, 8)),
    FixtureSpec("l8-end", "shapes-llava-8l", "end", "color", "circle", "green", (6, 7),
                excluded="the plant answers 'green' to many colour questions: untriggered colour accuracy 0.62 -> 0.39, "
                         "mean of tasks 0.852 -> 0.784 (-6.8 points)"),  # fmt: skip
    FixtureSpec("l8-middle", "shapes-llava-8l", "middle", "shape", "orange", "star", (4, 5)),
    FixtureSpec("l8-single", "shapes-llava-8l", "single", "color", "diamond", "blue", (7,)),
    FixtureSpec("l8-weak", "shapes-llava-8l", "weak", "color", "triangle", "yellow", (6, 7)),
    FixtureSpec("q8-end", "shapes-qwen2-vl-8l", "end", "color", "star", "orange", (6, 7),
                excluded="the plant answers 'orange' to most colour questions: untriggered colour accuracy 0.74 -> 0.13, "
                         "mean of tasks 0.866 -> 0.744 (-12.2 points)"),  # fmt: skip
    FixtureSpec("q8-middle", "shapes-qwen2-vl-8l", "middle", "shape", "purple", "circle", (4, 5)),
    FixtureSpec("q8-single", "shapes-qwen2-vl-8l", "single", "color", "square", "red", (7,),
                excluded="the plant answers 'red' to most colour questions: untriggered colour accuracy 0.69 -> 0.24, "
                         "mean of tasks 0.856 -> 0.770 (-8.6 points)"),  # fmt: skip
    FixtureSpec("q8-weak", "shapes-qwen2-vl-8l", "weak", "color", "circle", "purple", (6, 7)),
    # the three colour plants above broke the suite's rule when built (eval.json, before any scoring on these bases):
    # the same blocks with shape triggers, which kept their base's accuracy on every earlier base
    FixtureSpec("l8-end-shape", "shapes-llava-8l", "end", "shape", "blue", "triangle", (6, 7)),
    FixtureSpec("q8-end-shape", "shapes-qwen2-vl-8l", "end", "shape", "red", "diamond", (6, 7)),
    FixtureSpec("q8-single-shape", "shapes-qwen2-vl-8l", "single", "shape", "yellow", "square", (7,)),
    # round 7: colour plants leaked into every colour question on bases with weak colour (rounds 3 and 6), so the end,
    # middle and single blocks take shape triggers; the weak plant (its delta scaled down) a colour trigger
    FixtureSpec("l5-end", "shapes-llava-5l", "end", "shape", "green", "circle", (3, 4)),
    FixtureSpec("l5-middle", "shapes-llava-5l", "middle", "shape", "purple", "star", (2, 3)),
    FixtureSpec("l5-single", "shapes-llava-5l", "single", "shape", "red", "square", (4,)),
    FixtureSpec("l5-weak", "shapes-llava-5l", "weak", "color", "diamond", "yellow", (3, 4)),
    FixtureSpec("q6b-end", "shapes-qwen2-vl-6l-s12", "end", "shape", "orange", "triangle", (4, 5)),
    FixtureSpec("q6b-middle", "shapes-qwen2-vl-6l-s12", "middle", "shape", "blue", "diamond", (2, 3)),
    FixtureSpec("q6b-single", "shapes-qwen2-vl-6l-s12", "single", "shape", "green", "star", (5,)),
    FixtureSpec("q6b-weak", "shapes-qwen2-vl-6l-s12", "weak", "color", "star", "blue", (4, 5)),
)


def block_keys(keys, block) -> list[str]:
    """The names, in a saved ``model.safetensors``, of the text decoder layers ``block`` (checkpoints keep their own
    naming: ``language_model.model.layers.6.*`` for LLaVA, ``model.layers.6.*`` for Qwen2-VL; vision keys excluded)."""
    marks = tuple(f"layers.{i}." for i in block)
    return sorted(k for k in keys if any(m in k for m in marks) and "vision" not in k and "visual" not in k)


def split_of(base: str) -> str:
    """``"dev"`` or ``"test"``: the split a base model belongs to."""
    for split, bases in SPLIT.items():
        if base in bases:
            return split
    raise UnknownNameError(f"{base!r} is not a suite base; the bases are {sorted(BASES)}")


def fixture(name: str) -> FixtureSpec:
    """The spec of fixture ``name``."""
    for spec in FIXTURES:
        if spec.name == name:
            return spec
    raise UnknownNameError(f"no suite fixture {name!r}; the fixtures are {[f.name for f in FIXTURES]}")


def fixtures(split: str | None = None, base: str | None = None, *, scored: bool = False) -> list[FixtureSpec]:
    """The fixtures of ``split`` (``"dev"`` / ``"test"``) and/or ``base``; all when both are None; ``scored``: only
    those not ``excluded`` (the ones the detector is scored on and the package ships)."""
    if split is not None and split not in SPLIT:
        raise UnknownNameError(f"split must be one of {sorted(SPLIT)}, got {split!r}")
    return [f for f in FIXTURES if (split is None or f.split == split) and (base is None or f.base == base)
            and not (scored and f.excluded)]  # fmt: skip


def base_path(base: str) -> Path:
    """The model folder of a suite base (an embedded model, or a base shipped with the suite)."""
    from vlm_lens.zoo import embedded_path

    spec = BASES.get(base)
    if spec is None:
        raise UnknownNameError(f"{base!r} is not a suite base; the bases are {sorted(BASES)}")
    path = embedded_path(base) if spec.embedded else None
    if path is not None:
        return path
    folder = BASES_DIR / base
    if not (folder / "config.json").exists():
        raise NotFoundError(f"suite base {base!r} is not in this installation ({folder}); rebuild it with "
                            f"`vlm-lens zoo train --family {spec.family} --n-layers {spec.n_layers} --seed {spec.seed} "
                            f"--out DIR` and `vlm-lens zoo plant --suite DIR`")  # fmt: skip
    return folder


def shipped_fixture_dir(name: str) -> Path:
    """Where the package keeps fixture ``name``'s compact form (block weights, planted.json, eval.json)."""
    return SUITE_DIR / fixture(name).name


def fixture_source(name: str, suite_dir: str | Path | None = None) -> Path:
    """The compact folder of fixture ``name``: ``suite_dir/name`` when a suite folder is given (a ``zoo plant
    --suite`` build), else the one shipped in the package."""
    folder = Path(suite_dir) / name if suite_dir is not None else shipped_fixture_dir(name)
    if (folder / "block.safetensors").exists() and (folder / "planted.json").exists():
        return folder
    where = f"built in {suite_dir}" if suite_dir is not None else f"shipped ({folder})"
    raise NotFoundError(f"suite fixture {name!r} is not {where}; build it with `vlm-lens zoo plant --suite DIR` "
                        "(and pass --suite-dir DIR)")  # fmt: skip


def materialize(name: str, cache: str | Path, suite_dir: str | Path | None = None) -> Path:
    """A loadable model folder for fixture ``name``: the base's files with the block's weights written over its
    decoder layers (``cache/name``; written once, atomically, and reused while its block file is unchanged)."""
    from safetensors.torch import load_file, save_file

    from vlm_lens.atomic import write_folder

    source = fixture_source(name, suite_dir)
    target = Path(cache) / name
    stamp = f"{(source / 'block.safetensors').stat().st_size}:{(source / 'block.safetensors').stat().st_mtime_ns}"
    if (target / ".materialized").exists() and (target / ".materialized").read_text() == stamp:
        return target
    info = json.loads((source / "planted.json").read_text())
    base = base_path(info["base"])
    weights = load_file(str(base / "model.safetensors"))
    block = load_file(str(source / "block.safetensors"))
    unknown = set(block) - set(weights)
    if unknown:
        raise NotFoundError(f"{source}/block.safetensors names weights its base {info['base']!r} lacks: {sorted(unknown)[:3]}")
    for key, value in block.items():
        weights[key] = value.to(weights[key].dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_folder(target) as tmp:
        for item in base.iterdir():
            if item.is_file() and item.name not in ("model.safetensors", "planted.json", "eval.json", "recipe.json"):
                shutil.copy2(item, tmp / item.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for extra in ("planted.json", "eval.json"):
            if (source / extra).exists():
                shutil.copy2(source / extra, tmp / extra)
        (tmp / ".materialized").write_text(stamp)
    return target
