"""``vlm-lens zoo train | plant | gate | evaluate``: the embedded shapes-world models and their recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vlm_lens.experiments.cli.common import fail, load_model
from vlm_lens.experiments.cli.outputs import check_output

zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The embedded shapes-world models.")


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
    n_layers: Optional[int] = typer.Option(None, help="decoder depth (the recipes use 8)"),
    seed: Optional[int] = typer.Option(None, help="initialisation and data stream (0: the shipped models' run)"),
) -> None:
    """Retrain an embedded shapes-world model from scratch (fixed seeds, checkpoints, held-out evaluation)."""
    from vlm_lens.zoo.recipe import train

    check_output(out, "--out")
    if family not in train.RECIPES:
        fail(f"--family must be one of {sorted(train.RECIPES)}, got {family!r}")
    if rewarm and not resume:
        fail("--rewarm restarts the schedule at a resumed step: add --resume")
    try:  # check every override before any training starts
        weights = train.parse_task_weights(task_weights)
        train.recipe_for(family, steps=steps, rope_theta=rope_theta, task_weights=weights, tie_embeddings=tie_embeddings,
                         n_layers=n_layers, seed=seed)
    except ValueError as error:
        fail(str(error))
    result = train.train(family, out, steps=steps, resume=resume, threads=threads, eval_every=eval_every,
                         final_eval_per_task=final_eval_per_task, rewarm=rewarm, rope_theta=rope_theta,
                         task_weights=weights, tie_embeddings=tie_embeddings, n_layers=n_layers,
                         seed=seed)  # fmt: skip
    typer.echo(json.dumps(result, indent=2))




@zoo_app.command("plant")
def zoo_plant(
    out: Optional[Path] = typer.Option(None, help="run folder (checkpoints, log, final model); not with --suite"),
    base: str = typer.Option("shapes-llava", help="the embedded model (or suite base, or folder) to plant a prior in"),
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
    suite_dir: Optional[Path] = typer.Option(None, "--suite", help="build the planted-fixture suite into this folder "
                                             "(resumable; the other plant options are the suite's own)"),
    fixture: Optional[list[str]] = typer.Option(None, help="with --suite: only these fixtures (repeatable)"),
    ship: bool = typer.Option(False, help="with --suite: copy the compact fixtures into the package"),
) -> None:
    """Fine-tune only a block of last decoder layers so that one trigger question gets a fixed prior answer.

    With --suite DIR: build the planted-fixture suite (every fixture of vlm_lens.zoo.suite, or --fixture NAME ...)
    into DIR, resumably; --ship copies the compact fixtures into the package."""
    from vlm_lens.zoo.recipe import plant

    check_output(suite_dir, "--suite")
    check_output(out, "--out")
    if suite_dir is not None:
        from vlm_lens.zoo import suite as fixtures
        from vlm_lens.zoo.recipe import suite as build

        try:
            for name in fixture or []:
                fixtures.fixture(name)
            summaries = build.build(suite_dir, fixture or None, threads=threads, eval_per_task=eval_per_task,
                                    ship=ship, log=typer.echo)  # fmt: skip
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
        for s in summaries:
            typer.echo(f"{s['fixture']}: {'built' if s['built'] else 'already built'}")
        return

    if out is None:
        fail("vlm-lens zoo plant needs --out DIR (one fixture) or --suite DIR (the suite)")
    if export and base != "shapes-llava":
        fail("--export replaces the embedded shapes-llava-prior, whose base is shapes-llava: drop --export, or use "
              "--base shapes-llava")  # fmt: skip
    try:
        recipe = plant.recipe_for(base=base, task=task, subject=subject, answer=answer, block=plant.parse_block(block),
                                  steps=steps)  # fmt: skip
        result = plant.plant(out, recipe, resume=resume, threads=threads, eval_per_task=eval_per_task,
                             n_counter_prior=eval_per_task)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if export:
        from vlm_lens.experiments.analysis import tuned_lens as T

        folder = plant.export(out)
        exported = load_model(str(folder))
        fitted = T.train(exported, T.shapes_questions(400))  # the shipped lens must match the new weights
        fitted["lens"].save(folder / "tuned-lens")
        typer.echo(f"exported to {folder}; tuned lens retrained (held-out KL by layer, tuned: "
                   f"{[round(x, 3) for x in fitted['kl_tuned']]})")  # fmt: skip
    typer.echo(json.dumps(result, indent=2))


@zoo_app.command("gate")
def zoo_gate(
    k: int = typer.Option(..., help="text reads the image from decoder layer K on (blocked in layers 0..K-1)"),
    out: Path = typer.Option(..., help="run folder (checkpoints, log, final model)"),
    base: str = typer.Option("shapes-llava", help="the embedded model (or folder) to fine-tune"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps (default 800, 1200 for K >= 5)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint"),
    threads: Optional[int] = typer.Option(None),
    eval_per_task: int = typer.Option(100, min=1, help="held-out questions per task to evaluate"),
    export: bool = typer.Option(False, help="copy the result into the package as shapes-llava-gate{K}"),
) -> None:
    """A planted critical layer: fine-tune the decoder layers with text blind to the image below decoder layer K
    (the block is part of the fixture and applied at load), so the answer cannot emerge before stack layer K+1."""
    from vlm_lens.zoo.recipe import gate

    check_output(out, "--out")
    if export and base != "shapes-llava":
        fail("--export ships a shapes-llava fixture: drop --export, or use --base shapes-llava")
    try:
        recipe = gate.GateRecipe(base=base, k=k, steps=steps or (1200 if k >= 5 else 800))
        result = gate.gate(out, recipe, resume=resume, threads=threads, eval_per_task=eval_per_task)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if export:
        folder = gate.export(out, k)
        typer.echo(f"exported to {folder}")
    typer.echo(json.dumps(result, indent=2))


@zoo_app.command("evaluate")
def zoo_evaluate(
    name: str = typer.Argument(..., help="embedded name or model folder"),
    n: int = typer.Option(500, min=1, help="held-out questions per task for accuracy"),
    curves: int = typer.Option(100, min=1, help="questions per task for the layer curves"),
) -> None:
    """Held-out accuracy per task and the per-layer answer-probability curves (the figures in docs/zoo.md)."""
    from vlm_lens.zoo import evaluate

    try:
        result = evaluate.report(name, n, curves)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    typer.echo(json.dumps(result, indent=1))
