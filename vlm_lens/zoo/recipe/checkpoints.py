"""Training checkpoints of the zoo recipes: weights, processor, optimizer moments and step, written atomically and
read back to resume (``train`` and ``plant`` share them). Optimizer state goes to safetensors + JSON, never pickle."""

from __future__ import annotations

import json
from pathlib import Path


def save_optimizer(optimizer, path: Path) -> None:
    """The optimizer's tensors to ``path/optimizer.safetensors``, everything else to ``path/optimizer.json``."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entry.items():
            if hasattr(value, "shape"):
                tensors[f"{pid}.{key}"] = value.contiguous()
                meta["state"][str(pid)][key] = "tensor"
            else:
                meta["state"][str(pid)][key] = value
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(optimizer, path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer`` (same parameter order)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(model, processor, optimizer, step: int, out: Path, name: str = "checkpoint") -> Path:
    """Write weights, processor, optimizer and step to ``out/name`` atomically (temp folder, then rename)."""
    from vlm_lens.atomic import write_folder

    final = out / name
    with write_folder(final) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if optimizer is not None:
            save_optimizer(optimizer, tmp)
        (tmp / "train_state.json").write_text(json.dumps({"step": step}))
    return final


def finetune(model, processor, params, optimizer, batch_for_step, *, steps: int, start_step: int, lr_at, out: Path,
             label: str, checkpoint_every: int = 100, progress: bool = True) -> None:  # fmt: skip
    """The fine-tuning loop the plant and gate recipes share: steps ``start_step .. steps-1`` of AdamW on ``params``
    (learning rate ``lr_at(step)``, gradients clipped to 1), ``model(**batch_for_step(step)).loss`` each; one JSON
    line per step in ``out/train_log.jsonl``; a checkpoint every ``checkpoint_every`` steps and at the end."""
    import time

    import torch

    started = time.time()
    model.train()
    with (out / "train_log.jsonl").open("a") as log:
        for step in range(start_step, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(**batch_for_step(step)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5), "elapsed_s": round(time.time() - started, 1)}) + "\n")
            log.flush()
            if progress and (step + 1) % 50 == 0:
                print(f"{label} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                save_checkpoint(model, processor, optimizer, step + 1, out)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
