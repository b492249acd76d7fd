"""Compare two models on the same samples, with layers aligned by relative depth (layer / n_layers)."""

from __future__ import annotations

from typing import Sequence

from vlm_lens.experiments.analysis import knowledge_evolution as ke


def relative(layer: float | None, n_layers: int) -> float | None:
    return None if layer is None else layer / n_layers


def run(model_a, model_b, samples: Sequence[ke.Sample], config: ke.EvolutionConfig = ke.EvolutionConfig()) -> dict:
    """Knowledge evolution of both models; critical/mutation layers as relative depths and their differences."""
    out = {}
    for key, model in (("a", model_a), ("b", model_b)):
        result = ke.run(model, samples, config)
        agg = result["aggregate"]
        out[key] = {"model": model.name, "n_layers": model.n_layers, "generated": [s.generated_text for s in result["samples"]],
                    "variants": {}}  # fmt: skip
        for variant in config.variants:
            crit, mut = agg[variant]["critical_layer"]["median"], agg[variant]["mutation_layer"]["median"]
            out[key]["variants"][variant] = {
                "critical_layer": crit, "mutation_layer": mut,
                "critical_depth": relative(crit, model.n_layers), "mutation_depth": relative(mut, model.n_layers),
            }  # fmt: skip
    out["difference"] = {}
    for variant in config.variants:
        a, b = out["a"]["variants"][variant], out["b"]["variants"][variant]
        out["difference"][variant] = {
            k: (None if a[k] is None or b[k] is None else b[k] - a[k]) for k in ("critical_depth", "mutation_depth")
        }
    return out
