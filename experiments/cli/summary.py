"""The closing words of ``vlm-lens analyze``: what was found, in plain sentences, a screen or less.

Built from the report's data (``report.json``), so the terminal and the report never disagree. Layers are stack
indices (0 = embeddings, l = after decoder layer l-1); skip sets name decoder layers.
"""

from __future__ import annotations

from pathlib import Path

LENS_MEANING = {
    "correct": "the correct lens (the model's final norm and unembedding, read at every layer)",
    "paper": "the paper lens (the authors' code: lm_head on the raw residual, no final norm)",
    "tuned": "the tuned lens (a learned per-layer translator before the unembedding)",
}
MAX_EVENT_LINES = 4


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _layers(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) else \
        ", ".join(str(x) for x in layers)  # fmt: skip


def _interval(share: dict) -> str:
    if share["low"] is None or share["high"] is None:
        return f"share {share['share']:.2f}"
    return f"share {share['share']:.2f}, 95% interval {share['low']:.2f}-{share['high']:.2f}"


def _stages(variant: str, agg: dict) -> list[str]:
    stages, share = agg["stages"], agg["event_share"]
    name = LENS_MEANING.get(variant, f"{variant} lens")
    if stages is None:
        return [f"Read with {name}: no answer was established at any layer, so no critical layer."]
    crit = agg["critical_layer"]
    lines = [f"Read with {name}:", f"  Answers become the top token at layer {stages['critical_layer']} (median over "
             f"{_count(crit['n'], 'token')})."]  # fmt: skip
    if stages["mutation_detected"]:
        lines.append(f"  Deep layers overturn established answers at layer {stages['mutation_layer']} of "
                     f"{stages['last_layer']}: {share['events']} of {share['tokens']} tokens ({_interval(share)}), a "
                     f"mutation stage [{stages['mutation'][0]}, {stages['mutation'][1]}).")  # fmt: skip
    else:
        lines.append(f"  No mutation stage: {share['events']} of {share['tokens']} tokens overturned ({_interval(share)}"
                     "), too few to tell from chance.")  # fmt: skip
    return lines


def _events(agg: dict) -> list[str]:
    events = agg["events"]
    lines = [f"  {e['sample']}: {e['leader']} led from layer {e['critical']}, overturned to {e['token']} at layer "
             f"{e['layer']}" for e in events[:MAX_EVENT_LINES]]  # fmt: skip
    if len(events) > MAX_EVENT_LINES:
        lines.append(f"  ... and {len(events) - MAX_EVENT_LINES} more (report.html, per-token evidence)")
    return lines


def _skips(data: dict) -> list[str]:
    skip = data.get("layer_skip")
    if not skip:
        return []
    lines = []
    for name, row in skip["sets"].items():
        restored = row.get("planted_restored")
        if name == "none" or not restored:
            continue
        lines.append(f"Skipping decoder layers {_layers(row['skipped_layers'])} ({name}) restored {restored['restored']} "
                     f"of {restored['of']} counter-prior answers.")  # fmt: skip
    return lines


def closing_summary(result: dict, variants) -> list[str]:
    """The lines ``vlm-lens analyze`` ends with (``result``: what :func:`vlm_lens.experiments.pipeline.analyze`
    returns)."""
    data, files = result["data"], result["files"]
    info, agg = data["store"], data["aggregate"]
    shown = data["shown_variant"]
    bad = f", {len(info['bad'])} unreadable rows recorded" if info["bad"] else ""
    planted = f" ({info['planted']} counter-prior questions)" if info["planted"] else ""
    accuracy = "" if agg["accuracy"] is None else f", accuracy {agg['accuracy']:.2f}"
    lines = [f"{data['model']['name']}: {_count(info['analysed'], 'sample')}{planted}{bad}{accuracy}."]
    if info["analysed"] == 1 and data["samples"]:
        sample = data["samples"][0]
        lines.append(f"Answer: {sample['generated_text']!r}" + (f" (reference {sample['answer']!r})" if sample["answer"] else ""))
    lines += _stages(shown, agg[shown])
    if agg[shown]["stages"] and agg[shown]["stages"]["mutation_detected"]:
        lines += _events(agg[shown])
    lines += _skips(data)
    for v in variants:
        if v != shown:
            stages = agg[v]["stages"]
            what = "no critical layer" if stages is None else f"critical layer {stages['critical_layer']}, " + (
                f"mutation layer {stages['mutation_layer']}" if stages["mutation_detected"] else "no mutation stage")
            lines.append(f"Read with {LENS_MEANING.get(v, v)}: {what}.")
    html = Path(files["html"]).absolute()
    size = html.stat().st_size / 2**20 if html.exists() else 0.0
    pngs = files.get("png") or []
    where = f"; {len(pngs)} PNG figures beside it" if pngs else ""
    store = Path(info["path"]).absolute()
    on_demand = "" if pngs or files.get("png_notice") else f" (PNG figures: vlm-lens report {store} --png)"
    lines.append(f"Report: {html} ({size:.1f} MB) and report.json{where}; run store {store}{on_demand}")
    if files.get("png_notice"):
        lines.append(files["png_notice"])
    return lines
