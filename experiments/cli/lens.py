"""``vlm-lens tune-lens`` and ``vlm-lens validate``: training a tuned lens, scoring the detector on planted truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from vlm_lens.experiments.cli.common import (
    Variant,
    fail,
    fmt,
    image_paths,
    load_model,
    samples_for,
    say_what_is_asked,
    tuned_lens_from,  # fmt: skip
)
from vlm_lens.experiments.cli.outputs import check_output


def tune_lens(
    out: Path = typer.Option(..., help="folder for the trained lens"),
    model: Optional[str] = typer.Option(None),
    manifest: Optional[Path] = typer.Option(None, help="JSONL or CSV of (image, question) pairs"),
    image: Optional[List[Path]] = typer.Option(None, help="training images (with --prompt)"),
    prompt: Optional[str] = typer.Option(None, help="the question asked of every --image"),
    questions: Optional[int] = typer.Option(None, min=2, help="embedded models: fresh shapes-world questions to draw "
                                            "(default 400)"),
    held_out: float = typer.Option(0.2, help="share of the pairs held out for scoring"),
    max_new_tokens: int = typer.Option(8, min=1),
    steps: int = typer.Option(300, min=1),
    max_positions: int = typer.Option(16384, min=1, help="training positions kept (a uniform sample): memory stays flat"),
    lr: float = typer.Option(5e-3),
) -> None:
    """Train a tuned lens on the model's own generations; print held-out KL per layer, logit vs tuned."""
    from rich.console import Console
    from rich.table import Table

    from vlm_lens.experiments.analysis import tuned_lens as T

    if not 0.0 < held_out < 1.0:
        fail(f"--held-out must be a share in (0, 1), got {held_out}")
    if not (lr > 0 and lr != float("inf")):
        fail(f"--lr must be a positive learning rate, got {lr}")
    if manifest is not None and image:
        fail("give either --manifest or --image, not both")
    if questions is not None and (manifest is not None or image):
        fail("--questions draws shapes-world questions; with --manifest or --image the pairs are yours: drop --questions")
    if prompt is not None and not image:
        fail("--prompt is the question asked of every --image: add --image FILE_OR_DIR (a manifest has its own questions)")
    check_output(out, "--out")
    paths = image_paths(image)
    vlm = load_model(model)
    if manifest is not None:
        from vlm_lens.experiments.runs.manifest import read_manifest

        try:
            samples = read_manifest(manifest)
        except (FileNotFoundError, ValueError) as error:
            fail(str(error))
    elif paths:
        samples = samples_for(vlm, paths, prompt)
        say_what_is_asked(Console(), vlm, True, False, prompt, len(samples))
    elif "shapes" in vlm.name:
        samples = T.shapes_questions(questions or 400)
    else:
        fail("tune-lens needs training data: --manifest FILE, or --image DIR --prompt TEXT")
    console = Console()
    try:
        result = T.train(vlm, samples, held_out=held_out, max_new_tokens=max_new_tokens, steps=steps, lr=lr,
                         max_positions=max_positions,
                         progress=lambda message: console.print(f"[dim]{message}"))  # fmt: skip
    except ValueError as error:
        fail(str(error))
    result["lens"].save(out)
    table = Table(title=f"held-out KL(final || lens) per layer · {vlm.name} · {result['held_out_pairs']} pairs")
    for col in ("layer", "logit lens", "tuned lens"):
        table.add_column(col)
    for layer, (a, b) in enumerate(zip(result["kl_logit"], result["kl_tuned"])):
        table.add_row(str(layer), f"{a:.4f}", f"{b:.4f}")
    console.print(table)
    console.print(f"tuned lens: training KL {result['loss_first']:.4f} -> {result['loss_last']:.4f} over {steps} steps "
                  f"on {result['train_pairs']} pairs; saved to {out}")  # fmt: skip


def validate(
    planted: str = typer.Option("shapes-llava-prior", help="a model made by `vlm-lens zoo plant` (name or folder)"),
    base: str = typer.Option("shapes-llava", help="its clean twin"),
    n: int = typer.Option(30, min=1, help="counter-prior and clean questions each"),
    variant: Variant = typer.Option(Variant.correct, help="the lens (tuned: each model's shipped tuned lens)"),
    out: Optional[Path] = typer.Option(None, help="write the figures as JSON here"),
    suite: bool = typer.Option(False, "--suite", help="score the planted-fixture suite (every fixture, dev and test "
                               "split, leave-one-base-out) instead of one planted model"),
    split: Optional[str] = typer.Option(None, help="with --suite: only this split (dev | test)"),
    fixture: Optional[List[str]] = typer.Option(None, help="with --suite: only these fixtures (repeatable)"),
    suite_dir: Optional[Path] = typer.Option(None, help="with --suite: a folder built by `vlm-lens zoo plant --suite` "
                                             "(default: the fixtures shipped in the package)"),
) -> None:
    """Score mutation detection against a planted prior: recall in the block, false alarms on the clean twin, skips."""
    from rich.console import Console

    from vlm_lens.experiments.analysis import validation

    variant_name = variant.value
    check_output(out, "--out", folder=False)
    if suite or split or fixture or suite_dir:
        if not suite:
            fail("--split, --fixture and --suite-dir choose what --suite scores: add --suite")
        _validate_suite(n, variant_name, out, split, fixture, suite_dir)
        return
    planted_model, base_model = load_model(planted), load_model(base)
    tuned = tuned_lens_from(planted_model, None) if variant_name == "tuned" else None
    base_tuned = tuned_lens_from(base_model, None) if variant_name == "tuned" else None
    try:
        report = validation.validate(planted_model, base_model, n=n, variant=variant_name, tuned_lens=tuned,
                                     base_tuned_lens=base_tuned)  # fmt: skip
    except ValueError as error:
        fail(str(error))
    skip = report["skip"] or {}
    lines = [
        f"{report['planted_model']} ({variant_name} lens): trigger {report['trigger']}, block decoder layers "
        f"{report['block_decoder_layers']} (stack {report['block_stack_layers']})",
        f"hallucinated {report['hallucinated']}/{report['counter_prior_questions']} counter-prior questions; "
        f"event in the block {fmt(report['recall_in_block'])}, leader = true answer {fmt(report['leader_is_true_answer'])}, "
        f"event layers {sorted(set(report['event_layers']))}",
        f"false alarms: base clean {fmt(report['false_alarms_base_clean'])} ({report['base_clean_questions']} questions), "
        f"base counter-prior {fmt(report['false_alarms_base_counter_prior'])}, planted untriggered "
        f"{fmt(report['false_alarms_planted_untriggered'])}",
    ]  # fmt: skip
    for name, row in skip.items():
        lines.append(f"{name} skips decoder layers {row['skipped_layers']}: restored {fmt(row['restored_true_answer'])}, "
                     f"changed {fmt(row['changed_answer'])}")  # fmt: skip
    Console().print("\n".join(lines))
    if out:
        from vlm_lens.atomic import write_file as atomic_write

        atomic_write(out, json.dumps(report, indent=1, default=str))


def _validate_suite(n: int, variant: str, out: Optional[Path], split: Optional[str], names: Optional[List[str]],
                    suite_dir: Optional[Path]) -> None:  # fmt: skip
    from vlm_lens.experiments.analysis import suite_validation as sv
    from vlm_lens.zoo import suite

    if variant == "tuned":
        fail("--suite scores the logit lens (correct or paper): the fixtures ship no tuned lenses")
    if split is not None and split not in suite.SPLIT:
        fail(f"--split must be one of {sorted(suite.SPLIT)}, got {split!r}")
    chosen = [f.name for f in suite.fixtures(split, scored=True)]
    for name in names or []:
        suite.fixture(name)  # unknown names: one clear line, exit 2
    chosen = [x for x in chosen if not names or x in names]
    if not chosen:
        fail(f"no fixture is both in --split {split} and among --fixture {names}")
    for name in chosen:
        suite.fixture_source(name, suite_dir)  # every fixture present before anything runs
    typer.echo(f"scoring {len(chosen)} fixtures, {n} counter-prior and {n} clean questions each ({variant} lens)")
    report = sv.validate_suite(sv.suite_loader(suite_dir), chosen, n, variant=variant,
                               progress=lambda done, total, name: typer.echo(f"  {done}/{total} {name}"))  # fmt: skip
    typer.echo("\n".join(sv.table_lines(report)))
    if out:
        from vlm_lens.atomic import write_file as atomic_write

        atomic_write(out, json.dumps(report, indent=1, default=str))
