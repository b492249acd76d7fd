"""``vlm-lens analyze`` (bundled questions, images, a manifest, a folder, a saved HF dataset; streamed into a
resumable store; batched; optionally on Ray workers) and ``vlm-lens report STORE`` (the report from a store)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from vlm_lens.experiments.cli.common import (
    LensKind,
    Variant,
    fail,
    image_paths,
    load_model,
    progress_bar,
    samples_for,  # fmt: skip
    say_what_is_asked,
    tuned_lens_from,
)
from vlm_lens.experiments.cli.outputs import check_output


def default_threads() -> int:
    """Torch threads for a run: the cores this process may use minus those other processes keep busy (the 1-minute
    load average), at least 1. Oversubscribed OpenMP threads spin-wait: on a shared 2-core machine 2 threads ran the
    layer-skip sweep 27x slower than 1 while another process held a core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def set_threads(threads: Optional[int]) -> int:
    import torch

    chosen = threads or default_threads()
    torch.set_num_threads(chosen)
    return chosen


def analyze(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or cached model id "
                                        "(default: shapes-llava-prior, the embedded model with a planted prior)"),
    image: Optional[List[Path]] = typer.Option(None, help="an image file or a folder of images (repeatable)"),
    prompt: Optional[str] = typer.Option(None, help="the question (default: the samples' own, or a caption prompt)"),
    max_new_tokens: int = typer.Option(16, min=1, help="greedy tokens per sample"),
    lens: LensKind = typer.Option(LensKind.logit, help="tuned adds a 'tuned' variant beside correct and paper"),
    tuned_lens: Optional[Path] = typer.Option(None, help="folder of a tuned lens (implies --lens tuned; default: "
                                              "the model's shipped DIR/tuned-lens)"),
    variant: Variant = typer.Option(Variant.correct, help="the lens the report shows (all are computed)"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="probability an answer must reach to be established"),
    out: Path = typer.Option(Path("vlm-lens-report"), help="report folder"),
    png: bool = typer.Option(False, help="also export PNG figures (needs Chromium; ~7 s for the default run's 30 "
                             "figures; later: vlm-lens report OUT --png)"),
    skip_sweep: bool = typer.Option(True, help="also skip every single decoder layer (the sweep)"),
    special_tokens: bool = typer.Option(False, help="also chart special tokens such as </s> (never in the aggregates)"),
    manifest: Optional[Path] = typer.Option(None, help="JSONL or CSV with image, question[, answer, id] per row "
                                            "(relative paths resolve against its folder)"),
    dataset: Optional[Path] = typer.Option(None, help="a HF dataset folder written by save_to_disk"),
    image_column: Optional[str] = typer.Option(None, help="--dataset: the image column (default: the Image feature)"),
    question_column: Optional[str] = typer.Option(None, help="--dataset: the question column"),
    answer_column: Optional[str] = typer.Option(None, help="--dataset: the reference-answer column"),
    split: Optional[str] = typer.Option(None, help="--dataset: the split of a DatasetDict"),
    store: Optional[Path] = typer.Option(None, help="the run store (Parquet; default OUT/store, replaced unless --resume)"),
    resume: bool = typer.Option(False, help="continue the run in the store: samples already there are not redone"),
    overwrite: bool = typer.Option(False, help="start an existing --store afresh"),
    batch_size: int = typer.Option(4, min=1, help="samples generated together (one generate call, left padding)"),
    skip_bad: bool = typer.Option(False, help="record unreadable rows in the store and go on, instead of stopping"),
    workers: int = typer.Option(0, min=0, help="Ray workers (needs pip install 'vlm-lens[distributed]'); 0: this process"),
    ray_address: Optional[str] = typer.Option(None, help="an existing Ray cluster (default: start a local one)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: free cores, see docs/datasets.md)"),
    patch_maps: int = typer.Option(6, min=0, help="samples whose answer is mapped onto the image tokens in the report "
                                   "(the first ones; 0: none)"),
    timings: bool = typer.Option(False, help="print the wall-clock time of each phase at the end"),
) -> None:
    """Trace, detect critical layers and mutation events, skip layers, cluster features; write report.html + .json."""
    from rich.console import Console

    from vlm_lens.experiments.cli.timings import PhaseClock, collections_paused

    clock = PhaseClock()
    with collections_paused():  # importing the libraries and loading the model: no full collections of a growing heap
        from vlm_lens.experiments.analysis.evidence import DetectionConfig
        from vlm_lens.experiments.analysis.knowledge_evolution import EvolutionConfig
        from vlm_lens.experiments.pipeline import DEFAULT_ANALYSIS_MODEL
        from vlm_lens.experiments.runs.streaming import frozen_heap

        if tuned_lens is not None:
            lens = LensKind.tuned  # a lens folder asks for the tuned lens
            if not (tuned_lens / "lens.json").exists():
                fail(f"--tuned-lens {tuned_lens} holds no lens.json: train one with `vlm-lens tune-lens --out DIR`")
        if variant == Variant.tuned and lens != LensKind.tuned:
            fail("--variant tuned shows the tuned lens: add --lens tuned")
        if threshold <= 0:
            fail("--threshold must be > 0 (the probability an answer must reach to count as established)")
        check_output(out, "--out")
        check_output(store, "--store")
        sources = [name for name, given in (("--manifest", manifest), ("--dataset", dataset), ("--image", image)) if given]
        if len(sources) > 1:
            fail(f"{' and '.join(sources)} both name the samples: pass one of --manifest, --dataset, --image")
        if workers and ray_address is None and workers > 64:
            fail(f"--workers {workers}: a local Ray cluster runs at most 64 workers; pass --ray-address for a cluster")
        if resume and overwrite:
            fail("--resume continues a store and --overwrite starts it afresh: pass one")
        if store is not None and store.exists() and not store.is_dir():
            fail(f"--store {store} is a file: name a folder for the run store")
        source = _source(manifest, dataset, image, prompt, skip_bad, image_column, question_column, answer_column, split)
        set_threads(threads)
        console = Console()
        clock.mark("loading the model")
        vlm = load_model(model or DEFAULT_ANALYSIS_MODEL)
    with frozen_heap():  # the libraries and the model live to the end: no collection needs to scan them
        tuned = tuned_lens_from(vlm, tuned_lens) if lens == LensKind.tuned else None
        samples = source if source is not None else samples_for(vlm, [], prompt)
        say_what_is_asked(console, vlm, bool(image), bool(manifest or dataset), prompt, len(samples))
        variants = ("correct", "paper") + (("tuned",) if tuned is not None else ())
        config = EvolutionConfig(DetectionConfig(establish_prob=threshold), variants, max_new_tokens)
        result = _run(vlm, samples, out, config, variant, tuned, png, skip_sweep, special_tokens, clock, console, store,
                      resume, overwrite, batch_size, skip_bad, workers, ray_address, patch_maps)  # fmt: skip
        clock.mark("summary")
        _print_result(console, result, variants)
    if timings:
        for line in clock.lines():
            console.print(line, highlight=False, markup=False)


def _run(vlm, samples, out, config, variant, tuned, png, skip_sweep, special_tokens, clock, console, store, resume,
         overwrite, batch_size, skip_bad, workers, ray_address, patch_maps) -> dict:  # fmt: skip
    from vlm_lens.experiments.pipeline import analyze as run_analysis

    bar, update = progress_bar(console)
    try:
        with bar:
            return run_analysis(vlm, samples, out, config=config, variant=variant.value, lens=tuned, png=png,
                                skip_sweep=skip_sweep, show_special=special_tokens, progress=clock.progress(update),
                                store=store, resume=resume, overwrite=overwrite or None, batch_size=batch_size,
                                skip_bad=skip_bad, workers=workers, ray_address=ray_address,
                                patch_maps=patch_maps)  # fmt: skip
    except ImportError as error:  # bad input (VLMLensError) and failed runs are mapped by the command group
        fail(f"{error}: --workers needs Ray, pip install 'vlm-lens[distributed]'")


def _print_result(console, result: dict, variants) -> None:
    from vlm_lens.experiments.cli.summary import closing_summary

    for line in closing_summary(result, variants):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _source(manifest, dataset, image, prompt, skip_bad, image_column, question_column, answer_column, split):
    """The dataset source the options name (None: the model's bundled samples), checked before any model loads."""
    from vlm_lens.experiments.analysis.knowledge_evolution import Sample
    from vlm_lens.experiments.runs import datasets
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT

    try:
        if image and not (len(image) == 1 and image[0].is_dir()):  # image files: one sample each
            paths = image_paths(image)
            return datasets.from_samples([Sample(p, prompt or DESCRIBE_PROMPT, None, p.name) for p in paths])
        columns = (image_column, question_column, answer_column, split)
        if manifest is not None or dataset is not None or image or any(columns):
            folder = image[0] if image else None
            return datasets.open_source(manifest=manifest, images=folder, dataset=dataset, skip_bad=skip_bad,
                                        prompt=prompt or (DESCRIBE_PROMPT if folder is not None else None),
                                        image_column=image_column, question_column=question_column,
                                        answer_column=answer_column, split=split)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    return None


def report(
    store: Path = typer.Argument(..., help="a run store (the --store of vlm-lens analyze), or the --out folder holding it"),
    out: Optional[Path] = typer.Option(None, help="report folder (default: the folder holding the store)"),
    variant: Optional[Variant] = typer.Option(None, help="the lens the report shows (default: the run's)"),
    png: bool = typer.Option(True, help="also export PNG figures (needs Chromium)"),
    special_tokens: bool = typer.Option(False, help="also chart special tokens"),
) -> None:
    """Rebuild report.html / report.json from a store, without the model."""
    from rich.console import Console

    from vlm_lens.experiments.report.build import build as build_report
    from vlm_lens.experiments.runs.store import Store, StoreError

    if not (store / "run.json").exists() and (store / "store" / "run.json").exists():
        store = store / "store"  # the report folder a run wrote: its store is inside
    try:
        opened = Store(store)
    except StoreError as error:
        fail(str(error))
    torn = opened.torn()
    if torn:
        fail(f"{store}: {len(torn)} shard(s) were not durably committed (a part is missing, truncated or corrupted: "
              f"{', '.join(torn[:3])}); delete them or run the analysis again with --resume to redo their samples")
    out = out or store.resolve().parent
    check_output(out, "--out")
    console = Console()
    bar, update = progress_bar(console)
    try:
        with bar:
            result = build_report(opened, out, variant=variant.value if variant else None, png=png,
                                        show_special=special_tokens, progress=update)  # fmt: skip
    except ValueError as error:
        fail(str(error))
    _print_result(console, result, opened.meta["settings"]["evolution"]["variants"])


