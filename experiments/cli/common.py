"""What every command shares: one-line failures, loading the model, checking images and layers before a model loads,
the samples of a command, progress bars and the stage summary. Imported by every command module; imports none."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class LensKind(str, Enum):
    logit = "logit"
    tuned = "tuned"


class Variant(str, Enum):
    correct = "correct"
    paper = "paper"
    tuned = "tuned"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (one line) and exit with ``code`` (2: bad input, 1: a failed run)."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)  # one line
    raise typer.Exit(code)


def load_model(model: Optional[str]):
    """The model named by ``--model`` (default: the embedded default); a name that is neither embedded, a folder nor
    cached fails with suggestions (:func:`vlm_lens.load`), mapped to exit 2 by the command group."""
    from transformers.utils import logging as transformers_logging

    import vlm_lens
    from vlm_lens import zoo

    transformers_logging.disable_progress_bar()  # the "Loading weights" bar: the command prints its own progress
    return vlm_lens.load(model or zoo.DEFAULT_MODEL)


def n_layers_before_loading(model: Optional[str]) -> int | None:
    """The decoder depth from the model's config.json, without loading it (None when it cannot be read)."""
    from vlm_lens import zoo

    try:
        folder = zoo.model_folder(model or zoo.DEFAULT_MODEL)
        if folder is None:
            return None
        config = json.loads((folder / "config.json").read_text())
        return int((config.get("text_config") or config)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_paths(images: Optional[List[Path]]) -> list[Path]:
    """Every image file named by ``--image`` (files, or folders of images), checked before any model loads."""
    paths: list[Path] = []
    for path in images or []:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                fail(f"{path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            fail(f"image not found: {path}")
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as picture:
                picture.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            fail(f"{path} is not a readable image ({type(error).__name__}); pass PNG/JPEG files or a folder of them")
    return paths


def samples_for(model, paths: list[Path], prompt: Optional[str]):
    from vlm_lens.experiments.analysis.knowledge_evolution import Sample
    from vlm_lens.experiments.pipeline import default_samples
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT

    if not paths:
        samples = default_samples(model)
        return [Sample(s.image, prompt, None, s.name) for s in samples] if prompt else samples
    return [Sample(p, prompt or DESCRIBE_PROMPT, None, p.name) for p in paths]


def progress_bar(console):
    """A progress bar per stage (done/total, rate, time left); silent when the output is not a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def tuned_lens_from(vlm, folder: Optional[Path]):
    from vlm_lens.probes import TunedLens

    if folder is None:
        from vlm_lens.experiments.pipeline import shipped_tuned_lens

        folder = shipped_tuned_lens(vlm)
        if folder is None:
            fail(f"{vlm.name} ships no tuned lens: train one with `vlm-lens tune-lens --model {vlm.name} --out DIR` "
                  "and pass --tuned-lens DIR")  # fmt: skip
    try:
        return TunedLens.load(folder, vlm)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))




def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"3,4"`` / ``"3-5"`` -> decoder layers; reversed, out-of-range or malformed parts fail with the fix."""
    chosen: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    fail(f"--layers: the range {part.strip()!r} runs backwards; write it low-high, e.g. '{b}-{a}'")
                chosen += list(range(a, b + 1))
            elif part.strip():
                chosen.append(int(part))
    except ValueError:
        fail(f"--layers takes comma-separated layers or ranges like '3,4' or '3-5', got {spec!r}")
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        fail(f"--layers: decoder layers are 0..{n_layers - 1}, got {bad}")
    if not chosen:
        fail(f"--layers names no layer: {spec!r}")
    return sorted(set(chosen))


def say_what_is_asked(console, vlm, images: bool, other_source: bool, prompt: Optional[str], n_samples: int) -> None:
    """A default the user did not choose is said, or refused when the model cannot read it: images without --prompt
    get the paper's caption prompt (refused, naming the words, when the model does not know them); --prompt without
    images asks the bundled images (whose reference answers are for other questions)."""
    from vlm_lens.inputs import unknown_words
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT

    if images and prompt is None:
        unknown = unknown_words(vlm, DESCRIBE_PROMPT)
        if unknown:
            fail(f"no --prompt: the default caption prompt {DESCRIBE_PROMPT!r} has words {vlm.name} does not know "
                 f"({', '.join(unknown)}); ask with --prompt, e.g. --prompt 'what color is the star ?'")
        console.print(f"no --prompt: asking the paper's caption prompt {DESCRIBE_PROMPT!r}", highlight=False, soft_wrap=True)
    elif prompt is not None and not (images or other_source):
        console.print(f"asking {prompt!r} about the {n_samples} bundled images (their reference answers are for "
                      "other questions: no accuracy)", highlight=False, markup=False, soft_wrap=True)  # fmt: skip
