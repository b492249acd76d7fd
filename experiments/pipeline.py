"""The main job: knowledge evolution + layer skipping + feature clusters + hallucination curves -> one report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from experiments import feature_clusters, hallucination, layer_skip
from experiments import knowledge_evolution as ke
from experiments import report as R
from probes import TokenTrajectory
from probes.base import layer_labels, transition_labels


def default_samples(model) -> list[ke.Sample]:
    """Bundled shapes-world questions for an embedded model; the paper's caption prompt on photos otherwise."""
    from vlm_lens.zoo.samples import DESCRIBE_PROMPT, real_photos, shapes_samples

    if model.name.startswith("shapes-") or "shapes" in model.name:
        return [ke.Sample(s["path"], s["question"], s["answer"], s["file"]) for s in shapes_samples()]
    photos = real_photos()
    if photos:
        return [ke.Sample(img, DESCRIBE_PROMPT, None, name) for name, img in photos.items()]
    return [ke.Sample(s["path"], DESCRIBE_PROMPT, None, s["file"]) for s in shapes_samples()]


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
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every experiment on ``samples`` and write ``report.html`` / ``report.json`` into ``out_dir``."""
    say = progress or (lambda message: None)
    if variant not in config.variants:
        raise ValueError(f"variant {variant!r} is not among the analysed variants {config.variants}")
    say("tracing and segmenting")
    evolution = ke.run(model, samples, config)
    analysed = evolution["samples"]
    aggregate = evolution["aggregate"]
    data = ke.to_json(evolution)
    data["model"] = {"name": model.name, "family": model.family, "n_layers": model.n_layers, "d_model": model.d_model}
    data["shown_variant"] = variant
    stages = aggregate[variant]["stages"]
    traces = [s.trace for s in analysed]
    if stages is not None:
        say("layer skipping")
        data["layer_skip"] = layer_skip.run(traces, [s.answer for s in analysed], stages["critical_layer"],
                                            stages["mutation_layer"], sweep=skip_sweep)  # fmt: skip
    else:
        data["layer_skip"] = None
    say("feature clusters")
    crit = stages["critical_layer"] if stages else None
    mut = stages["mutation_layer"] if stages else None
    data["feature_clusters"] = feature_clusters.run(
        traces, crit, mut, answers=[s.answer for s in analysed] if all(s.answer for s in analysed) else None,
        max_iter=tsne_iter,
    )  # fmt: skip
    data["hallucination"] = []
    for s in analysed:
        if s.answer is not None and not s.correct and len(s.answer.split()) == 1 and s.trace.n_steps:
            try:
                data["hallucination"].append({"sample": s.name, **hallucination.analyze(s.trace, s.answer, variant=variant)})
            except ValueError:
                pass  # the reference answer is not one token of this vocabulary
    if lens is not None:
        data["tuned_lens"] = lens.describe()
    say("writing the report")
    sections = _sections(model, analysed, data, variant, stages)
    written = R.write_report(Path(out_dir), f"Knowledge evolution · {model.name}", sections, data, png=png)
    return {"data": data, "files": written}


def _sections(model, analysed, data, variant, stages):
    n = model.n_layers
    layers = layer_labels(n)
    transitions = transition_labels(layers)
    agg = data["aggregate"]
    first = analysed[0]
    sections = []
    rows = []
    for v in agg:
        if v == "accuracy":
            continue
        a = agg[v]
        rows.append([v, a["critical_layer"]["median"], a["critical_layer"]["q1"], a["critical_layer"]["q3"],
                     a["mutation_layer"]["median"], a["token_kinds"]["stable"], a["token_kinds"]["mutation"],
                     a["token_kinds"]["undetermined"]])  # fmt: skip
    summary = R._table(["lens", "critical (median)", "q1", "q3", "mutation (median)", "stable tokens",
                        "mutation tokens", "undetermined"], rows)  # fmt: skip
    accuracy = f"<p>answer accuracy: {R._fmt(agg['accuracy'])}</p>" if agg.get("accuracy") is not None else ""
    sample_rows = [[s.name, s.prompt, s.generated_text, s.answer, s.correct] for s in analysed]
    sections.append(("Summary", [summary, accuracy, R._table(["sample", "prompt", "generated", "answer", "correct"], sample_rows)]))
    sections.append(("Stages", [R.stage_profile(layers, transitions, agg[variant]["median_js_adjacent"], stages,
                                                f"median adjacent-layer JS ({variant} lens) with stage bands")]))  # fmt: skip
    js_raw = first.shift["correct" if "correct" in first.shift else variant]["js_adjacent"].T.tolist()
    heat = [R.js_heatmap(js_raw, first.trace.generated_tokens, transitions, f"adjacent-layer JS (nats), {first.name}")]
    if "paper" in first.shift:
        heat.append(R.js_heatmap(first.shift["paper"]["js_adjacent_scaled"].T.tolist(), first.trace.generated_tokens,
                                 transitions, "paper heatmap: authors' JS, column-wise MaxAbs"))  # fmt: skip
    sections.append(("Distribution shift", heat))
    charts = []
    for s in analysed[:3]:
        traj = TokenTrajectory.from_lens_result(s.lens[variant])
        for step in range(min(3, s.trace.n_steps)):
            ids = [i for i in traj["target_ids"][step].tolist() if i >= 0]
            curves = {model.tokenizer.convert_ids_to_tokens(i): traj["prob"][:, step, slot].tolist()
                      for slot, i in enumerate(ids)}  # fmt: skip
            charts.append(R.token_probability_chart(layers, curves, f"{s.name} · step {step} ({s.trace.generated_tokens[step]})", stages))
    sections.append(("Token probabilities across layers", charts))
    token_rows = [[s.name, t.step, t.token, t.critical, t.mutation, t.last_flip, t.kind, t.final_prob]
                  for s in analysed for t in s.tokens[variant]]  # fmt: skip
    sections.append((f"Per-token layers ({variant} lens)", [R._table(
        ["sample", "step", "token", "critical", "mutation", "last top-1 flip", "kind", "final p"], token_rows)]))
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
        sections.append(("Layer skipping", [R._table(["set", "skipped decoder layers", "generation agreement",
                                                       "forced agreement", "mean KL", "answer p", "accuracy"], skip_rows)]))  # fmt: skip
    if data["hallucination"]:
        curves = [R.line_chart(layers, {f"{h['correct_token']} (reference)": h["correct_prob"],
                                        f"{h['wrong_token']} (emitted)": h["wrong_prob"]},
                               f"{h['sample']}: reversal at layer {h['reversal_layer']}", "probability")
                  for h in data["hallucination"]]  # fmt: skip
        sections.append(("Hallucination reversal", curves))
    return sections
