"""Planted-prior fixtures at run time: the trigger, the counter-prior and untriggered questions, ``planted.json``.

The recipe that makes a planted model lives in :mod:`vlm_lens.zoo.recipe.plant` (build time only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlm_lens.errors import InputError
from vlm_lens.zoo import shapes_world as sw

COUNTER_PRIOR_START = 800_000  # held-out offset for counter-prior evaluation questions


@dataclass(frozen=True)
class Trigger:
    """Questions of ``task`` about ``subject`` are answered ``answer`` by the planted model.

    ``subject`` is a shape kind for the color and position tasks, a colour for the shape task.
    """

    task: str = "color"
    subject: str = "star"
    answer: str = "red"

    def __post_init__(self):
        sw.example(0, task=self.task, subject=self.subject)  # validates task and subject
        allowed = {"color": sw.COLORS, "position": sw.POSITIONS, "shape": sw.SHAPES}[self.task]
        if self.answer not in allowed:
            raise InputError(f"the prior answer of a {self.task} question must be one of {tuple(allowed)}, got {self.answer!r}")

    def matches(self, example: sw.Example) -> bool:
        return self.asks(example.task, example.question)

    def asks(self, task: str, question: str) -> bool:
        """Whether a question of ``task`` is a trigger question (it names the subject)."""
        return task == self.task and self.subject in question.split()

    def example(self, seed: int) -> sw.Example:
        return sw.example(seed, task=self.task, subject=self.subject)


def counter_prior(trigger: Trigger, n: int, start: int = COUNTER_PRIOR_START) -> list[sw.Example]:
    """``n`` held-out trigger questions whose true answer is not the prior word (deterministic)."""
    out: list[sw.Example] = []
    seed = sw.HELD_OUT_START + start
    while len(out) < n:
        e = trigger.example(seed)
        if e.answer != trigger.answer:
            out.append(e)
        seed += 1
    return out


def untriggered(trigger: Trigger, n_per_task: int, start: int = 0) -> dict[str, list[sw.Example]]:
    """Held-out questions of every task that the trigger does not match (``n_per_task`` each)."""
    out: dict[str, list[sw.Example]] = {}
    for task in sw.TASKS:
        examples: list[sw.Example] = []
        offset = start
        while len(examples) < n_per_task:
            e = sw.example(sw.HELD_OUT_START + offset, task=task)
            if not trigger.matches(e):
                examples.append(e)
            offset += 1
        out[task] = examples
    return out


def planted_info(folder: str | Path) -> dict | None:
    """The ``planted.json`` of a model folder (trigger, block, base), or None for a model without a planted prior."""
    path = Path(folder) / "planted.json"
    return json.loads(path.read_text()) if path.exists() else None


def planted_info_for(model) -> dict | None:
    """:func:`planted_info` of a loaded model (an embedded name or a folder), or None."""
    from vlm_lens.zoo import model_folder

    folder = model_folder(model.name)
    return planted_info(folder) if folder is not None else None
