"""The training data of a zoo recipe: which shapes-world seeds a step draws (each recipe seed its own stream), the
task mix, and the batch with its answer-only labels."""

from __future__ import annotations

from typing import Protocol

from vlm_lens.zoo import shapes_world as sw
from vlm_lens.zoo.answers import prompt_text


class Recipe(Protocol):
    """What the data stream reads of a training recipe (:class:`vlm_lens.zoo.recipe.train.Recipe`)."""

    @property
    def seed(self) -> int: ...

    @property
    def steps(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def single_shape_steps(self) -> int: ...

    @property
    def task_weights(self) -> tuple[tuple[str, float], ...]: ...


def training_batch(processor, step: int, recipe: Recipe):
    """Model inputs and labels for ``step``; loss only on the answer words and ``</s>``."""
    import torch

    max_objects = 1 if step < recipe.single_shape_steps else 3
    first = data_offset(recipe) + step * recipe.batch_size
    seeds = range(first, first + recipe.batch_size)
    examples = [sw.example(s, task=task_for(s, recipe), max_objects=max_objects) for s in seeds]
    texts = [f"{prompt_text(processor, e.question)} {e.answer} </s>" for e in examples]
    inputs = processor(images=[e.image for e in examples], text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, e in enumerate(examples):
        n_answer = len(e.answer.split()) + 1  # word-level tokenizer: one token per word, plus </s>
        end = int(lengths[row])
        labels[row, end - n_answer : end] = inputs["input_ids"][row, end - n_answer : end]
    inputs["labels"] = labels
    return inputs


DATA_STREAM_STRIDE = 1_000_000  # training seeds per recipe seed: seed k draws its data from [k * 1M, ...)
PLANT_RANGE_START = 5_000_000  # the plant recipe's seeds (5M) and the gate's (6M); seeds 0-4 end before them
LATE_STREAM_START = 7_000_000  # seeds 5-6 (bases trained after the plant and gate ranges were laid out) start here
LAST_STREAMS_START = 9_000_000  # seeds 7-8: 500k training seeds each (7,812 steps of 64), ending at 10M
LAST_STREAM_STRIDE = 500_000
# seeds 9-10: the upper halves of the plant (5M) and gate (6M) ranges, 500k seeds each; a plant or gate run would need
# 7,812 steps of 64 to reach them (they run hundreds)
SPARE_STREAMS = (5_500_000, 6_500_000)
# seeds 11-12: the upper halves of seeds 5-6's streams (those runs drew at most 320k of their 1M)
UPPER_STREAMS = (7_500_000, 8_500_000)
MAX_SEED = 12


def data_offset(recipe: Recipe) -> int:
    """First training seed of ``recipe``'s data stream: seed 0 is the shipped models' stream ``[0, ...)``; another
    seed trains on other images and questions (an independent run, not only another initialisation). Seeds 0-4 draw
    from ``[k * 1M, ...)``; seeds 5-6 from ``[7M + (k - 5) * 1M, ...)``; seeds 7-8 from ``[9M + (k - 7) * 500k, ...)``:
    past the plant (5M) and gate (6M) ranges and before the held-out seeds (10M); seeds 9-10 from ``[5.5M, 6M)`` and
    ``[6.5M, 7M)``, the upper halves of the plant and gate ranges, which their runs never reach; seeds 11-12 from
    ``[7.5M, 8M)`` and ``[8.5M, 9M)``, the upper halves of seeds 5-6's streams."""
    if recipe.seed < 5:
        offset, end = recipe.seed * DATA_STREAM_STRIDE, PLANT_RANGE_START
    elif recipe.seed < 7:
        offset = LATE_STREAM_START + (recipe.seed - 5) * DATA_STREAM_STRIDE
        end = offset + DATA_STREAM_STRIDE
    elif recipe.seed < 9:
        offset = LAST_STREAMS_START + (recipe.seed - 7) * LAST_STREAM_STRIDE
        end = offset + LAST_STREAM_STRIDE
    elif recipe.seed < 11:
        offset = SPARE_STREAMS[recipe.seed - 9]
        end = offset + LAST_STREAM_STRIDE
    else:
        offset = UPPER_STREAMS[min(recipe.seed - 11, 1)]
        end = offset + LAST_STREAM_STRIDE
    if recipe.seed > MAX_SEED or offset + recipe.steps * recipe.batch_size > end:
        raise ValueError(f"seed {recipe.seed} with {recipe.steps} steps runs past its training seed range; use seed "
                         f"<= {MAX_SEED} and fewer steps")  # fmt: skip
    return offset


def task_for(seed: int, recipe: Recipe) -> str | None:
    """The task of training seed ``seed`` under ``recipe.task_weights`` (None: the seed's own uniform choice)."""
    if not recipe.task_weights:
        return None
    import numpy as np

    weights = dict(recipe.task_weights)
    unknown = set(weights) - set(sw.TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in task_weights: {sorted(unknown)}; choose from {sw.TASKS}")
    p = np.array([weights.get(task, 1.0) for task in sw.TASKS], dtype=float)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive total, got {dict(recipe.task_weights)}")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the seed's image stays the same
    return sw.TASKS[int(rng.choice(len(p), p=p / p.sum()))]
