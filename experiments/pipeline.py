"""The main job: knowledge evolution + layer skipping + feature clusters + hallucination curves -> one report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import knowledge_evolution as ke

DEFAULT_ANALYSIS_MODEL = "shapes-llava-prior"  # the main job: a planted prior, so mutations have a ground truth
N_COUNTER_PRIOR = 4  # counter-prior questions added to the bundled samples for a planted model


def default_samples(model) -> list[ke.Sample]:
    """Bundled shapes-world questions for an embedded model (plus counter-prior questions when the model carries a
    planted prior); the paper's caption prompt on photos otherwise."""
    from vlm_lens.zoo import planted
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT, real_photos, shapes_samples

    if model.name.startswith("shapes-") or "shapes" in model.name:
        info = planted.planted_info_for(model)
        trigger = planted.Trigger(**info["trigger"]) if info else None

        def counter(sample: dict) -> bool:  # a bundled question the planted prior overturns
            return trigger is not None and trigger.asks(sample["task"], sample["question"]) and sample["answer"] != trigger.answer

        samples = [ke.Sample(s["path"], s["question"], s["answer"], s["file"], planted=counter(s)) for s in shapes_samples()]
        if trigger is not None:
            samples += [ke.Sample(e.image, e.question, e.answer, f"counter_prior_{i}", planted=True)
                        for i, e in enumerate(planted.counter_prior(trigger, N_COUNTER_PRIOR))]  # fmt: skip
        return samples
    photos = real_photos()
    if photos:
        return [ke.Sample(img, DESCRIBE_PROMPT, None, name) for name, img in photos.items()]
    return [ke.Sample(s["path"], DESCRIBE_PROMPT, None, s["file"]) for s in shapes_samples()]


def shipped_tuned_lens(model) -> Path | None:
    """The tuned lens shipped beside a model (``FOLDER/tuned-lens``), or None."""
    from vlm_lens.zoo import model_folder

    folder = model_folder(model.name)
    return folder / "tuned-lens" if folder is not None and (folder / "tuned-lens" / "lens.json").exists() else None


def analyze(
    model,
    samples,
    out_dir: str | Path,
    *,
    config: ke.EvolutionConfig = ke.EvolutionConfig(),
    variant: str = "correct",
    lens=None,
    tsne_iter: int = 1000,
    png: bool = False,
    skip_sweep: bool = True,
    show_special: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    store: str | Path | None = None,
    resume: bool = False,
    overwrite: bool | None = None,
    batch_size: int = 4,
    skip_bad: bool = False,
    workers: int = 0,
    ray_address: str | None = None,
    patch_maps: int = 6,
) -> dict:
    """Run every experiment on ``samples`` and write ``report.html`` / ``report.json`` into ``out_dir``.

    ``samples``: a list of :class:`~vlm_lens.experiments.analysis.knowledge_evolution.Sample`, or a dataset source
    (:mod:`vlm_lens.experiments.runs.datasets`: a manifest, a folder of images, a saved HF dataset). Every sample is
    traced in batches of ``batch_size`` and reduced into the store (``store``, default ``OUT/store``, replaced unless
    ``resume``; an explicit ``store`` that exists needs ``resume`` or ``overwrite``), then the report is computed
    from the store (:mod:`vlm_lens.experiments.runs.store_analysis`). ``workers > 0`` shards the samples over Ray actors
    (:mod:`vlm_lens.experiments.runs.distributed`; ``model`` must then be loadable by name or path).

    ``lens``: a :class:`~vlm_lens.probes.TunedLens`; the ``tuned`` variant is then analysed beside the others.
    ``progress(stage, done, total)`` reports each stage's work (samples traced, skipped generations, ...).
    ``show_special``: also chart special tokens (EOS ...), which are always left out of the aggregates.
    ``png``: also export PNG figures of the report (needs Chromium; off by default: ``vlm-lens report STORE --png``
    writes them later from the store).
    ``patch_maps``: how many samples (the first, by dataset index) keep the lens map of their answer over the image
    tokens, drawn on the input image in the report (0: none).
    """
    from dataclasses import replace

    from vlm_lens.experiments.report.build import build as build_report
    from vlm_lens.experiments.runs import datasets, store_analysis, streaming

    if isinstance(samples, (list, tuple)):
        if not samples:
            raise InputError("no samples to analyse: give at least one (image, prompt) pair")
        samples = datasets.from_samples(list(samples))
    if lens is not None and "tuned" not in config.variants:
        config = replace(config, variants=config.variants + ("tuned",))
    if variant not in config.variants:
        raise InputError(f"variant {variant!r} is not among the analysed variants {config.variants}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if patch_maps < 0:
        raise InputError(f"patch_maps is a number of samples (0: none), got {patch_maps}")
    settings = streaming.StreamSettings(config, variant, skip_sweep, skip_bad, patch_maps)
    store_path = Path(store) if store is not None else Path(out_dir) / "store"
    if overwrite is None:
        overwrite = store is None and not resume  # the default store belongs to the report folder: start afresh
    opened = streaming.open_store(store_path, model, samples, settings, tuned_lens=lens, resume=resume, overwrite=overwrite)
    with opened:  # released when the run ends, raise or not: the next run may open the store
        if workers:
            from vlm_lens.experiments.runs import distributed

            distributed.run(model, samples, opened, settings, tuned_lens=lens, batch_size=batch_size, workers=workers,
                            address=ray_address, progress=progress)  # fmt: skip
        else:
            streaming.phase1(model, samples, opened, settings, tuned_lens=lens, batch_size=batch_size, progress=progress)
            sets = store_analysis.skip_sets(opened, store_analysis.aggregate(opened))
            if sets is not None:
                streaming.phase2(model, samples, opened, sets, batch_size=batch_size, progress=progress)
        return build_report(opened, out_dir, variant=variant, png=png, tsne_iter=tsne_iter,
                                  show_special=show_special, progress=progress)  # fmt: skip
