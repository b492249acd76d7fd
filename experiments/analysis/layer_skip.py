"""Layer-skipping experiments (paper §6.1), built from the detected critical and mutation layers.

Stack index l is the output of decoder layer l - 1. With critical layer c and mutation layer m (stack indices):
- **skip.1** (stabilization): decoder layers ``c .. m-2``, whose outputs lie inside the stable stage [c, m);
- **skip.2** (mutation): decoder layers ``m-1 .. n-1``, from the transition into m to the end;
- **skip.3** ("from the critical layer to the final five"): decoder layers ``c .. n-1-k``, keeping the last
  ``k = max(1, round(5 n / 32))`` layers (5 of LLaVA-1.5-7B's 32, scaled to depth).
Plus a sweep that skips each single layer. Effects: agreement of the generated text with the unmodified run,
KL at the output, and, where a reference answer exists, answer accuracy.
"""

from __future__ import annotations

from typing import Sequence

from vlm_lens.errors import InputError
from vlm_lens.probes import LayerSkip


def skip_sets(critical: int, mutation: int | None, n_layers: int) -> dict[str, list[int]]:
    """The paper's three skip sets as decoder-layer indices (see module docstring).

    With ``mutation=None`` (no mutation stage detected) skip.2 does not exist and skip.1 covers the stabilization
    stage up to the last layer, which is kept: decoder layers ``c .. n-2``.
    """
    upper = n_layers if mutation is None else mutation
    if not 0 <= critical < upper <= n_layers:
        raise InputError(f"need 0 <= critical < mutation <= n_layers, got {critical}, {mutation}, {n_layers}")
    keep_final = max(1, round(5 * n_layers / 32))
    sets = {"skip.1": list(range(critical, upper - 1))}
    if mutation is not None:
        sets["skip.2"] = list(range(mutation - 1, n_layers))
    sets["skip.3"] = list(range(critical, max(critical, n_layers - keep_final)))
    return sets


def skip_summary(result, answer: str | None, model) -> dict:
    """One skipped generation's effects (a :class:`~vlm_lens.probes.LayerSkip` result) as plain numbers."""
    text = result.provenance["generated_text"]
    return {
        "skipped_layers": result.provenance["skipped_layers"],
        "generated_text": text,
        "generation_agreement": float(result["generation_agreement"].item()),
        "forced_agreement": float(result["forced_agreement"].mean()),
        "mean_kl": float(result["kl"].mean()),
        "answer_prob": float(result["answer_prob"].mean()),
        "correct": None if answer is None else text.strip() == answer.strip(),
    }


def skip_effect(traces: Sequence, answers: Sequence[str | None], layers: Sequence[int], progress=None) -> dict:
    """Skip decoder ``layers`` on every trace; the effects averaged over traces (agreement, KL, answer
    probability, accuracy where answers are given) and each skipped generation's text. ``progress()`` is called
    after each trace."""
    model = traces[0].cache.model
    layers = list(layers)
    rows = []
    for trace, answer in zip(traces, answers):
        rows.append(skip_summary(LayerSkip(layers)(trace), answer, model))
        if progress is not None:
            progress()
    return mean_skip_rows(rows, layers)


def run(traces: Sequence, answers: Sequence[str | None], critical: int, mutation: int | None, sweep: bool = True,
        progress=None) -> dict:  # fmt: skip
    """Apply skip.1/2/3 (and optionally the single-layer sweep) to every trace; average the effects.

    ``progress(done, total)`` counts skipped generations."""
    model = traces[0].cache.model
    sets = {"none": [], **skip_sets(critical, mutation, model.n_layers)}
    runs = [(name, layers) for name, layers in sets.items()]
    if sweep:
        runs += [(str(layer), [layer]) for layer in range(model.n_layers)]
    total, done = len(runs) * len(traces), [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    effects = {name: skip_effect(traces, answers, layers, tick) for name, layers in runs}
    table = {name: effects[name] for name in sets}
    sweep_table = {name: effects[name] for name, _ in runs[len(sets):]}
    return {"critical_layer": critical, "mutation_layer": mutation, "sets": table, "sweep": sweep_table}


def mean_skip_rows(rows: list[dict], layers: list[int]) -> dict:
    """The mean effects of :func:`skip_summary` rows over samples (accuracy over those with a reference answer)."""
    n = len(rows)
    scored = [r["correct"] for r in rows if r["correct"] is not None]
    return {
        "skipped_layers": layers,
        "generation_agreement": sum(r["generation_agreement"] for r in rows) / n,
        "forced_agreement": sum(r["forced_agreement"] for r in rows) / n,
        "mean_kl": sum(r["mean_kl"] for r in rows) / n,
        "answer_prob": sum(r["answer_prob"] for r in rows) / n,
        "accuracy": (sum(scored) / len(scored)) if scored else None,
        "texts": [r["generated_text"] for r in rows],
    }
