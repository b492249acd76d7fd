"""The late-image recipe: a ground-truth fixture for the critical layer.

A base (``shapes-llava``, 8 decoder layers) is fine-tuned with a permanent attention block: **no text position may
attend to an image position in decoder layers 0..k-1** (queries ``text`` and ``generated``, keys ``image``,
:mod:`vlm_lens.attention_block`). The block is part of the fixture: ``attention_block.json`` in the model folder,
applied by :func:`vlm_lens.load` (and by this recipe's training and evaluation). So the residual stream at the last
prompt position holds nothing of the image up to stack layer k (the output of decoder layer k-1): the answer cannot
emerge before stack layer k+1. The decoder layers are trained (everything else frozen) so that layers >= k learn to
read the image; held-out accuracy is compared with the base's.

``vlm-lens zoo gate --k 3 --out DIR`` (resumable with ``--resume``, checkpoints every 100 steps) writes ``DIR/model``
with ``attention_block.json`` and ``eval.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm_lens.builders import ModelSize
from vlm_lens.zoo import shapes_world as sw

GATE_SEED_START = 6_000_000  # training seeds of their own range (< HELD_OUT_START)
QUERIES = ("text", "generated")
KEYS = ("image",)


@dataclass(frozen=True)
class GateRecipe:
    base: str = "shapes-llava"
    k: int = 3  # text reads the image from decoder layer k on
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 30
    seed: int = 0


def block_config(k: int) -> dict:
    """The fixture's ``attention_block.json``: what :func:`vlm_lens.load` applies, and the ground truth."""
    return {"queries": list(QUERIES), "keys": list(KEYS), "layers": list(range(k)), "first_image_layer": k,
            "earliest_critical_stack_layer": k + 1,
            "why": f"text cannot read the image in decoder layers 0..{k - 1}: the answer cannot emerge before "
                   f"stack layer {k + 1}"}  # fmt: skip


def gate(out: str | Path, recipe: GateRecipe = GateRecipe(), *, resume: bool = False, threads: int | None = None,
         checkpoint_every: int = 100, eval_per_task: int = 100, progress: bool = True) -> dict:  # fmt: skip
    """Fine-tune ``recipe.base`` behind the block of :func:`block_config` into ``out`` (``out/model``, ``eval.json``)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_lens.adapters import adapter_for
    from vlm_lens.attention_block import AttentionBlock
    from vlm_lens.loading import load_processor
    from vlm_lens.surgery import get_module
    from vlm_lens.zoo.recipe.checkpoints import finetune, load_optimizer, save_checkpoint
    from vlm_lens.zoo.recipe.plant import answer_batch, base_folder
    from vlm_lens.zoo.recipe.train import Recipe as BaseRecipe
    from vlm_lens.zoo.recipe.train import learning_rate

    base_dir = base_folder(recipe.base)
    config_json = json.loads((base_dir / "config.json").read_text())
    depth = int((config_json.get("text_config") or config_json)["num_hidden_layers"])
    if not 1 <= recipe.k < depth:
        raise ValueError(f"--k must be in 1..{depth - 1} (decoder layers of {recipe.base}: 0..{depth - 1}), got {recipe.k}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    resuming = resume and (checkpoint / "train_state.json").exists()
    source = checkpoint if resuming else base_dir
    start_step = json.loads((checkpoint / "train_state.json").read_text())["step"] if resuming else 0
    processor = load_processor(source)
    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    spec = adapter_for(type(model).__name__)
    layers = get_module(model, spec.layers)
    config = block_config(recipe.k)
    block = AttentionBlock.from_config(model, spec, config)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    if start_step:
        load_optimizer(optimizer, checkpoint)
    (out / "gate_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    schedule = BaseRecipe("gate", ModelSize(), steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps)
    torch.manual_seed(recipe.seed)

    def batch_for_step(step: int):
        first = GATE_SEED_START + step * recipe.batch_size
        return answer_batch(processor, [(e, e.answer) for e in map(sw.example, range(first, first + recipe.batch_size))])

    finetune(model, processor, params, optimizer, batch_for_step, steps=recipe.steps, start_step=start_step,
             lr_at=lambda step: learning_rate(step, schedule), out=out, label="gate",
             checkpoint_every=checkpoint_every, progress=progress)  # fmt: skip
    final = save_checkpoint(model.half(), processor, None, recipe.steps, out, name="model")
    model.float()
    (final / "attention_block.json").write_text(json.dumps({**config, "base": recipe.base, "recipe": asdict(recipe)}, indent=2))
    result = evaluate(model, processor, base_dir, eval_per_task)
    block.detach()
    for path in (out / "eval.json", final / "eval.json"):
        path.write_text(json.dumps(result, indent=2))
    return result


def evaluate(model, processor, base_dir: Path, n_per_task: int = 100) -> dict:
    """Held-out accuracy per task of the fixture (its block attached) and of the base."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_lens.zoo.answers import answer_questions

    base = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()
    result: dict = {"held_out": {}, "base_held_out": {}}
    for task in sw.TASKS:
        examples = sw.held_out(n_per_task, task=task, start=700_000)
        for key, m in (("held_out", model), ("base_held_out", base)):
            answers = answer_questions(m, processor, examples)
            result[key][task] = sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)
    for key in ("held_out", "base_held_out"):
        result[key]["mean"] = sum(result[key][t] for t in sw.TASKS) / len(sw.TASKS)
    return result


def export(run_dir: str | Path, k: int) -> Path:
    """Copy a gate run's final model (with its ``attention_block.json``) into the package as ``shapes-llava-gate{k}``."""
    from vlm_lens.zoo.recipe.train import export as export_model

    return export_model(run_dir, f"shapes-llava-gate{k}")
