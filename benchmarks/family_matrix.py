"""The family matrix as numbers: for every family with a small random model and both backends, the worst difference
of each exactness check against the untouched HF twin (same weights, eager attention). The tests assert these within
1e-5 (``tests/integration``); this prints how close they really are and writes the table to docs/hooks.md.

    python benchmarks/family_matrix.py                         # every buildable family; docs/hooks.md block family-matrix
    python benchmarks/family_matrix.py --families llava --no-write

Checks (max |difference| over every position and unit, float32 CPU): logits of one forward; every residual-stack index
vs the input HF's decoder layer l reads (and the raw last output); the lens at the last layer (final norm + unembed of
stack index n) vs the logits; greedy generation of 6 tokens vs HF ``generate`` (ids equal); a batch of three prompts
of different lengths traced together vs one at a time (step logits and residual stack).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.docs_blocks import write_block  # noqa: E402

QUESTIONS = ("what color ?", "how many shapes are there ?", "what shape is the red one ?")


def reference_layer_inputs(reference, adapter, inputs) -> tuple[object, list]:
    """HF logits and what each decoder layer reads (plus the raw output of the last one), from the plain twin."""
    import torch

    from vlm_lens.surgery import get_attribute

    seen: list = []
    layers = get_attribute(reference, adapter.layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                               with_kwargs=True) for layer in layers]  # fmt: skip
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = reference(**inputs.model_inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, [s[0] for s in seen]


def family_rows(family: str, backend: str, new_tokens: int = 6) -> dict:
    import torch

    from vlm_lens import load, testing

    hf_model, processor = testing.build(family)
    if backend == "nnsight":
        hf_model.set_attn_implementation("eager")
    model = load(hf_model, processor=processor, backend=backend)
    reference, _ = testing.build(family)
    reference.set_attn_implementation("eager")
    size = testing.size_for(family).image_size
    inputs = model.prepare(testing.sample_image(1, size), "what color is the star ?")
    logits, cache = model.run_with_cache(inputs, names_filter=model.resid_names)
    ref_logits, reads = reference_layer_inputs(reference, model.adapter, inputs)
    stack = cache.resid_stack()
    kwargs = model.greedy_kwargs(new_tokens, True, with_logits=False)
    with torch.no_grad():
        out = reference.generate(**inputs.model_inputs, **kwargs)
    hf_ids = getattr(out, "sequences", out)[0, inputs.input_ids.shape[1] :]
    ours = model.generate_ids(inputs, new_tokens)
    samples = [model.prepare(testing.sample_image(seed, size), q) for seed, q in zip((3, 2, 4), QUESTIONS)]
    batched = model.trace_batch(samples, new_tokens)
    singles = [model.trace_generation(s, new_tokens) for s in samples]
    return {
        "logits": float((logits - ref_logits).abs().max()),
        "residuals": max(float((stack[l] - reads[l]).abs().max()) for l in range(len(reads))),
        "lens at last layer": float((model.unembed(stack[-1], model.n_layers) - logits[0]).abs().max()),
        "greedy ids equal": bool(torch.equal(ours.cpu(), hf_ids.cpu())),
        "batched step logits": max(float((b.step_logits - s.step_logits).abs().max()) for b, s in zip(batched, singles)),
        "batched residuals": max(float((b.cache.resid_stack() - s.cache.resid_stack()).abs().max())
                                 for b, s in zip(batched, singles)),  # fmt: skip
        "batched ids equal": all(torch.equal(b.generated_ids, s.generated_ids) for b, s in zip(batched, singles)),
    }


def table(rows: dict[tuple[str, str], dict]) -> str:
    checks = list(next(iter(rows.values())))
    lines = ["| family | backend | " + " | ".join(checks) + " |", "|---|---|" + "---|" * len(checks)]
    for (family, backend), row in rows.items():
        cells = [str(v) if isinstance(v, bool) else f"{v:.1e}" for v in row.values()]
        lines.append(f"| {family} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roles_table(families=None) -> str:
    """Each family's fine token roles (:mod:`vlm_lens.roles`) on one example prompt: one 32 px shapes image (tiny model)
    and "what color is the star ?" in the family's chat template."""
    from vlm_lens import adapters, roles, testing

    lines = ["| family | HF class | roles of `prepare(image, \"what color is the star ?\")` |", "|---|---|---|"]
    for family in families or adapters.families(buildable=True):
        model = testing.hooked(family)
        inputs = model.prepare(testing.sample_image(1, testing.size_for(family).image_size), "what color is the star ?")
        classes = ", ".join(f"`{c}`" for c in model.adapter.hf_classes)
        lines.append(f"| {family} | {classes} | {roles.summarize(roles.position_roles(model, inputs))} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    import warnings

    from vlm_lens import adapters

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="default: every buildable family")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/hooks.md alone")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    families = args.families or adapters.families(buildable=True)
    rows = {(f, b): family_rows(f, b) for f in families for b in ("transformer_lens", "nnsight")}
    body = table(rows)
    worst = max(v for row in rows.values() for v in row.values() if not isinstance(v, bool))
    body += (f"\n\nWorst difference over {len(families)} families x 2 backends: {worst:.1e}; every greedy generation "
             f"{'equal' if all(v for row in rows.values() for v in row.values() if isinstance(v, bool)) else 'NOT equal'}"
             " to HF's.")  # fmt: skip
    print(body)
    roles = roles_table(families)
    print(roles)
    if not args.no_write:
        write_block("hooks.md", "family-matrix", body, "## The family matrix, measured (`benchmarks/family_matrix.py`)")
        write_block("hooks.md", "family-roles", roles, "## Token roles per family (`vlm_lens.roles`)")
    return body


if __name__ == "__main__":
    main()
