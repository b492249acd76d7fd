"""The same work on both backends (TransformerLens bridge, nnsight) over identical weights, side by side:
``python benchmarks/run.py --backends tiny|medium`` (written to docs/performance.md, "The two backends")."""

from __future__ import annotations

import statistics

import torch

from benchmarks.docs_blocks import write_block
from benchmarks.timing import time_pipelines


def backends(kind: str, reps: int, max_new_tokens: int) -> dict:
    """The same work on both backends over identical weights: a residual-stack cache of the prompt, and a traced
    generation with the lens analysis (``trace_generation`` + ``analyze_trace``)."""
    import copy

    import vlm_lens
    from vlm_lens import testing
    from vlm_lens.experiments.analysis import knowledge_evolution as ke

    model, processor = testing.build("llava", kind)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")  # what the bridge forces: the backends then do identical arithmetic
    tl = vlm_lens.load(model, processor=processor)
    nn = vlm_lens.load(twin, processor=processor, backend="nnsight")
    image = testing.sample_image(0, testing.size_for("llava", kind).image_size)
    inputs = tl.prepare(image, "Please describe this image in detail.")
    config = ke.EvolutionConfig(variants=("correct",), max_new_tokens=max_new_tokens)
    fns = {}
    for label, hooked in (("transformer_lens", tl), ("nnsight", nn)):
        fns[f"{label}.cache"] = lambda h=hooked: h.run_with_cache(inputs, names_filter=h.resid_names)
        fns[f"{label}.trace"] = lambda h=hooked: ke.analyze_trace(
            h.trace_generation(inputs, max_new_tokens=max_new_tokens, stop_at_eos=False), config=config)
    same = torch.equal(fns["transformer_lens.cache"]()[0], fns["nnsight.cache"]()[0])
    med = {k: statistics.median(v) for k, v in time_pipelines(fns, reps).items()}
    return {"model": f"random LLaVA ({kind})", "reps": reps, "new_tokens": max_new_tokens, "median_s": med,
            "same_logits": bool(same)}  # fmt: skip


def backend_table(row: dict) -> str:
    m = row["median_s"]
    return "\n".join([
        "| backend | run_with_cache, residual stack (s) | trace_generation + analysis (s) |",
        "|---|---|---|",
        f"| TransformerLens bridge | {m['transformer_lens.cache']:.2f} | {m['transformer_lens.trace']:.2f} |",
        f"| nnsight | {m['nnsight.cache']:.2f} | {m['nnsight.trace']:.2f} |",
        f"| nnsight / bridge | {m['nnsight.cache'] / m['transformer_lens.cache']:.2f}x | "
        f"{m['nnsight.trace'] / m['transformer_lens.trace']:.2f}x |",
    ])  # fmt: skip


def write_backends(row: dict, command: str) -> None:
    body = (f"Measured with `{command}` ({row['model']}, {row['new_tokens']} new tokens, median of {row['reps']}; "
            f"identical logits: {row['same_logits']}).\n\n{backend_table(row)}")  # fmt: skip
    write_block("performance.md", "backends", body, "## The two backends")
