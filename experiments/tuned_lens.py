"""Train a tuned lens on a model's own generations and score it against the logit lens on held-out questions.

Data: (image, question) pairs — a manifest, images with one prompt, or, for an embedded shapes-world model, fresh
questions drawn from training seeds. Each pair is traced (greedy generation, activations recorded as it runs); the
lens trains on every position of prompt + generation (the target is the model's own final distribution, so no labels
are needed). A held-out share of the pairs is never trained on: there, at the positions that predict the generated
tokens, the mean KL(final || lens) per layer of the logit lens and of the tuned lens is reported.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from vlm_lens.experiments.knowledge_evolution import Sample
from vlm_lens.probes import LogitLensProbe, TunedLens, TunedLensProbe

SHAPES_TRAIN_SEED_START = 7_000_000  # training seeds (< HELD_OUT_START), away from the recipes' ranges


def shapes_questions(n: int, start: int = SHAPES_TRAIN_SEED_START) -> list[Sample]:
    """``n`` fresh shapes-world questions of every task (training seeds, deterministic)."""
    from vlm_lens.zoo import shapes_world as sw

    return [Sample(e.image, e.question, e.answer, f"q{e.seed}") for e in (sw.example(start + i) for i in range(n))]


def held_out_split(samples: Sequence[Sample], held_out: float) -> tuple[list[Sample], list[Sample]]:
    """The first ``1 - held_out`` share trains, the rest is held out (at least one of each)."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a share in (0, 1), got {held_out}")
    if len(samples) < 2:
        raise ValueError(f"a tuned lens needs at least 2 (image, question) pairs to hold one out, got {len(samples)}")
    cut = min(len(samples) - 1, max(1, round(len(samples) * (1 - held_out))))
    return list(samples[:cut]), list(samples[cut:])


def kl_per_layer(model, traces: Sequence, lens: TunedLens | None = None) -> list[float]:
    """Mean KL(final || lens) per stack layer at the generation steps of ``traces`` (logit lens if ``lens`` is None)."""
    probe = LogitLensProbe(top_k=1) if lens is None else TunedLensProbe(lens, top_k=1)
    rows = torch.cat([probe(t)["kl_to_final"] for t in traces if t.n_steps], dim=1)  # [layer, steps]
    return rows.double().mean(1).tolist()


def train(model, samples: Sequence[Sample], *, held_out: float = 0.2, max_new_tokens: int = 8, steps: int = 300,
          lr: float = 5e-3, progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Fit a tuned lens on the training share; the held-out KL per layer of both lenses. Returns the lens and figures."""
    say = progress or (lambda message: None)
    train_samples, test_samples = held_out_split(samples, held_out)

    def traces(chosen):
        for sample in chosen:
            yield model.trace_generation(model.prepare(sample.image, sample.prompt), max_new_tokens=max_new_tokens)

    say(f"tracing {len(train_samples)} training pairs")
    stacks = [t.cache.resid_stack() for t in traces(train_samples)]  # every position: [layer, pos, d] each
    lens = TunedLens.for_model(model)
    say(f"fitting the lens ({steps} steps on {sum(s.shape[1] for s in stacks)} positions)")
    losses = lens.fit(model, stacks, steps=steps, lr=lr)
    del stacks
    say(f"scoring on {len(test_samples)} held-out pairs")
    test_traces = list(traces(test_samples))
    return {
        "lens": lens, "train_pairs": len(train_samples), "held_out_pairs": len(test_samples),
        "loss_first": losses[0], "loss_last": losses[-1],
        "kl_logit": kl_per_layer(model, test_traces), "kl_tuned": kl_per_layer(model, test_traces, lens),
    }  # fmt: skip
