"""Train a tuned lens on a model's own generations and score it against the logit lens on held-out questions.

Data: (image, question) pairs — a manifest, images with one prompt, or, for an embedded shapes-world model, fresh
questions drawn from training seeds. Each pair is traced (greedy generation, activations recorded as it runs) and
released at once: its positions (prompt + generation) go to a uniform reservoir of at most ``max_positions``, on
which the lens trains (the target is the model's own final distribution, so no labels are needed). A held-out share of the pairs is never trained on: there, at the positions that predict the generated
tokens, the mean KL(final || lens) per layer of the logit lens and of the tuned lens is reported.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis.knowledge_evolution import Sample
from vlm_lens.probes import LogitLensProbe, TunedLens, TunedLensProbe

SHAPES_TRAIN_SEED_START = 7_000_000  # training seeds (< HELD_OUT_START), away from the recipes' ranges


def shapes_questions(n: int, start: int = SHAPES_TRAIN_SEED_START) -> list[Sample]:
    """``n`` fresh shapes-world questions of every task (training seeds, deterministic)."""
    from vlm_lens.zoo import shapes_world as sw

    return [Sample(e.image, e.question, e.answer, f"q{e.seed}") for e in (sw.example(start + i) for i in range(n))]


def held_out_split(samples: Sequence[Sample], held_out: float) -> tuple[list[Sample], list[Sample]]:
    """The first ``1 - held_out`` share trains, the rest is held out (at least one of each)."""
    if not 0.0 < held_out < 1.0:
        raise InputError(f"held_out must be a share in (0, 1), got {held_out}")
    if len(samples) < 2:
        raise InputError(f"a tuned lens needs at least 2 (image, question) pairs to hold one out, got {len(samples)}")
    cut = min(len(samples) - 1, max(1, round(len(samples) * (1 - held_out))))
    return list(samples[:cut]), list(samples[cut:])


class PositionReservoir:
    """A uniform sample of at most ``budget`` residual positions from a stream of stacks (reservoir sampling), so
    the training data of a tuned lens takes the same memory for 10 or 10,000 pairs.

    :meth:`add` takes one stack ``[layer, pos, d_model]``; :meth:`stack` returns ``[layer, kept, d_model]``."""

    def __init__(self, budget: int, seed: int = 0):
        if budget < 1:
            raise InputError(f"the position budget must be >= 1, got {budget}")
        self.budget, self.seen = budget, 0
        self.buffer: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, stack: Float[Tensor, "layer pos d_model"]) -> None:
        stack = stack.detach().float().cpu()
        if self.buffer is None:
            self.buffer = torch.empty(stack.shape[0], self.budget, stack.shape[2])
        buffer = self.buffer
        for position in range(stack.shape[1]):
            if self.seen < self.budget:
                slot = self.seen
            else:  # keep the new position with probability budget / (seen + 1), in a random slot
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
            if slot < self.budget:
                buffer[:, slot] = stack[:, position]
            self.seen += 1

    def stack(self) -> Float[Tensor, "layer kept d_model"]:
        if self.buffer is None:
            raise InputError("no positions were added")
        return self.buffer[:, : min(self.seen, self.budget)]


def kl_per_layer(model, traces: Iterable, lens: TunedLens | None = None) -> list[float]:
    """Mean KL(final || lens) per stack layer at the generation steps of ``traces`` (logit lens if ``lens`` is None),
    accumulated trace by trace (``traces`` may be a generator: nothing is kept)."""
    return held_out_kl(model, traces, {"lens": lens})["lens"]


def held_out_kl(model, traces: Iterable, lenses: dict) -> dict[str, list[float]]:
    """For each named lens (a TunedLens, or None for the logit lens): mean KL(final || lens) per stack layer over the
    generation steps of ``traces``, in one streaming pass (each trace is read once by every lens, then released)."""
    probes = {name: LogitLensProbe(top_k=1) if lens is None else TunedLensProbe(lens, top_k=1) for name, lens in lenses.items()}
    sums: dict[str, Tensor] = {}
    count = 0
    for trace in traces:
        if not trace.n_steps:
            continue
        for name, probe in probes.items():
            kl = probe(trace)["kl_to_final"].double()  # [layer, steps]
            sums[name] = sums.get(name, 0) + kl.sum(1)
        count += trace.n_steps
    if not count:
        raise InputError("no generated tokens to score the lenses on")
    return {name: (total / count).tolist() for name, total in sums.items()}


def train(model, samples: Sequence[Sample], *, held_out: float = 0.2, max_new_tokens: int = 8, steps: int = 300,
          lr: float = 5e-3, max_positions: int = 16384, progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Fit a tuned lens on the training share; the held-out KL per layer of both lenses. Returns the lens and figures.

    Memory stays flat in the number of pairs: each trace is reduced as soon as it is made (its positions offered to
    a reservoir of ``max_positions``; its held-out KL summed) and released."""
    say = progress or (lambda message: None)
    train_samples, test_samples = held_out_split(samples, held_out)

    def traces(chosen):
        for sample in chosen:
            yield model.trace_generation(model.prepare(sample.image, sample.prompt), max_new_tokens=max_new_tokens)

    say(f"tracing {len(train_samples)} training pairs")
    reservoir = PositionReservoir(max_positions)
    for trace in traces(train_samples):
        reservoir.add(trace.cache.resid_stack())  # every position: [layer, pos, d]
    data = reservoir.stack()
    lens = TunedLens.for_model(model)
    say(f"fitting the lens ({steps} steps on {data.shape[1]} of {reservoir.seen} positions)")
    losses = lens.fit(model, [data], steps=steps, lr=lr)
    del data, reservoir
    say(f"scoring on {len(test_samples)} held-out pairs")
    kl = held_out_kl(model, traces(test_samples), {"logit": None, "tuned": lens})
    return {
        "lens": lens, "train_pairs": len(train_samples), "held_out_pairs": len(test_samples),
        "loss_first": losses[0], "loss_last": losses[-1], "kl_logit": kl["logit"], "kl_tuned": kl["tuned"],
    }  # fmt: skip
