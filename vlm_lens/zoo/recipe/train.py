"""The recipe that (re)trains the embedded shapes-world models from scratch on a CPU (build-time code: nothing at
run time imports it).

``vlm-lens zoo train --family llava --out runs/shapes-llava`` builds a
random model of the real HF class (see :data:`RECIPES`), trains it on shapes-world examples with fixed seeds,
writes a checkpoint every ``--checkpoint-every`` steps (weights, optimizer state and step, all safetensors/JSON; no
pickle), resumes from it with ``--resume``, and ends with a held-out evaluation written to ``eval.json``.

Training data is a pure function of the step: step ``s`` uses training seeds ``[s*B, (s+1)*B)``, so a resumed run
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vlm_lens.builders import ModelSize
from vlm_lens.zoo import shapes_world as sw
from vlm_lens.zoo.answers import answer_questions
from vlm_lens.zoo.recipe.checkpoints import load_optimizer, save_checkpoint
from vlm_lens.zoo.recipe.data import data_offset, task_for, training_batch


@dataclass(frozen=True)
class Recipe:
    family: str
    size: ModelSize
    steps: int = 5000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    single_shape_steps: int = 1000  # curriculum: without it shape recognition stays at chance (zoo-notes.md)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # relative task frequencies, e.g. (("position", 3.0),); unnamed tasks weigh 1 and none means uniform
    task_weights: tuple[tuple[str, float], ...] = ()


_TEXT: dict[str, Any] = dict(d_model=128, n_layers=8, n_heads=4, d_mlp=512, max_positions=64)
RECIPES = {
    "llava": Recipe(
        "llava",
        ModelSize(
            **_TEXT, vision_width=128, vision_layers=3, vision_heads=4, image_size=48, patch_size=16, tie_embeddings=True
        ),
    ),
    "qwen2-vl": Recipe(
        "qwen2-vl",
        ModelSize(
            **_TEXT, vision_width=128, vision_layers=3, vision_heads=4, image_size=48, patch_size=8, rope_theta=10.0
        ),
    ),
}


def learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_fraction * lr`` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.final_lr_fraction
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model, processor, n_per_task: int, *, start: int = 0) -> dict:
    """Exact-match accuracy per task on ``n_per_task`` held-out questions of each task."""
    result = {}
    for task in sw.TASKS:
        examples = sw.held_out(n_per_task, task=task, start=start)
        predictions = answer_questions(model, processor, examples)
        result[task] = sum(p == e.answer for p, e in zip(predictions, examples)) / len(examples)
    result["mean"] = sum(result[t] for t in sw.TASKS) / len(sw.TASKS)
    return result


def recipe_for(
    family: str,
    *,
    steps: int | None = None,
    rope_theta: float | None = None,
    task_weights: dict[str, float] | None = None,
    tie_embeddings: bool | None = None,
    n_layers: int | None = None,
    seed: int | None = None,
) -> Recipe:
    """``RECIPES[family]`` with the given overrides, checked (clear errors for an unknown family or task, a
    non-positive rotary base, step count or depth, negative task weights, a seed past the data range).

    ``n_layers`` sets the decoder depth; ``seed`` sets both the initialisation and the data stream
    (:func:`data_offset`), so ``seed=1`` is an independently trained base."""
    if family not in RECIPES:
        raise ValueError(f"no recipe for family {family!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[family]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        recipe = replace(recipe, steps=steps)
    if rope_theta is not None:
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be a positive rotary base (the recipes use 10 or 10000), got {rope_theta}")
        recipe = replace(recipe, size=replace(recipe.size, rope_theta=float(rope_theta)))
    if tie_embeddings is not None:
        recipe = replace(recipe, size=replace(recipe.size, tie_embeddings=bool(tie_embeddings)))
    if n_layers is not None:
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 decoder layers, got {n_layers}")
        recipe = replace(recipe, size=replace(recipe.size, n_layers=int(n_layers)))
    if seed is not None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        recipe = replace(recipe, seed=int(seed))
    data_offset(recipe)  # the data range check
    if task_weights:
        recipe = replace(recipe, task_weights=tuple(sorted((k, float(v)) for k, v in task_weights.items())))
        task_for(0, recipe)  # validate the task names and weights now
    return recipe


def train(
    family: str,
    out: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    checkpoint_every: int = 250,
    eval_every: int = 500,
    eval_per_task: int = 20,
    final_eval_per_task: int = 100,
    progress: bool = True,
    rewarm: bool = False,
    rope_theta: float | None = None,
    task_weights: dict[str, float] | None = None,
    tie_embeddings: bool | None = None,
    n_layers: int | None = None,
    seed: int | None = None,
) -> dict:
    """Train ``family`` into ``out``; returns the final held-out evaluation.

    ``rewarm`` (with ``resume``): restart the warm-up and cosine schedule at the resumed step, for a second stage
    after a recipe change (the change and the new schedule are written to ``train_log.jsonl``). ``rope_theta``,
    ``task_weights`` and ``tie_embeddings`` override the recipe (recorded in ``recipe.json``).
    """
    import torch

    from vlm_lens.builders import build_model, build_processor
    from vlm_lens.loading import load_processor

    if rewarm and not resume:
        raise ValueError("rewarm restarts the schedule at a resumed step: pass resume=True (--resume) with it")
    recipe = recipe_for(family, steps=steps, rope_theta=rope_theta, task_weights=task_weights,
                        tie_embeddings=tie_embeddings, n_layers=n_layers, seed=seed)  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    start_step = 0
    changes: dict[str, Any] = {}
    if resume and (checkpoint / "train_state.json").exists():
        from transformers import AutoConfig, AutoModelForImageTextToText

        processor = load_processor(checkpoint)
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        rope = config.text_config.rope_parameters
        if rope["rope_theta"] != recipe.size.rope_theta:
            # The rotary frequencies are rebuilt from the config at load time, so a changed base takes effect here.
            changes["rope_theta"] = [rope["rope_theta"], recipe.size.rope_theta]
            rope["rope_theta"] = recipe.size.rope_theta
        if bool(config.tie_word_embeddings) != recipe.size.tie_embeddings:
            # Tying on load makes lm_head share the input embedding matrix (the checkpoint's lm_head is dropped).
            changes["tie_embeddings"] = [bool(config.tie_word_embeddings), recipe.size.tie_embeddings]
            config.tie_word_embeddings = config.text_config.tie_word_embeddings = recipe.size.tie_embeddings
        model = AutoModelForImageTextToText.from_pretrained(
            checkpoint, config=config, local_files_only=True, dtype=torch.float32
        )
        if changes.get("tie_embeddings") == [False, True]:
            # transformers keeps a checkpoint's distinct lm_head; tie by hand (the head starts as the embeddings)
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        elif changes.get("tie_embeddings") == [True, False]:
            # a tied checkpoint stores no lm_head: start the untied head as a copy of the shared matrix, not random
            shared = model.get_input_embeddings().weight
            model.get_output_embeddings().weight = torch.nn.Parameter(shared.detach().clone())  # type: ignore[operator]
        start_step = json.loads((checkpoint / "train_state.json").read_text())["step"]
    else:
        processor = build_processor(family, sw.vocabulary(), recipe.size, out / "processor")
        model = build_model(family, processor.tokenizer, recipe.size, seed=recipe.seed)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )
    if start_step and "tie_embeddings" not in changes:  # tying removes a parameter: fresh moments then
        load_optimizer(optimizer, checkpoint)
    log = (out / "train_log.jsonl").open("a")
    origin = start_step if rewarm else 0
    if start_step and recipe.task_weights:
        changes["task_weights"] = dict(recipe.task_weights)
    if rewarm and start_step:  # resume found no checkpoint: a fresh run, nothing restarted
        changes["schedule"] = f"warm-up + cosine restarted over steps {start_step}..{recipe.steps}"
    if changes:
        log.write(json.dumps({"step": start_step, "resumed_with_changes": changes}) + "\n")
    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]{family}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        bar.start()
        task_id = bar.add_task("train", total=recipe.steps, completed=start_step, loss=float("nan"))
    started = time.time()
    model.train()
    try:
        for step in range(start_step, recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step - origin, replace(recipe, steps=recipe.steps - origin))
            batch = training_batch(processor, step, recipe)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            record = {"step": step + 1, "loss": round(loss.item(), 5), "elapsed_s": round(time.time() - started, 1)}
            if bar is not None:
                bar.update(task_id, advance=1, loss=loss.item())
            if (step + 1) % eval_every == 0 or step + 1 == recipe.steps:
                model.eval()
                record["eval"] = evaluate(model, processor, eval_per_task)
                model.train()
            log.write(json.dumps(record) + "\n")
            log.flush()
            if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
                save_checkpoint(model, processor, optimizer, step + 1, out)
    finally:
        if bar is not None:
            bar.stop()
        log.close()
    model.eval()
    final = evaluate(model, processor, final_eval_per_task)
    final["steps"] = recipe.steps
    final["train_wall_s_this_run"] = round(time.time() - started, 1)
    save_checkpoint(model, processor, None, recipe.steps, out, name="model")
    (out / "eval.json").write_text(json.dumps(final, indent=2))
    return final


def export(run_dir: str | Path, name: str, *, source: str = "model") -> Path:
    """Copy a run's final model (or ``source="checkpoint"``) into the package as embedded model ``name``.

    Weights, config, processor files, the recipe and the held-out evaluation are copied; optimizer state is not.
    """
    from vlm_lens.zoo import EMBEDDED, MODELS_DIR

    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded name {name!r}; choose one of {sorted(EMBEDDED)}")
    run_dir = Path(run_dir)
    origin = run_dir / source
    if not (origin / "config.json").exists():
        raise FileNotFoundError(f"{origin} holds no saved model")
    target = MODELS_DIR / EMBEDDED[name]
    from vlm_lens.atomic import write_folder

    with write_folder(target) as tmp:
        skip = {"optimizer.safetensors", "optimizer.json"}
        for item in origin.iterdir():
            if item.is_file() and item.name not in skip:
                shutil.copy2(item, tmp / item.name)
        for extra in ("recipe.json", "eval.json"):
            if (run_dir / extra).exists():
                shutil.copy2(run_dir / extra, tmp / extra)
    return target


def parse_task_weights(text: str | None) -> dict[str, float] | None:
    """``"position=3,count=0.5"`` -> ``{"position": 3.0, "count": 0.5}``."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        task, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"task weights look like 'position=3,count=0.5', got {text!r}")
        weights[task.strip()] = float(value)
    return weights
