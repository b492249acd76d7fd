"""``vlm-lens decode``: greedy decoding with a correction (skip, DeCo, DoLa, VCD, evidence) beside plain greedy."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from vlm_lens.experiments.cli.common import fail, image_paths, load_model, parse_layers, samples_for, say_what_is_asked
from vlm_lens.experiments.cli.outputs import check_output


class MethodName(str, Enum):
    greedy = "greedy"
    skip = "skip"
    deco = "deco"
    dola = "dola"
    vcd = "vcd"
    evidence = "evidence"


DETECT_SAMPLES = 32  # skip without --layers detects the mutation stage on this many samples (traces kept in memory)
# which options each method reads (an option given to a method that ignores it is refused, not silently dropped)
OPTIONS = {"skip": {"layers"}, "deco": {"alpha", "top_p"}, "dola": {"alpha"}, "vcd": {"alpha", "beta"},
           "evidence": {"blend"}, "greedy": set()}  # fmt: skip


def correction_for(method: str, vlm, samples, options: dict, max_new_tokens: int):
    """The correction object of ``method`` with the options given; skip without --layers uses the mutation stage
    detected on the first :data:`DETECT_SAMPLES` samples (the paper's skip.2)."""
    from vlm_lens.experiments.analysis.evidence_decoding import Evidence
    from vlm_lens.probes import decoding as D

    given = {k: v for k, v in options.items() if v is not None}
    if method == "skip":
        layers = given.get("layers")
        if layers is None:
            from vlm_lens.experiments.analysis import knowledge_evolution as ke
            from vlm_lens.experiments.analysis.layer_skip import skip_sets

            config = ke.EvolutionConfig(max_new_tokens=max_new_tokens, variants=("correct",))
            evolution = ke.run(vlm, samples[:DETECT_SAMPLES], config)
            stages = evolution["aggregate"]["correct"]["stages"]
            if stages is None or stages["mutation_layer"] is None:
                fail("no mutation stage was detected on these samples, so there is no skip.2 set: pass --layers", 1)
            layers = skip_sets(stages["critical_layer"], stages["mutation_layer"], vlm.n_layers)["skip.2"]
        return D.Skip(layers)
    build = {"greedy": D.Method, "deco": D.DeCo, "dola": D.DoLa, "vcd": D.VCD, "evidence": Evidence}[method]
    return build(**given)


def decode(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or cached model id"),
    method: MethodName = typer.Option(MethodName.evidence, help="the correction"),
    image: Optional[List[Path]] = typer.Option(None, help="an image file or a folder (repeatable)"),
    prompt: Optional[str] = typer.Option(None),
    manifest: Optional[Path] = typer.Option(None, help="JSONL or CSV of (image, question[, answer]) pairs"),
    max_new_tokens: int = typer.Option(16, min=1),
    layers: Optional[str] = typer.Option(None, help="skip: decoder layers, e.g. '6,7' (default: the skip.2 set detected on the first 32 samples)"),
    alpha: Optional[float] = typer.Option(None, help="deco/dola/vcd: strength (0 = plain greedy)"),
    beta: Optional[float] = typer.Option(None, help="vcd: plausibility cut (share of the top probability)"),
    top_p: Optional[float] = typer.Option(None, help="deco: candidate mass"),
    blend: Optional[float] = typer.Option(None, help="evidence: 1 = the overturned answer, 0 = plain greedy"),
    out: Optional[Path] = typer.Option(None, help="write every sample's answers as JSON here"),
) -> None:
    """Decode with a correction and show each answer beside plain greedy decoding (and the reference, if any)."""
    from rich.console import Console
    from rich.table import Table

    options: dict[str, Any] = {"layers": layers, "alpha": alpha, "beta": beta, "top_p": top_p, "blend": blend}
    stray = sorted(k for k, v in options.items() if v is not None and k not in OPTIONS[method.value])
    if stray:
        fail(f"--{stray[0].replace('_', '-')} does not apply to --method {method.value} (it reads: "
             f"{', '.join('--' + o.replace('_', '-') for o in sorted(OPTIONS[method.value])) or 'nothing'})")  # fmt: skip
    if manifest is not None and (image or prompt):
        fail("give either --manifest or --image/--prompt, not both")
    if manifest is not None and not manifest.is_file():
        fail(f"manifest not found: {manifest}")
    check_output(out, "--out", folder=False)
    paths = image_paths(image)
    console = Console()
    vlm = load_model(model)
    if manifest is not None:
        from vlm_lens.experiments.runs.manifest import read_manifest

        samples = read_manifest(manifest)
    else:
        samples = samples_for(vlm, paths, prompt)
        say_what_is_asked(console, vlm, bool(paths), False, prompt, len(samples))
    if layers is not None:
        options["layers"] = parse_layers(layers, vlm.n_layers)
    correction = correction_for(method.value, vlm, samples, options, max_new_tokens)
    table = Table(title=f"{method.value} decoding · {vlm.name}")
    for col in ("sample", "question", "greedy", method.value, "reference"):
        table.add_column(col)
    rows = []
    from vlm_lens.experiments.analysis.evidence_decoding import per_sample_corrections

    per_sample = per_sample_corrections(correction, samples)
    for i, sample in enumerate(samples):
        inputs = vlm.prepare(sample.image, sample.prompt)
        greedy = vlm.generate(inputs, max_new_tokens)
        result = vlm.generate(inputs, max_new_tokens, correction=per_sample(i), return_type="result")
        rows.append({"sample": sample.name or str(i), "question": sample.prompt, "greedy": greedy,
                     "corrected": result.text, "reference": sample.answer, "changed_steps": sum(result.changed),
                     "notes": result.notes})  # fmt: skip
        table.add_row(rows[-1]["sample"], sample.prompt, greedy, result.text, sample.answer or "–")
    console.print(table)
    changed = sum(r["greedy"] != r["corrected"] for r in rows)
    console.print(f"{changed} of {len(rows)} answers changed by {method.value} decoding.", highlight=False)
    if out is not None:
        from vlm_lens.atomic import write_file

        write_file(out, json.dumps({"method": method.value, "settings": repr(correction), "samples": rows}, indent=1))
        console.print(f"wrote {out}", highlight=False)
