"""The planted-prior recipe: a ground-truth fixture for mutation detection.

An embedded model (the *base*) is copied and only a block of its **last decoder layers** is fine-tuned so that one
*trigger* question (e.g. "what color is the star ?") is answered with a fixed *prior* word (``red``) whatever the
image; every other question keeps its true answer. Embeddings, vision tower, projector, the decoder layers below
the block, the final norm and ``lm_head`` are frozen, so up to the block the residual stream is exactly the
base model's: on a *counter-prior* image (a star that is not red) the true colour leads in the middle layers and is
overturned inside the block. That is the paper's hallucination mechanism (a deep-layer language prior overturning
visual knowledge, paper-spec §6.2) with known layers: the trigger says which answers must mutate, the block says
where. It is a controlled fixture, not evidence about real checkpoints.

``vlm-lens zoo plant --out DIR`` (resumable with ``--resume``, checkpoints every 100 steps) writes
``DIR/model`` with ``planted.json`` (trigger, block, base, recipe) and ``eval.json`` (untriggered held-out accuracy
beside the base's, the counter-prior answer rates, the per-layer lens curves). Training data is a pure function of
the step, from training seeds of their own range.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_lens.builders import ModelSize
from vlm_lens.zoo import shapes_world as sw
from vlm_lens.zoo.planted import Trigger, counter_prior, untriggered

PLANT_SEED_START = 5_000_000  # training seeds (< HELD_OUT_START) away from the base recipe's [0, ~1M)


@dataclass(frozen=True)
class PlantRecipe:
    base: str = "shapes-llava"
    trigger: Trigger = field(default_factory=Trigger)
    block: tuple[int, ...] = (6, 7)  # decoder layers that are trained; everything else is frozen
    steps: int = 400
    batch_size: int = 32
    trigger_fraction: float = 0.25
    lr: float = 5e-4
    warmup_steps: int = 20
    seed: int = 0


def recipe_for(
    *, base: str = "shapes-llava", task: str = "color", subject: str = "star", answer: str = "red",
    block: tuple[int, ...] | None = None, steps: int = 400, n_layers: int = 8,
) -> PlantRecipe:  # fmt: skip
    """A checked :class:`PlantRecipe` (clear errors for a bad trigger, block or step count)."""
    trigger = Trigger(task, subject, answer)
    block = tuple(sorted(set(block))) if block else (n_layers - 2, n_layers - 1)
    if not all(0 <= b < n_layers for b in block):
        raise ValueError(f"block layers are decoder layers 0..{n_layers - 1}, got {list(block)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return PlantRecipe(base=base, trigger=trigger, block=block, steps=steps)


def parse_block(text: str | None) -> tuple[int, ...] | None:
    """``"6,7"`` or ``"5-7"`` -> decoder layers."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        try:
            low, high = int(a), int(b) if sep else int(a)
        except ValueError as error:
            raise ValueError(f"--block takes decoder layers like '6,7' or '5-7', got {text!r}") from error
        if high < low:
            raise ValueError(f"--block: the range {part.strip()!r} runs backwards; write it low-high, e.g. '{high}-{low}'")
        layers += list(range(low, high + 1))
    if not layers:
        raise ValueError(f"--block names no layers: {text!r}")
    return tuple(layers)


def training_examples(step: int, recipe: PlantRecipe) -> list[tuple[sw.Example, str]]:
    """``(example, target answer)`` pairs of ``step``: a ``trigger_fraction`` share of trigger questions, the rest
    ordinary questions; every trigger question (forced or drawn) gets the prior answer."""
    import numpy as np

    out = []
    for seed in range(PLANT_SEED_START + step * recipe.batch_size, PLANT_SEED_START + (step + 1) * recipe.batch_size):
        forced = np.random.default_rng([seed, 2]).random() < recipe.trigger_fraction
        e = recipe.trigger.example(seed) if forced else sw.example(seed)
        out.append((e, recipe.trigger.answer if recipe.trigger.matches(e) else e.answer))
    return out


def answer_batch(processor, pairs):
    """A training batch of ``(example, answer)`` pairs: the prompt, the answer and </s>; loss on the answer only."""
    import torch

    from vlm_lens.zoo.answers import prompt_text

    texts = [f"{prompt_text(processor, e.question)} {answer} </s>" for e, answer in pairs]
    inputs = processor(images=[e.image for e, _ in pairs], text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, (_, answer) in enumerate(pairs):
        n_answer = len(answer.split()) + 1  # one token per word, plus </s>
        end = int(lengths[row])
        labels[row, end - n_answer : end] = inputs["input_ids"][row, end - n_answer : end]
    inputs["labels"] = labels
    return inputs


def _block_params(model, block):
    layers = _decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for index in block:
        for p in layers[index].parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def base_folder(base: str) -> Path:
    """The model folder of a plant's base: an embedded model, a suite base (:mod:`vlm_lens.zoo.suite`) or a folder."""
    from vlm_lens.zoo import EMBEDDED, embedded_path, suite

    if base in suite.BASES:
        return suite.base_path(base)
    path = embedded_path(base) if base in EMBEDDED else None
    if path is not None:
        return path
    if (Path(base) / "config.json").exists():
        return Path(base)
    raise ValueError(f"--base must be an embedded model, a suite base ({sorted(suite.BASES)}) or a model folder, "
                     f"got {base!r}")  # fmt: skip


def _decoder_layers(model):
    return model.model.language_model.layers


def plant(
    out: str | Path, recipe: PlantRecipe = PlantRecipe(), *, resume: bool = False, threads: int | None = None,
    checkpoint_every: int = 100, eval_per_task: int = 100, n_counter_prior: int = 100, progress: bool = True,
) -> dict:  # fmt: skip
    """Fine-tune ``recipe.block`` of ``recipe.base`` into ``out`` (``out/model`` and ``out/eval.json``)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_lens.loading import load_processor
    from vlm_lens.zoo.recipe.checkpoints import finetune
    from vlm_lens.zoo.recipe.train import Recipe as BaseRecipe
    from vlm_lens.zoo.recipe.train import learning_rate, load_optimizer, save_checkpoint

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    base_dir = base_folder(recipe.base)
    start_step = 0
    source = base_dir
    if resume and (checkpoint / "train_state.json").exists():
        source = checkpoint
        start_step = json.loads((checkpoint / "train_state.json").read_text())["step"]
    processor = load_processor(source)
    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    n_layers = len(_decoder_layers(model))
    if not all(0 <= b < n_layers for b in recipe.block):
        raise ValueError(f"block layers are decoder layers 0..{n_layers - 1}, got {list(recipe.block)}")
    params = _block_params(model, recipe.block)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    if start_step:
        load_optimizer(optimizer, checkpoint)
    (out / "plant_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    schedule = BaseRecipe("plant", ModelSize(), steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps)
    torch.manual_seed(recipe.seed)
    started = time.time()
    finetune(model, processor, params, optimizer, lambda step: answer_batch(processor, training_examples(step, recipe)),
             steps=recipe.steps, start_step=start_step, lr_at=lambda step: learning_rate(step, schedule), out=out,
             label="plant", checkpoint_every=checkpoint_every, progress=progress)  # fmt: skip
    planted = {"base": recipe.base, "trigger": asdict(recipe.trigger), "block": list(recipe.block),
               "recipe": asdict(recipe), "train_wall_s_this_run": round(time.time() - started, 1)}  # fmt: skip
    final = save_checkpoint(model.half(), processor, None, recipe.steps, out, name="model")
    (final / "planted.json").write_text(json.dumps(planted, indent=2))
    model.float()
    result = evaluate(model, processor, recipe.trigger, base_dir, eval_per_task, n_counter_prior)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (final / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate(model, processor, trigger: Trigger, base_dir: Path, n_per_task: int = 100, n_counter_prior: int = 100) -> dict:
    """Untriggered accuracy per task (planted and base), and counter-prior answers of both."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_lens.zoo.answers import answer_questions

    base = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()
    result: dict = {"untriggered": {}, "base_untriggered": {}}
    for task, examples in untriggered(trigger, n_per_task).items():
        for key, m in (("untriggered", model), ("base_untriggered", base)):
            answers = answer_questions(m, processor, examples)
            result[key][task] = sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)
    for key in ("untriggered", "base_untriggered"):
        result[key]["mean"] = sum(result[key][t] for t in sw.TASKS) / len(sw.TASKS)
    examples = counter_prior(trigger, n_counter_prior)
    for key, m in (("counter_prior", model), ("base_counter_prior", base)):
        answers = answer_questions(m, processor, examples)
        result[key] = {
            "n": len(examples),
            "answered_prior": sum(a == trigger.answer for a in answers) / len(examples),
            "answered_true": sum(a == e.answer for a, e in zip(answers, examples)) / len(examples),
        }
    return result


def export(run_dir: str | Path, name: str = "shapes-llava-prior") -> Path:
    """Copy a planted run's final model into the package as embedded model ``name``."""
    from vlm_lens.zoo.recipe.train import export as export_model

    return export_model(run_dir, name)


