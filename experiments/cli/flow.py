"""``vlm-lens flow``: attention knockout between token roles across windows of decoder layers, with the critical
layer beside it (:mod:`vlm_lens.experiments.analysis.information_flow`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlm_lens.experiments.cli.common import (
    fail,
    image_paths,
    load_model,
    n_layers_before_loading,
    progress_bar,
    samples_for,
    say_what_is_asked,
)
from vlm_lens.experiments.cli.outputs import check_output


def flow(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or cached model id"),
    image: Optional[List[Path]] = typer.Option(None, help="an image file or a folder (repeatable)"),
    prompt: Optional[str] = typer.Option(None),
    manifest: Optional[Path] = typer.Option(None, help="JSONL or CSV of (image, question[, answer]) pairs"),
    held_out: int = typer.Option(0, min=0, help="ask N fresh held-out shapes-world questions instead (shapes models)"),
    flows: Optional[List[str]] = typer.Option(None, "--flow", help="'from->to' over token roles (repeatable); "
                                              "default image->question, image->last, question->last"),
    window: Optional[int] = typer.Option(None, min=1, help="decoder layers per window (default: 9 of 32, scaled)"),
    batch_size: int = typer.Option(16, min=1, help="samples per forward"),
    out: Path = typer.Option(Path("vlm-lens-flow"), help="folder for report.html and report.json"),
    png: bool = typer.Option(True, help="also export PNG figures (needs Chromium)"),
) -> None:
    """Where the image enters: block attention from one token role to another in a sliding window of decoder layers
    and plot how the answer's probability changes, beside the critical layer."""
    from rich.console import Console

    from vlm_lens.experiments.analysis import information_flow
    from vlm_lens.experiments.report import flow_page
    from vlm_lens.probes.knockout import DEFAULT_FLOWS, AttentionKnockout

    probe = AttentionKnockout(flows or DEFAULT_FLOWS, window)  # unknown roles and bad flows fail here (exit 2)
    depth = n_layers_before_loading(model)
    if depth is not None:
        probe.starts(depth)  # a window longer than the model fails before it loads
    if held_out and (image or prompt or manifest):
        fail("--held-out asks its own shapes-world questions: leave out --image, --prompt and --manifest")
    if manifest is not None and (image or prompt):
        fail("give either --manifest or --image/--prompt, not both")
    if manifest is not None and not manifest.is_file():
        fail(f"manifest not found: {manifest}")
    check_output(out, "--out")
    paths = image_paths(image)
    console = Console()
    vlm = load_model(model)
    probe.starts(vlm.n_layers)
    if held_out:
        samples = held_out_samples(vlm, held_out)
    elif manifest is not None:
        from vlm_lens.experiments.runs.manifest import read_manifest

        samples = read_manifest(manifest)
    else:
        samples = samples_for(vlm, paths, prompt)
        say_what_is_asked(console, vlm, bool(paths), False, prompt, len(samples))
    bar, update = progress_bar(console)
    with bar:
        result = information_flow.run(vlm, samples, list(probe.flows), window, batch_size=batch_size,
                                      progress=lambda done, total: update("knockout", done, total))  # fmt: skip
    written = flow_page.write(result, out, png=png)
    agg = result["aggregate"]
    for flow_name in result["flows"]:
        means = agg["mean"][flow_name]
        worst = min(range(len(means)), key=lambda w: means[w])
        console.print(f"{flow_name}: largest mean drop {100 * means[worst]:.0f} % with the window at decoder layers "
                      f"{result['window_starts'][worst]}-{result['window_starts'][worst] + result['window'] - 1}",
                      highlight=False)  # fmt: skip
    crit = agg["critical_layer"]
    if crit is not None:
        console.print(f"critical layer (first answer token): median {crit['median']}, quartiles {crit['q1']}-{crit['q3']}",
                      highlight=False)  # fmt: skip
    console.print(f"{result['cost']['forwards_per_sample']} forwards per sample; report: {written['html']} and report.json",
                  highlight=False)  # fmt: skip


def held_out_samples(vlm, n: int):
    from vlm_lens.experiments.analysis.records import Sample
    from vlm_lens.inputs import unknown_words
    from vlm_lens.zoo import shapes_world as sw

    unknown = unknown_words(vlm, " ".join(sw.vocabulary()))
    if unknown:
        fail(f"--held-out asks shapes-world questions, and {vlm.name} does not know their words ({', '.join(unknown[:4])}); "
             "pass --image and --prompt")  # fmt: skip
    samples: list = []
    seed = sw.HELD_OUT_START + 900_000
    while len(samples) < n:  # one-word answers only: the first answer token is the answer
        e = sw.example(seed)
        seed += 1
        if e.task != "caption":
            samples.append(Sample(e.image, e.question, e.answer, f"held_out_{len(samples)}"))
    return samples
