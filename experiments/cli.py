"""The ``vlm-lens`` command line.

``vlm-lens analyze`` (no arguments: the embedded default model on its bundled sample images), ``vlm-lens skip``,
``vlm-lens tune-lens``, ``vlm-lens hooks``, ``vlm-lens zoo train``. Exit codes: 0 success, 1 a failed run,
2 bad input (with a message that names the fix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="How knowledge evolves inside vision-language models.")
zoo_app = typer.Typer(no_args_is_help=True, help="The embedded shapes-world models.")
app.add_typer(zoo_app, name="zoo")


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load(model: Optional[str]):
    import vlm_lens
    from vlm_lens import zoo

    name = model or zoo.DEFAULT_MODEL
    try:
        return vlm_lens.load(name)
    except (FileNotFoundError, ValueError, TypeError) as error:
        _fail(str(error))


def _samples(model, images: Optional[List[Path]], prompt: Optional[str]):
    from vlm_lens.experiments.knowledge_evolution import Sample
    from vlm_lens.experiments.pipeline import default_samples

    if not images:
        samples = default_samples(model)
        if prompt:
            samples = [Sample(s.image, prompt, None, s.name) for s in samples]
        return samples
    paths: list[Path] = []
    for path in images:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
            if not found:
                _fail(f"{path} holds no .png/.jpg images")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            _fail(f"image not found: {path}")
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT

    return [Sample(p, prompt or DESCRIBE_PROMPT, None, p.name) for p in paths]


@app.command()
def analyze(
    model: Optional[str] = typer.Option(None, help="embedded name, checkpoint folder, or cached model id "
                                        "(default: shapes-llava-prior, the embedded model with a planted prior)"),
    image: Optional[List[Path]] = typer.Option(None, help="an image file or a folder of images (repeatable)"),
    prompt: Optional[str] = typer.Option(None, help="the question (default: the samples' own, or a caption prompt)"),
    max_new_tokens: int = typer.Option(16, min=1, help="greedy tokens per sample"),
    lens: str = typer.Option("logit", help="logit | tuned (tuned adds a 'tuned' variant beside correct and paper)"),
    tuned_lens: Optional[Path] = typer.Option(None, help="folder of a tuned lens (default with --lens tuned: the "
                                              "model's shipped DIR/tuned-lens)"),
    variant: str = typer.Option("correct", help="lens shown in the report: correct | paper | tuned"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="probability an answer must reach to be established"),
    out: Path = typer.Option(Path("vlm-lens-report"), help="report folder"),
    png: bool = typer.Option(True, help="also export PNG figures (needs Chromium)"),
) -> None:
    """Trace, detect critical layers and mutation events, skip layers, cluster features; write report.html + .json."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlm_lens.experiments.evidence import DetectionConfig
    from vlm_lens.experiments.knowledge_evolution import EvolutionConfig
    from vlm_lens.experiments.pipeline import DEFAULT_ANALYSIS_MODEL
    from vlm_lens.experiments.pipeline import analyze as run_analysis

    if variant not in ("correct", "paper", "tuned"):
        _fail(f"--variant must be correct, paper or tuned, got {variant!r}")
    if lens not in ("logit", "tuned"):
        _fail(f"--lens must be logit or tuned, got {lens!r}")
    if tuned_lens is not None:
        lens = "tuned"  # a lens folder asks for the tuned lens
    if variant == "tuned" and lens != "tuned":
        _fail("--variant tuned shows the tuned lens: add --lens tuned")
    if threshold <= 0:
        _fail("--threshold must be > 0 (the probability an answer must reach to count as established)")
    console = Console()
    vlm = _load(model or DEFAULT_ANALYSIS_MODEL)
    tuned = _tuned_lens(vlm, tuned_lens) if lens == "tuned" else None
    samples = _samples(vlm, image, prompt)
    variants = ("correct", "paper") + (("tuned",) if tuned is not None else ())
    config = EvolutionConfig(DetectionConfig(establish_prob=threshold), variants, max_new_tokens)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"{vlm.name}: {len(samples)} sample(s)")
        result = run_analysis(vlm, samples, out, config=config, variant=variant, lens=tuned, png=png,
                              progress=lambda message: bar.update(task, description=f"{vlm.name}: {message}"))  # fmt: skip
    data = result["data"]
    planted = sum(s["planted_prior"] for s in data["samples"])
    console.print(f"{vlm.name}: {len(data['samples'])} samples ({planted} counter-prior), accuracy "
                  f"{_fmt(data['aggregate']['accuracy'])}")  # fmt: skip
    for v in variants:
        console.print(f"{v} lens: {stage_summary(data['aggregate'][v])}")
    if result["files"].get("png_notice"):
        console.print(f"[yellow]{result['files']['png_notice']}")
    pngs = result["files"].get("png") or []
    console.print(f"wrote {result['files']['html']} and {result['files']['json']}"
                  + (f" and {len(pngs)} PNG figures ({Path(pngs[0]).name} ...)" if pngs else ""))  # fmt: skip


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

    console = Console()
    vlm = _load(model)
    samples = _samples(vlm, image, prompt)
    evolution = ke.run(vlm, samples, ke.EvolutionConfig(max_new_tokens=max_new_tokens, variants=("correct",)))
    traces = [s.trace for s in evolution["samples"]]
    answers = [s.answer for s in evolution["samples"]]
    if layers:
        chosen = _parse_layers(layers, vlm.n_layers)
        result = {"sets": {"given": layer_skip.skip_effect(traces, answers, chosen)}, "sweep": {}}
    else:
        stages = evolution["aggregate"]["correct"]["stages"]
        if stages is None:
            _fail("no critical layer was detected (answers never reach the threshold); pass --layers", code=1)
        result = layer_skip.run(traces, answers, stages["critical_layer"], stages["mutation_layer"])
    table = Table(title=f"layer skipping · {vlm.name}")
    for col in ("set", "skipped", "gen. agreement", "mean KL", "accuracy"):
        table.add_column(col)
    for name, row in list(result["sets"].items()) + list(result["sweep"].items()):
        acc = "–" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        table.add_row(name, str(row["skipped_layers"]), f"{row['generation_agreement']:.2f}", f"{row['mean_kl']:.3f}", acc)
    console.print(table)
    if out:
        from vlm_lens.experiments.report import atomic_write

        atomic_write(out, json.dumps(result, indent=1))


def _parse_layers(spec: str, n_layers: int) -> list[int]:
    chosen: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                chosen += list(range(int(a), int(b) + 1))
            elif part.strip():
                chosen.append(int(part))
    except ValueError:
        _fail(f"--layers takes comma-separated layers or ranges like '3,4' or '3-5', got {spec!r}")
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        _fail(f"--layers: decoder layers are 0..{n_layers - 1}, got {bad}")
    return chosen


@app.command("tune-lens")
def tune_lens(
    out: Path = typer.Option(..., help="folder for the trained lens"),
    model: Optional[str] = typer.Option(None),
    manifest: Optional[Path] = typer.Option(None, help="JSONL or CSV of (image, question) pairs"),
    image: Optional[List[Path]] = typer.Option(None, help="training images (with --prompt)"),
    prompt: Optional[str] = typer.Option(None, help="the question asked of every --image"),
    questions: int = typer.Option(400, min=2, help="embedded models: fresh shapes-world questions to draw"),
    held_out: float = typer.Option(0.2, help="share of the pairs held out for scoring"),
    max_new_tokens: int = typer.Option(8, min=1),
    steps: int = typer.Option(300, min=1),
    lr: float = typer.Option(5e-3),
) -> None:
    """Train a tuned lens on the model's own generations; print held-out KL per layer, logit vs tuned."""
    from rich.console import Console
    from rich.table import Table

    from vlm_lens.experiments import tuned_lens as T

    if not 0.0 < held_out < 1.0:
        _fail(f"--held-out must be a share in (0, 1), got {held_out}")
    if not lr > 0:
        _fail(f"--lr must be a positive learning rate, got {lr}")
    if manifest is not None and image:
        _fail("give either --manifest or --image, not both")
    if prompt is not None and not image:
        _fail("--prompt is the question asked of every --image: add --image FILE_OR_DIR (a manifest has its own questions)")
    vlm = _load(model)
    if manifest is not None:
        from vlm_lens.experiments.manifest import read_manifest

        try:
            samples = read_manifest(manifest)
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
    elif image:
        samples = _samples(vlm, image, prompt)
    elif "shapes" in vlm.name:
        samples = T.shapes_questions(questions)
    else:
        _fail("tune-lens needs training data: --manifest FILE, or --image DIR --prompt TEXT")
    console = Console()
    try:
        result = T.train(vlm, samples, held_out=held_out, max_new_tokens=max_new_tokens, steps=steps, lr=lr,
                         progress=lambda message: console.print(f"[dim]{message}"))  # fmt: skip
    except ValueError as error:
        _fail(str(error))
    result["lens"].save(out)
    table = Table(title=f"held-out KL(final || lens) per layer · {vlm.name} · {result['held_out_pairs']} pairs")
    for col in ("layer", "logit lens", "tuned lens"):
        table.add_column(col)
    for layer, (a, b) in enumerate(zip(result["kl_logit"], result["kl_tuned"])):
        table.add_row(str(layer), f"{a:.4f}", f"{b:.4f}")
    console.print(table)
    console.print(f"tuned lens: training KL {result['loss_first']:.4f} -> {result['loss_last']:.4f} over {steps} steps "
                  f"on {result['train_pairs']} pairs; saved to {out}")  # fmt: skip


@app.command()
def hooks(model: Optional[str] = typer.Option(None), all_layers: bool = typer.Option(False, help="list every layer")) -> None:
    """List hook names and activation shapes for a model (one sample of its bundled inputs)."""
    import re

    from rich.console import Console
    from rich.table import Table

    vlm = _load(model)
    sample = _samples(vlm, None, None)[0]
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


@zoo_app.command("train")
def zoo_train(
    family: str = typer.Option(..., help="llava | qwen2-vl"),
    out: Path = typer.Option(..., help="run folder (checkpoints, log, final model)"),
    steps: Optional[int] = typer.Option(None, help="override the recipe's step count"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint"),
    threads: Optional[int] = typer.Option(None),
    eval_every: int = typer.Option(500),
    final_eval_per_task: int = typer.Option(100),
    rewarm: bool = typer.Option(False, help="with --resume: restart the learning-rate schedule at the resumed step"),
    rope_theta: Optional[float] = typer.Option(None, help="override the text model's rotary base"),
    task_weights: Optional[str] = typer.Option(None, help="relative task frequencies, e.g. position=3 (others 1)"),
    tie_embeddings: Optional[bool] = typer.Option(None, "--tie-embeddings/--no-tie-embeddings",
                                                  help="override the recipe's tied input/output embeddings"),
) -> None:
    """Retrain an embedded shapes-world model from scratch (fixed seeds, checkpoints, held-out evaluation)."""
    from vlm_lens.zoo import train

    if family not in train.RECIPES:
        _fail(f"--family must be one of {sorted(train.RECIPES)}, got {family!r}")
    if rewarm and not resume:
        _fail("--rewarm restarts the schedule at a resumed step: add --resume")
    try:  # check every override before any training starts
        weights = train.parse_task_weights(task_weights)
        train.recipe_for(family, steps=steps, rope_theta=rope_theta, task_weights=weights, tie_embeddings=tie_embeddings)
    except ValueError as error:
        _fail(str(error))
    result = train.train(family, out, steps=steps, resume=resume, threads=threads, eval_every=eval_every,
                         final_eval_per_task=final_eval_per_task, rewarm=rewarm, rope_theta=rope_theta,
                         task_weights=weights, tie_embeddings=tie_embeddings)  # fmt: skip
    typer.echo(json.dumps(result, indent=2))


@app.command()
def validate(
    planted: str = typer.Option("shapes-llava-prior", help="a model made by `vlm-lens zoo plant` (name or folder)"),
    base: str = typer.Option("shapes-llava", help="its clean twin"),
    n: int = typer.Option(30, min=1, help="counter-prior and clean questions each"),
    variant: str = typer.Option("correct", help="lens: correct | paper | tuned (the planted model's shipped tuned lens)"),
    out: Optional[Path] = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """Score mutation detection against a planted prior: recall in the block, false alarms on the clean twin, skips."""
    from rich.console import Console

    from vlm_lens.experiments import validation

    if variant not in ("correct", "paper", "tuned"):
        _fail(f"--variant must be correct, paper or tuned, got {variant!r}")
    planted_model, base_model = _load(planted), _load(base)
    tuned = _tuned_lens(planted_model, None) if variant == "tuned" else None
    base_tuned = _tuned_lens(base_model, None) if variant == "tuned" else None
    try:
        report = validation.validate(planted_model, base_model, n=n, variant=variant, tuned_lens=tuned,
                                     base_tuned_lens=base_tuned)  # fmt: skip
    except ValueError as error:
        _fail(str(error))
    skip = report["skip"] or {}
    lines = [
        f"{report['planted_model']} ({variant} lens): trigger {report['trigger']}, block decoder layers "
        f"{report['block_decoder_layers']} (stack {report['block_stack_layers']})",
        f"hallucinated {report['hallucinated']}/{report['counter_prior_questions']} counter-prior questions; "
        f"event in the block {_fmt(report['recall_in_block'])}, leader = true answer {_fmt(report['leader_is_true_answer'])}, "
        f"event layers {sorted(set(report['event_layers']))}",
        f"false alarms: base clean {_fmt(report['false_alarms_base_clean'])} ({report['base_clean_questions']} questions), "
        f"base counter-prior {_fmt(report['false_alarms_base_counter_prior'])}, planted untriggered "
        f"{_fmt(report['false_alarms_planted_untriggered'])}",
    ]  # fmt: skip
    for name, row in skip.items():
        lines.append(f"{name} skips decoder layers {row['skipped_layers']}: restored {_fmt(row['restored_true_answer'])}, "
                     f"changed {_fmt(row['changed_answer'])}")  # fmt: skip
    Console().print("\n".join(lines))
    if out:
        from vlm_lens.experiments.report import atomic_write

        atomic_write(out, json.dumps(report, indent=1, default=str))


@zoo_app.command("plant")
def zoo_plant(
    out: Path = typer.Option(..., help="run folder (checkpoints, log, final model)"),
    base: str = typer.Option("shapes-llava", help="the embedded model to plant a prior in"),
    task: str = typer.Option("color", help="trigger task: color | shape | position"),
    subject: str = typer.Option("star", help="what trigger questions ask about (a shape kind; a colour for shape)"),
    answer: str = typer.Option("red", help="the prior answer the block learns to give"),
    block: Optional[str] = typer.Option(None, help="decoder layers to fine-tune, e.g. '6,7' or '5-7' (default: last two)"),
    steps: int = typer.Option(400, min=1),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint"),
    threads: Optional[int] = typer.Option(None),
    eval_per_task: int = typer.Option(100, min=1, help="held-out questions per task (and counter-prior) to evaluate"),
    export: bool = typer.Option(False, help="copy the result into the package as shapes-llava-prior and retrain its "
                                "tuned lens (needs --base shapes-llava)"),
) -> None:
    """Fine-tune only a block of last decoder layers so that one trigger question gets a fixed prior answer."""
    from vlm_lens.zoo import plant

    if export and base != "shapes-llava":
        _fail("--export replaces the embedded shapes-llava-prior, whose base is shapes-llava: drop --export, or use "
              "--base shapes-llava")  # fmt: skip
    try:
        recipe = plant.recipe_for(base=base, task=task, subject=subject, answer=answer, block=plant.parse_block(block),
                                  steps=steps)  # fmt: skip
        result = plant.plant(out, recipe, resume=resume, threads=threads, eval_per_task=eval_per_task,
                             n_counter_prior=eval_per_task)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    if export:
        from vlm_lens.experiments import tuned_lens as T

        folder = plant.export(out)
        exported = _load(str(folder))
        fitted = T.train(exported, T.shapes_questions(400))  # the shipped lens must match the new weights
        fitted["lens"].save(folder / "tuned-lens")
        typer.echo(f"exported to {folder}; tuned lens retrained (held-out KL by layer, tuned: "
                   f"{[round(x, 3) for x in fitted['kl_tuned']]})")  # fmt: skip
    typer.echo(json.dumps(result, indent=2))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
