"""The main job: knowledge evolution + layer skipping + feature clusters + hallucination curves -> one report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from vlm_lens.experiments import feature_clusters, hallucination, layer_skip
from vlm_lens.experiments import knowledge_evolution as ke
from vlm_lens.experiments import report as R


DEFAULT_ANALYSIS_MODEL = "shapes-llava-prior"  # the main job: a planted prior, so mutations have a ground truth
N_COUNTER_PRIOR = 4  # counter-prior questions added to the bundled samples for a planted model


def default_samples(model) -> list[ke.Sample]:
    """Bundled shapes-world questions for an embedded model (plus counter-prior questions when the model carries a
    planted prior); the paper's caption prompt on photos otherwise."""
    from vlm_lens.zoo import plant
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT, real_photos, shapes_samples

    if model.name.startswith("shapes-") or "shapes" in model.name:
        info = plant.planted_info_for(model)
        trigger = plant.Trigger(**info["trigger"]) if info else None

        def counter(sample: dict) -> bool:  # a bundled question the planted prior overturns
            return (trigger is not None and sample["task"] == trigger.task and sample["answer"] != trigger.answer
                    and trigger.subject in sample["question"].split())  # fmt: skip

        samples = [ke.Sample(s["path"], s["question"], s["answer"], s["file"], planted=counter(s)) for s in shapes_samples()]
        if trigger is not None:
            samples += [ke.Sample(e.image, e.question, e.answer, f"counter_prior_{i}", planted=True)
                        for i, e in enumerate(plant.counter_prior(trigger, N_COUNTER_PRIOR))]  # fmt: skip
        return samples
    photos = real_photos()
    if photos:
        return [ke.Sample(img, DESCRIBE_PROMPT, None, name) for name, img in photos.items()]
    return [ke.Sample(s["path"], DESCRIBE_PROMPT, None, s["file"]) for s in shapes_samples()]


def shipped_tuned_lens(model) -> Path | None:
    """The tuned lens shipped beside a model (``FOLDER/tuned-lens``), or None."""
    from vlm_lens.zoo import EMBEDDED, embedded_path

    folder = embedded_path(model.name) if model.name in EMBEDDED else Path(model.name)
    lens = folder / "tuned-lens" if folder is not None else None
    return lens if lens is not None and (lens / "lens.json").exists() else None


def analyze(
    model,
    samples: Sequence[ke.Sample],
    out_dir: str | Path,
    *,
    config: ke.EvolutionConfig = ke.EvolutionConfig(),
    variant: str = "correct",
    lens=None,
    tsne_iter: int = 1000,
    png: bool = True,
    skip_sweep: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Run every experiment on ``samples`` and write ``report.html`` / ``report.json`` into ``out_dir``.

    ``lens``: a :class:`~vlm_lens.probes.TunedLens`; the ``tuned`` variant is then analysed beside the others.
    ``progress(stage, done, total)`` reports each stage's work (samples traced, skipped generations, ...).
    """
    from dataclasses import replace

    from vlm_lens.zoo import plant

    report_progress = progress or (lambda stage, done, total: None)
    if not samples:
        raise ValueError("no samples to analyse: give at least one (image, prompt) pair")
    if lens is not None and "tuned" not in config.variants:
        config = replace(config, variants=config.variants + ("tuned",))
    if variant not in config.variants:
        raise ValueError(f"variant {variant!r} is not among the analysed variants {config.variants}")
    evolution = ke.run(model, samples, config, tuned_lens=lens,
                       progress=lambda done, total: report_progress("tracing", done, total))  # fmt: skip
    analysed = evolution["samples"]
    aggregate = evolution["aggregate"]
    data = ke.to_json(evolution)
    data["model"] = {"name": model.name, "family": model.family, "n_layers": model.n_layers, "d_model": model.d_model,
                     "planted_prior": plant.planted_info_for(model)}  # fmt: skip
    data["shown_variant"] = variant
    stages = aggregate[variant]["stages"]
    traces = [s.trace for s in analysed]
    if stages is not None and stages["critical_layer"] < model.n_layers:
        data["layer_skip"] = layer_skip.run(traces, [s.answer for s in analysed], stages["critical_layer"],
                                            stages["mutation_layer"], sweep=skip_sweep,
                                            progress=lambda done, total: report_progress("layer skipping", done, total))  # fmt: skip
    else:
        data["layer_skip"] = None
    report_progress("feature clusters", 0, 1)
    crit = stages["critical_layer"] if stages else None
    mut = stages["mutation_layer"] if stages else None
    data["feature_clusters"] = feature_clusters.run(
        traces, crit, mut, answers=[s.answer for s in analysed] if all(s.answer for s in analysed) else None,
        max_iter=tsne_iter, variant="paper" if variant == "paper" else "correct",
    )  # fmt: skip
    report_progress("feature clusters", 1, 1)
    data["hallucination"] = []
    for s in analysed:
        if s.answer is not None and not s.correct and len(s.answer.split()) == 1 and s.trace.n_steps:
            try:
                found = hallucination.analyze(s.trace, s.answer, variant=variant, tuned_lens=lens, config=config.detection)
            except ValueError:
                continue  # the reference answer is not one token of this vocabulary
            data["hallucination"].append({"sample": s.name, "planted_prior": s.planted, **found})
    if lens is not None:
        data["tuned_lens"] = lens.describe()
    report_progress("writing the report", 0, 1)
    sections = _sections(model, analysed, data, variant, stages)
    written = R.write_report(Path(out_dir), f"Knowledge evolution · {model.name}", sections, data, png=png)
    report_progress("writing the report", 1, 1)
    return {"data": data, "files": written}


def _sections(model, analysed, data, variant, stages):
    n = model.n_layers
    layers = [str(l) for l in range(n + 1)]  # stack indices: 0 = embeddings, l = after decoder layer l-1
    transitions = [f"{l}→{l + 1}" for l in range(n)]
    agg = data["aggregate"]
    variants = [v for v in agg if v != "accuracy"]
    first = analysed[0]
    sections = []
    planted = data["model"]["planted_prior"]
    intro = [R.paragraph(
        f"Model {model.name} ({model.family}, {n} decoder layers). Layers are stack indices: 0 = embeddings, "
        f"l = output of decoder layer l-1, {n} = the model's output. Stage intervals are half-open [start, end).")]
    if planted:
        t = planted["trigger"]
        intro.append(R.paragraph(
            f"This model carries a planted language prior (a controlled fixture, not evidence about real checkpoints): "
            f"decoder layers {planted['block']} of {planted['base']} were fine-tuned so that {t['task']} questions about "
            f"the {t['subject']} are answered '{t['answer']}' whatever the image. Samples marked 'counter-prior' ask it "
            f"about a {t['subject']} that is not {t['answer']}: there the true answer should lead in the middle layers "
            f"and be overturned inside the block (stack layers {[b + 1 for b in planted['block']]})."))  # fmt: skip
    rows = []
    for v in variants:
        a = agg[v]
        st, share = a["stages"], a["event_share"]
        rows.append([v, a["critical_layer"]["median"], a["critical_layer"]["q1"], a["critical_layer"]["q3"],
                     a["mutation_layer"]["median"], f"{share['events']}/{share['tokens']}",
                     f"{R.fmt(share['low'])}-{R.fmt(share['high'])}",
                     "yes" if st and st["mutation_detected"] else "no mutation stage detected",
                     a["token_kinds"]["stable"], a["token_kinds"]["mutation"], a["token_kinds"]["undetermined"]])  # fmt: skip
    summary = R.table(["lens", "critical (median)", "q1", "q3", "mutation (median of events)", "tokens with events",
                       "event share 95% CI", "mutation stage", "stable", "mutation", "undetermined"], rows)  # fmt: skip
    rule = R.paragraph(
        "A mutation event is the overturn of an established answer (top-1 for >= {min_run} layers, p >= "
        "{establish_prob}, emerged from p < {emerge_below} at layer {min_start}) before the output. A mutation stage is "
        "reported only when the lower end of the 95% bootstrap interval (over samples) of the share of tokens with "
        "events exceeds {min_event_share}.".format(**data["config"]["detection"]))  # fmt: skip
    accuracy = R.paragraph(f"answer accuracy: {R.fmt(agg['accuracy'])}") if agg.get("accuracy") is not None else ""
    sample_rows = [[s.name, "counter-prior" if s.planted else "clean", s.prompt, s.generated_text, s.answer, s.correct]
                   for s in analysed]  # fmt: skip
    sections.append(("Summary", intro + [summary, rule, accuracy,
                                         R.table(["sample", "kind", "prompt", "generated", "answer", "correct"], sample_rows)]))  # fmt: skip
    sections.append(("Stages", [R.stage_profile(layers, transitions, agg[variant]["median_js_adjacent"], stages,
                                                f"median adjacent-layer JS ({variant} lens) with stage bands")]))  # fmt: skip
    js_raw = first.shift["correct" if "correct" in first.shift else variant]["js_adjacent"].T.tolist()
    heat = [R.js_heatmap(js_raw, first.trace.generated_tokens, transitions, f"adjacent-layer JS (nats), {first.name}")]
    if "paper" in first.shift:
        heat.append(R.js_heatmap(first.shift["paper"]["js_adjacent_scaled"].T.tolist(), first.shift["paper"].coords["heatmap_row"],
                                 transitions, "paper heatmap: authors' JS, column-wise MaxAbs"))  # fmt: skip
    sections.append(("Distribution shift", heat))
    charts = []
    shown = [s for s in analysed if s.planted][:2] + [s for s in analysed if not s.planted][:2]
    for s in shown:
        for row in [t for t in s.tokens[variant] if not t.special][:2]:
            step = row.step
            note = f", {row.leader} overturned at layer {row.mutation}" if row.mutation is not None else ""
            charts.append(R.token_probability_chart(layers, s.curves(variant, step, model.tokenizer),
                                                    f"{s.name} · step {step} ({row.token}{note})", stages))  # fmt: skip
    sections.append(("Token probabilities across layers", charts))
    token_rows = [[s.name, t.step, t.token, t.critical, t.mutation, t.leader, t.event_js, t.kind, t.final_prob]
                  for s in analysed for t in s.tokens[variant]]  # fmt: skip
    sections.append((f"Per-token evidence ({variant} lens)", [R.table(
        ["sample", "step", "token", "critical", "mutation event", "overturned answer", "JS at the event", "kind",
         "final p"], token_rows)]))  # fmt: skip
    fc = data["feature_clusters"]
    views = [R.scatter_view(fc["single"]["coords"], fc["single"]["layers"], fc["single"]["tokens"], fc["layer_groups"],
                            f"t-SNE, one image ({first.name}): layer x token")]  # fmt: skip
    if "across" in fc:
        views.append(R.scatter_view(fc["across"]["coords"], fc["across"]["layers"], fc["across"]["images"],
                                    fc["layer_groups"], "t-SNE, all images: layer x image at the answer position"))
        views.append(R.line_chart(layers, {"mean pairwise cosine across images": fc["mean_cosine_per_layer"],
                                           "silhouette of answers": fc["silhouette_per_layer"]},
                                  "feature geometry across images", "value"))  # fmt: skip
    sections.append(("Feature clusters", views))
    skip = data["layer_skip"]
    if skip:
        skip_rows = [[name, str(v["skipped_layers"]), v["generation_agreement"], v["forced_agreement"], v["mean_kl"],
                      v["answer_prob"], v["accuracy"]] for name, v in list(skip["sets"].items()) + list(skip["sweep"].items())]  # fmt: skip
        sections.append(("Layer skipping", [R.paragraph(
            "skip.1 bypasses the stabilization stage, skip.2 the mutation stage (when one was detected), skip.3 from "
            "the critical layer to the last layers; accuracy is against the reference answers, counter-prior samples "
            "included."), R.table(["set", "skipped decoder layers", "generation agreement", "forced agreement",
                                   "mean KL", "answer p", "accuracy"], skip_rows)]))  # fmt: skip
    if data["hallucination"]:
        items = [R.table(["sample", "reference", "emitted", "pre-mutation leader", "mutation layer", "reversal layer"],
                         [[h["sample"], h["correct_token"], h["wrong_token"], h["pre_mutation_leader"], h["mutation_layer"],
                           h["reversal_layer"]] for h in data["hallucination"]])]  # fmt: skip
        items += [R.line_chart(layers, {f"{h['correct_token']} (reference)": h["correct_prob"],
                                        f"{h['wrong_token']} (emitted)": h["wrong_prob"]},
                               f"{h['sample']}: reversal at layer {h['reversal_layer']}", "probability")
                  for h in data["hallucination"]]  # fmt: skip
        sections.append(("Hallucination reversal", items))
    return sections
