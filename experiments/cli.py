"""The ``vlm-lens`` command line: one typer app.

``vlm-lens analyze`` (no arguments: the embedded model with a planted prior, on bundled and counter-prior questions),
``skip``, ``tune-lens``, ``validate``, ``hooks``, ``demo``, and ``vlm-lens zoo train | plant | evaluate``
(:mod:`vlm_lens.experiments.cli_zoo`). Exit codes: 0 success, 1 a failed run, 2 bad input (one line naming the fix).
Cheap checks (paths, ranges, option combinations) run before any model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from vlm_lens.experiments.outputs import check_output

from typer.core import TyperGroup

_DEBUG = {"on": bool(os.environ.get("VLM_LENS_DEBUG"))}
# typer ships its own copy of click: its usage errors (BadParameter, NoSuchOption, unknown commands ...) derive from
# that copy's ClickException, not the standalone package's. Found through a public name, not typer's private module.
_TYPER_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _ErrorsToExitCodes(TyperGroup):
    """Bad input (:class:`~vlm_lens.errors.VLMLensError`) -> exit 2 and one line naming the fix; any other failure ->
    exit 1 and one line; ``--debug`` (or ``VLM_LENS_DEBUG=1``) lets the traceback through instead."""

    def invoke(self, ctx):
        import click

        from vlm_lens.errors import VLMLensError

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, typer.Exit, typer.Abort,
                _TYPER_CLICK_EXCEPTION):  # fmt: skip
            _attach_usage(self, ctx, sys.exc_info()[1])
            raise  # usage errors: click prints the usage line and "Error: ..." and exits 2
        except VLMLensError as error:
            if _DEBUG["on"]:
                raise
            _fail(str(error), 2)
        except KeyboardInterrupt:
            _fail("interrupted; nothing half-written was left behind (rerun, with --resume for analyze)", 130)
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if _DEBUG["on"]:
                raise
            _fail(f"the run failed: {type(error).__name__}: {error} (rerun with --debug for the traceback)", 1)


def _attach_usage(group, ctx, error) -> None:
    """An option missing its value fails while the command's context is being made, so click has no context to print
    the usage line from: give it the command's (parsed leniently, so it cannot fail itself)."""
    name = getattr(ctx, "invoked_subcommand", None)  # set by click before it makes the command's context
    if getattr(error, "ctx", True) is not None or not name:
        return
    command = group.get_command(ctx, name)
    if command is not None:
        error.ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_ErrorsToExitCodes,
                  help="How knowledge evolves inside vision-language models.")  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class LensKind(str, Enum):
    logit = "logit"
    tuned = "tuned"


class Variant(str, Enum):
    correct = "correct"
    paper = "paper"
    tuned = "tuned"


def _version(value: bool) -> None:
    if value:
        import vlm_lens

        typer.echo(f"vlm-lens {vlm_lens.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
          debug: bool = typer.Option(False, "--debug", help="show Python tracebacks instead of one-line errors")):
    """How knowledge evolves inside vision-language models."""
    _DEBUG["on"] = debug or bool(os.environ.get("VLM_LENS_DEBUG"))  # per invocation: one --debug run does not stick


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)  # one line
    raise typer.Exit(code)


def _load(model: Optional[str]):
    """The model named by ``--model`` (default: the embedded default); a name that is neither embedded, a folder nor
    cached fails with suggestions (:func:`vlm_lens.load`), mapped to exit 2 by the command group."""
    import vlm_lens
    from vlm_lens import zoo

    return vlm_lens.load(model or zoo.DEFAULT_MODEL)


def _n_layers_before_loading(model: Optional[str]) -> int | None:
    """The decoder depth from the model's config.json, without loading it (None when it cannot be read)."""
    from vlm_lens import zoo

    try:
        folder = zoo.model_folder(model or zoo.DEFAULT_MODEL)
        config = json.loads((folder / "config.json").read_text())
        return int((config.get("text_config") or config)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _image_paths(images: Optional[List[Path]]) -> list[Path]:
    """Every image file named by ``--image`` (files, or folders of images), checked before any model loads."""
    paths: list[Path] = []
    for path in images or []:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                _fail(f"{path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            _fail(f"image not found: {path}")
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as picture:
                picture.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            _fail(f"{path} is not a readable image ({type(error).__name__}); pass PNG/JPEG files or a folder of them")
    return paths


def _samples(model, paths: list[Path], prompt: Optional[str]):
    from vlm_lens.experiments.knowledge_evolution import Sample
    from vlm_lens.experiments.pipeline import default_samples
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT

    if not paths:
        samples = default_samples(model)
        return [Sample(s.image, prompt, None, s.name) for s in samples] if prompt else samples
    return [Sample(p, prompt or DESCRIBE_PROMPT, None, p.name) for p in paths]


def _progress(console):
    """A progress bar per stage (done/total, rate, time left); silent when the output is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=console, disable=not console.is_terminal)  # fmt: skip
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, rate="")
        speed = next(t for t in bar.tasks if t.id == tasks[stage]).speed
        bar.update(tasks[stage], completed=done, total=total, rate=f"{speed:.2f}/s" if speed else "")

    return bar, update


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def stage_summary(agg: dict) -> str:
    """One line: the stages (half-open stack-layer intervals) and the evidence for a mutation stage."""
    stages, share = agg["stages"], agg["event_share"]
    if stages is None:
        return "no critical layer (no answer was established)"
    evidence = (f"{share['events']}/{share['tokens']} tokens with mutation events, share {_fmt(share['share'])} "
                f"(95% bootstrap {_fmt(share['low'])}-{_fmt(share['high'])})")  # fmt: skip
    if not stages["mutation_detected"]:
        return (f"critical layer {stages['critical_layer']}; no mutation stage detected ({evidence}); rapid evolution "
                f"[{stages['rapid_evolution'][0]}, {stages['rapid_evolution'][1]}), stabilization "
                f"[{stages['stabilization'][0]}, {stages['stabilization'][1]})")  # fmt: skip
    return (f"critical layer {stages['critical_layer']}, mutation layer {stages['mutation_layer']} of "
            f"{stages['last_layer']} ({evidence}); rapid evolution [{stages['rapid_evolution'][0]}, "
            f"{stages['rapid_evolution'][1]}), stabilization [{stages['stabilization'][0]}, {stages['stabilization'][1]}), "
            f"mutation [{stages['mutation'][0]}, {stages['mutation'][1]})")  # fmt: skip


def _tuned_lens(vlm, folder: Optional[Path]):
    from vlm_lens.probes import TunedLens

    if folder is None:
        from vlm_lens.experiments.pipeline import shipped_tuned_lens

        folder = shipped_tuned_lens(vlm)
        if folder is None:
            _fail(f"{vlm.name} ships no tuned lens: train one with `vlm-lens tune-lens --model {vlm.name} --out DIR` "
                  "and pass --tuned-lens DIR")  # fmt: skip
    try:
        return TunedLens.load(folder, vlm)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))


@app.command()
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

    from vlm_lens.experiments import knowledge_evolution as ke
    from vlm_lens.experiments import layer_skip

    if out is not None and out.is_dir():
        _fail(f"--out {out} is a folder: name the JSON file to write, e.g. {out / 'skip.json'}")
    check_output(out, "--out", folder=False)
    depth = _n_layers_before_loading(model)
    if layers is not None and depth is not None:
        _parse_layers(layers, depth)  # a bad range fails before the model loads
    paths = _image_paths(image)
    console = Console()
    vlm = _load(model)
    chosen = _parse_layers(layers, vlm.n_layers) if layers is not None else None
    samples = _samples(vlm, paths, prompt)
    bar, update = _progress(console)
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
                _fail("no critical layer was detected (no answer was established); pass --layers", code=1)
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


def _parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"3,4"`` / ``"3-5"`` -> decoder layers; reversed, out-of-range or malformed parts fail with the fix."""
    chosen: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    _fail(f"--layers: the range {part.strip()!r} runs backwards; write it low-high, e.g. '{b}-{a}'")
                chosen += list(range(a, b + 1))
            elif part.strip():
                chosen.append(int(part))
    except ValueError:
        _fail(f"--layers takes comma-separated layers or ranges like '3,4' or '3-5', got {spec!r}")
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        _fail(f"--layers: decoder layers are 0..{n_layers - 1}, got {bad}")
    if not chosen:
        _fail(f"--layers names no layer: {spec!r}")
    return sorted(set(chosen))


@app.command()
def hooks(model: Optional[str] = typer.Option(None), all_layers: bool = typer.Option(False, help="list every layer")) -> None:
    """List hook names and activation shapes for a model (one sample of its bundled inputs)."""
    import re

    from rich.console import Console
    from rich.table import Table

    vlm = _load(model)
    sample = _samples(vlm, [], None)[0]
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


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or 'tiny-llava'"),
    image: Optional[Path] = typer.Option(None, help="image path (default: a bundled shapes-world image)"),
    prompt: str = typer.Option("what color is the circle ?"),
    max_new_tokens: int = typer.Option(8, min=1),
) -> None:
    """Trace one greedy answer and print the probability of each generated token at every layer."""
    from vlm_lens import demo as run_demo

    if image is not None and not image.is_file():
        _fail(f"image not found: {image}")
    try:
        run_demo.run(model, image, prompt, max_new_tokens)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))


# sub-commands that live in their own modules (they use the helpers above)
from vlm_lens.experiments import cli_analyze, cli_lens  # noqa: E402,F401
from vlm_lens.experiments.cli_zoo import zoo_app  # noqa: E402

app.add_typer(zoo_app, name="zoo")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    # ``python -m vlm_lens.experiments.cli``: this file runs as __main__, but the sub-command modules register on the
    # app of the imported module; run that one
    from vlm_lens.experiments.cli import app as registered

    registered()
