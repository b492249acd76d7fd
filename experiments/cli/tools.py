"""Small commands: ``skip`` (layer skipping on a few images), ``hooks`` (hook names and shapes), ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from vlm_lens.experiments.cli.common import (
    fail,
    image_paths,
    load_model,
    n_layers_before_loading,
    parse_layers,
    progress_bar,  # fmt: skip
    samples_for,
    say_what_is_asked,
)
from vlm_lens.experiments.cli.outputs import check_output


def skip(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or cached model id"),
    image: Optional[List[Path]] = typer.Option(None, help="an image file or a folder (repeatable)"),
    prompt: Optional[str] = typer.Option(None),
    max_new_tokens: int = typer.Option(16, min=1),
    layers: Optional[str] = typer.Option(None, help="skip these decoder layers instead, e.g. '3,4,5' or '3-5'"),
    out: Optional[Path] = typer.Option(None, help="write the table as JSON here"),
) -> None:
    """Layer skipping: the paper's skip.1/2/3 from the detected layers plus a single-layer sweep, or given layers."""
    from rich.console import Console
    from rich.table import Table

    from vlm_lens.experiments.analysis import knowledge_evolution as ke
    from vlm_lens.experiments.analysis import layer_skip

    if out is not None and out.is_dir():
        fail(f"--out {out} is a folder: name the JSON file to write, e.g. {out / 'skip.json'}")
    check_output(out, "--out", folder=False)
    depth = n_layers_before_loading(model)
    if layers is not None and depth is not None:
        parse_layers(layers, depth)  # a bad range fails before the model loads
    paths = image_paths(image)
    console = Console()
    vlm = load_model(model)
    chosen = parse_layers(layers, vlm.n_layers) if layers is not None else None
    samples = samples_for(vlm, paths, prompt)
    say_what_is_asked(console, vlm, bool(paths), False, prompt, len(samples))
    bar, update = progress_bar(console)
    with bar:
        evolution = ke.run(vlm, samples, ke.EvolutionConfig(max_new_tokens=max_new_tokens, variants=("correct",)),
                           progress=lambda done, total: update("tracing", done, total))  # fmt: skip
        traces = [s.trace for s in evolution["samples"]]
        answers = [s.answer for s in evolution["samples"]]
        if chosen is not None:
            result = {"sets": {"given": layer_skip.skip_effect(traces, answers, chosen)}, "sweep": {}}
        else:
            stages = evolution["aggregate"]["correct"]["stages"]
            if stages is None or stages["critical_layer"] >= vlm.n_layers:
                fail("no critical layer was detected (no answer was established); pass --layers", code=1)
            result = layer_skip.run(traces, answers, stages["critical_layer"], stages["mutation_layer"],
                                    progress=lambda done, total: update("layer skipping", done, total))  # fmt: skip
    table = Table(title=f"layer skipping · {vlm.name}")
    for col in ("set", "skipped", "gen. agreement", "mean KL", "accuracy"):
        table.add_column(col)
    for name, row in list(result["sets"].items()) + list(result["sweep"].items()):
        acc = "–" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        table.add_row(name, str(row["skipped_layers"]), f"{row['generation_agreement']:.2f}", f"{row['mean_kl']:.3f}", acc)
    console.print(table)
    if out:
        from vlm_lens.atomic import write_file as atomic_write

        atomic_write(out, json.dumps(result, indent=1))
        console.print(f"wrote {out}")


def hooks(model: Optional[str] = typer.Option(None), all_layers: bool = typer.Option(False, help="list every layer")) -> None:
    """List hook names and activation shapes for a model (one sample of its bundled inputs)."""
    import re

    from rich.console import Console
    from rich.table import Table

    vlm = load_model(model)
    sample = samples_for(vlm, [], None)[0]
    _, cache = vlm.run_with_cache(vlm.prepare(sample.image, sample.prompt))
    table = Table(title=f"hooks · {vlm}")
    table.add_column("hook")
    table.add_column("shape")
    seen = set()
    for name, value in cache.items():
        key = name if all_layers else re.sub(r"\.\d+\.", ".{i}.", name)
        if key not in seen:
            seen.add(key)
            table.add_row(key, str(tuple(value.shape)))
    Console().print(table)


def demo(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or 'tiny-llava'"),
    image: Optional[Path] = typer.Option(None, help="image path (default: a bundled shapes-world image)"),
    prompt: str = typer.Option("what color is the circle ?"),
    max_new_tokens: int = typer.Option(8, min=1),
) -> None:
    """Trace one greedy answer and print the probability of each generated token at every layer."""
    from vlm_lens import demo as run_demo

    if image is not None and not image.is_file():
        fail(f"image not found: {image}")
    try:
        run_demo.run(model, image, prompt, max_new_tokens)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
