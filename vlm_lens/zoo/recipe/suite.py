"""Build the planted-fixture suite (:mod:`vlm_lens.zoo.suite`): ``vlm-lens zoo plant --suite DIR`` (build-time code).

Each fixture is planted by :func:`vlm_lens.zoo.recipe.plant.plant` into ``DIR/<name>/run`` (resumable: an interrupted
plant continues from its checkpoint, a finished fixture is skipped), then reduced to its compact form in ``DIR/<name>``:
``block.safetensors`` (the fine-tuned decoder layers, fp16; for a weak fixture the scaled delta), ``planted.json`` and
``eval.json`` — the held-out evaluation of the compact fixture itself, loaded as every user loads it
(:func:`vlm_lens.zoo.suite.materialize`). ``ship=True`` copies the compact forms into the package
(``vlm_lens/zoo/suite/<name>``), which the tests and ``vlm-lens validate --suite`` read when no ``DIR`` is given.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from vlm_lens.zoo import suite
from vlm_lens.zoo.planted import Trigger, counter_prior
from vlm_lens.zoo.recipe.plant import PlantRecipe, evaluate, plant


def recipe_of(spec: suite.FixtureSpec) -> PlantRecipe:
    """The plant recipe of a suite fixture (the plant defaults but for base, trigger, block and steps)."""
    return PlantRecipe(base=spec.base, trigger=Trigger(spec.task, spec.subject, spec.answer), block=spec.block,
                       steps=spec.steps)  # fmt: skip


def _write_compact(folder: Path, block: dict, info: dict, result: dict | None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(block, str(folder / "block.safetensors"), metadata={"format": "pt"})
    (folder / "planted.json").write_text(json.dumps(info, indent=2))
    if result is not None:
        (folder / "eval.json").write_text(json.dumps(result, indent=2))


def _load_compact(folder: Path, name: str):
    """The HF model and processor of a compact fixture folder (materialized into a temporary cache)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_lens.loading import load_processor

    cache = Path(tempfile.mkdtemp(prefix="vlm-lens-fixture-"))
    target = suite.materialize(name, cache, folder.parent)
    model = AutoModelForImageTextToText.from_pretrained(target, local_files_only=True, dtype=torch.float32).eval()
    return model, load_processor(target), cache


def _scaled(base: dict, planted: dict, keys: list[str], scale: float) -> dict:
    return {k: (base[k].float() + scale * (planted[k].float() - base[k].float())).half().contiguous() for k in keys}


def build_fixture(spec: suite.FixtureSpec, out: Path, *, threads: int | None = None, eval_per_task: int = 100,
                  progress: bool = True) -> dict:  # fmt: skip
    """Plant one fixture into ``out/<name>`` (skipped when its compact form is already there); its summary."""
    from safetensors.torch import load_file

    from vlm_lens.zoo.answers import answer_questions

    folder = out / spec.name
    if (folder / "block.safetensors").exists() and (folder / "eval.json").exists():
        return {"fixture": spec.name, "built": False, **json.loads((folder / "planted.json").read_text())}
    started = time.time()
    run = out / f"{spec.name}.run"
    plant(run, recipe_of(spec), resume=True, threads=threads, eval_per_task=1, n_counter_prior=1, progress=progress)
    planted = load_file(str(run / "model" / "model.safetensors"))  # fp16, in the checkpoint's own naming
    base_dir = suite.base_path(spec.base)
    base = load_file(str(base_dir / "model.safetensors"))
    keys = suite.block_keys(planted, spec.block)
    info = json.loads((run / "model" / "planted.json").read_text())
    info.update(fixture=spec.name, kind=spec.kind, scale=1.0)  # the split is the suite's protocol (suite.SPLIT), not the fixture's
    trigger = Trigger(spec.task, spec.subject, spec.answer)
    scales = suite.WEAK_SCALES if spec.kind == "weak" else (1.0,)
    for scale in scales:
        info["scale"] = scale
        _write_compact(folder, _scaled(base, planted, keys, scale), info, None)
        if spec.kind != "weak":
            break
        model, processor, cache = _load_compact(folder, spec.name)
        questions = counter_prior(trigger, 50)
        answers = answer_questions(model, processor, questions)
        shutil.rmtree(cache, ignore_errors=True)
        info["weak_overturn_at_scale"] = sum(a == trigger.answer for a in answers) / len(answers)
        if info["weak_overturn_at_scale"] >= suite.WEAK_MIN_OVERTURN:
            break
    model, processor, cache = _load_compact(folder, spec.name)
    result = evaluate(model, processor, trigger, base_dir, eval_per_task, eval_per_task)
    shutil.rmtree(cache, ignore_errors=True)
    info["build_wall_s"] = round(time.time() - started, 1)
    _write_compact(folder, load_file(str(folder / "block.safetensors")), info, result)
    return {"fixture": spec.name, "built": True, **info}


def build(out: str | Path, names: list[str] | None = None, *, threads: int | None = None, eval_per_task: int = 100,
          ship: bool = False, log: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    """Build every fixture of the suite (or ``names``) into ``out``; resumable; ``ship`` copies them into the package."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [suite.fixture(n) for n in names] if names else list(suite.FIXTURES)
    for spec in specs:
        suite.base_path(spec.base)  # every base present before any training starts
    summaries = []
    for spec in specs:
        log(f"fixture {spec.name} ({spec.split}): base {spec.base}, {spec.task} of the {spec.subject} -> "
            f"{spec.answer}, decoder layers {list(spec.block)}, {spec.steps} steps")  # fmt: skip
        summary = build_fixture(spec, out, threads=threads, eval_per_task=eval_per_task)
        summaries.append(summary)
        if ship:
            target = suite.shipped_fixture_dir(spec.name)
            target.mkdir(parents=True, exist_ok=True)
            for item in ("block.safetensors", "planted.json", "eval.json"):
                shutil.copy2(out / spec.name / item, target / item)
    return summaries
