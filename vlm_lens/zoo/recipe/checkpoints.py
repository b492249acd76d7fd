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
