"""The report's sections, drawn from analysed samples (live :class:`SampleEvolution` or
:class:`~vlm_lens.experiments.runs.reduce.StoredSample` read back from a store) and the report data."""

from __future__ import annotations

from vlm_lens.experiments.report import charts as C
from vlm_lens.experiments.report import page as R

MIN_HEATMAP_ROWS = 4  # the authors' column-wise MaxAbs heatmap over fewer rows paints each column's maximum solid


def sections(model, analysed, data, variant, stages, show_special: bool = False):
    n = model.n_layers
    layers = [str(l) for l in range(n + 1)]  # stack indices: 0 = embeddings, l = after decoder layer l-1
    transitions = [f"{l}→{l + 1}" for l in range(n)]
    agg = data["aggregate"]
    variants = [v for v in agg if v != "accuracy"]
    first = analysed[0]
    planted = data["model"]["planted_prior"]
    sections = [("Summary", summary(model, analysed, data, variants, planted))]

    cards = [R.image_card(s.image, [("sample", s.name), ("kind", "counter-prior" if s.planted else "clean"),
                                    ("question", s.question or s.prompt),
                                    ("generated", s.generated_text), ("reference", s.answer), ("correct", s.correct)])
             for s in analysed[:24] if s.image is not None]  # fmt: skip
    sections.append(("Samples", [R.paragraph("The input images and questions, with what the model generated. "
                                             "Counter-prior samples ask the planted trigger question about an image "
                                             "whose true answer is not the prior word." if planted else
                                             "The input images and questions, with what the model generated."),
                                 "<div class='cards'>" + "".join(cards) + "</div>"]))  # fmt: skip

    crit = agg[variant]["critical_layer"]
    sections.append(("Stages", [
        R.paragraph(f"The median over tokens of the JS divergence between adjacent layers ({variant} lens), plotted at "
                    "the layer each transition leads into, with the stages from the evidence: rapid evolution up to the "
                    "critical layer, stabilization, and a mutation stage only when mutation events are frequent enough "
                    "(see Summary). The dashed box spans the critical layers' interquartile range."),
        R.named(C.stage_profile(layers, transitions, agg[variant]["median_js_adjacent"], stages,
                                f"median adjacent-layer JS ({variant} lens) with stage bands", spread=crit,
                                marker_label={"critical_layer": f"median over {crit['n']} tokens",
                                              "mutation_layer": f"median over {agg[variant]['mutation_layer']['n']} events"}),
                "stages_median_js"),
    ]))  # fmt: skip

    clean = sorted((s for s in analysed if not s.planted), key=lambda s: -s.trace.n_steps)  # longest answers first
    shown = [s for s in analysed if s.planted][:2] + clean[:2]
    chosen = (f"Shown: {len(shown)} of {len(analysed)} samples, " + ("the first two counter-prior samples and " if planted
              else "") + "the clean samples with the longest answers (most generated tokens); every sample's evidence "
              "is in the per-token table below and in report.json.")  # fmt: skip
    views = [R.paragraph("Per sample: the probability the lens gives each generated token at every layer (where the "
                         "answer appears), with that token's own critical layer (diamond) and mutation layer (cross, "
                         "only on a token with a confirmed event), and the lens's own top-1 token at every layer, "
                         "coloured by its probability (hover for the top 5)." + ("" if show_special else " Special "
                         "tokens are left out. ") + chosen)]  # fmt: skip
    for s in shown:
        steps = [t.step for t in s.tokens[variant] if show_special or not t.special]
        if not steps:
            continue
        tokens = [s.trace.generated_tokens[j] for j in steps]
        lens = s.lens[variant]
        rows = {t.step: t for t in s.tokens[variant]}
        views.append(R.named(C.prob_heatmap(lens["prob"][:, steps].T.tolist(), tokens,
                                            f"{s.name}: P(generated token) by layer ({variant} lens)",
                                            [(rows[j].critical, rows[j].mutation) for j in steps]),
                             f"p_by_layer_{s.name}"))  # fmt: skip
        ids, probs = lens["topk_ids"][:, steps], lens["topk_prob"][:, steps]  # [layer, step, k]
        names = [[model.tokenizer.convert_ids_to_tokens(ids[:, j, :][l].tolist()) for l in range(n + 1)] for j in range(len(steps))]
        views.append(R.named(C.top1_grid(names, probs.permute(1, 0, 2).tolist(), tokens,
                                         f"{s.name}: the lens's top-1 token by layer"), f"top1_grid_{s.name}"))  # fmt: skip
    sections.append(("What each layer predicts", views))
    sections += where_in_the_image(analysed, variant, n)

    charts = [R.paragraph("The paper's token-probability view (its figures' per-token charts): the probability of "
                          "each candidate token (the distinct top-1 tokens of the late layers, plus an overturned "
                          "leader) across layers, over this token's own stages: rapid evolution up to its critical "
                          "layer, then stabilization, and a mutation band only where this token has a confirmed "
                          "mutation event. The first two tokens of the samples above. " + chosen)]  # fmt: skip
    for s in shown:
        for row in [t for t in s.tokens[variant] if show_special or not t.special][:2]:
            note = f", {row.leader} overturned at layer {row.mutation}" if row.mutation is not None else ""
            charts.append(R.named(C.token_probability_chart(layers, s.curves(variant, row.step, model.tokenizer),
                                                            f"{s.name} · step {row.step} ({row.token}{note})",
                                                            token_stages(row, n)),
                                  f"token_probs_{s.name}_step{row.step}"))  # fmt: skip
    sections.append(("Token probabilities across layers", charts))

    longest = max(analysed, key=lambda s: s.trace.n_steps)  # the most rows: a heatmap of one or two rows says little
    js_raw = longest.shift["correct" if "correct" in longest.shift else variant]["js_adjacent"].T.tolist()
    rows_scaled = len(_heatmap_rows(longest.shift["paper"])) if "paper" in longest.shift else 0
    heat = [R.paragraph(f"Adjacent-layer JS per generated token of {longest.name}, the sample with the most generated "
                        f"tokens ({longest.trace.n_steps}; every sample's is in report.json, js_adjacent): raw (nats, "
                        "correct lens), then the authors' heatmap (their reversed, vocabulary-averaged JS on the no-norm "
                        "lens, each column scaled to its maximum over the first 40 tokens)."
                        + ("" if rows_scaled >= MIN_HEATMAP_ROWS or "paper" not in longest.shift else
                           f" The authors' heatmap is left out: with {rows_scaled} rows its column scaling paints each "
                           "column's largest cell solid whatever its value; it needs "
                           f"{MIN_HEATMAP_ROWS} generated tokens or more.")),
            R.named(C.js_heatmap(js_raw, longest.trace.generated_tokens, transitions, f"adjacent-layer JS (nats), {longest.name}"),
                    f"js_heatmap_{longest.name}")]  # fmt: skip
    if "paper" in longest.shift and rows_scaled >= MIN_HEATMAP_ROWS:
        heat.append(R.named(C.js_heatmap(longest.shift["paper"]["js_adjacent_scaled"].T.tolist(),
                                         _heatmap_rows(longest.shift["paper"]), transitions,
                                         "paper heatmap: authors' JS, column-wise MaxAbs"), f"js_heatmap_paper_{longest.name}"))  # fmt: skip
    sections.append(("Distribution shift", heat))

    token_rows = [[s.name, t.step, t.token, t.critical, t.mutation, t.leader, _test(t), t.event_js, t.kind, t.final_prob]
                  for s in analysed for t in s.tokens[variant] if show_special or not t.special]  # fmt: skip
    sections.append((f"Per-token evidence ({variant} lens)", [R.paragraph(
        "Every generated token: its critical layer, its mutation event (a candidate overturn read off the lens that "
        "passed the causal test) and the test's outcome: with the image-swap test, for how many other pictures the "
        "layer that overturned the leader still wrote the emitted token; with the skip test, which decoder layers "
        "were skipped, what the model then emitted, and whether the leader needs the image."), R.table(
        ["sample", "step", "token", "critical", "mutation event", "overturned answer", "causal test", "JS at the event",
         "kind", "final p"], token_rows)]))  # fmt: skip

    fc = data["feature_clusters"]
    views = [R.paragraph("t-SNE of the residual stream (the paper's settings), coloured by stage, each point larger the "
                         "deeper its layer (hover for the layer): one image's tokens across layers, then all images at "
                         "the answer position; below, how similar the images' features are per layer and how well they "
                         "separate by answer."),
             R.named(C.scatter_view(fc["single"]["coords"], fc["single"]["layers"], fc["single"]["tokens"], fc["layer_groups"],
                                    f"t-SNE, one image ({first.name}): layer x token"), "tsne_one_image")]  # fmt: skip
    if "across" in fc:
        views.append(R.named(C.scatter_view(fc["across"]["coords"], fc["across"]["layers"], fc["across"]["images"],
                                            fc["layer_groups"], "t-SNE, all images: layer x image at the answer position"),
                             "tsne_all_images"))  # fmt: skip
        series = {"mean pairwise cosine across images": fc["mean_cosine_per_layer"]}
        if any(v is not None for v in fc["silhouette_per_layer"]):
            series["silhouette of answers"] = fc["silhouette_per_layer"]
        views.append(R.named(C.line_chart(layers, series, "feature geometry across images", "value"), "feature_geometry"))
    sections.append(("Feature clusters", views))

    skip = data["layer_skip"]
    if skip:
        skip_rows = [[name, str(v["skipped_layers"]), v["generation_agreement"], v["forced_agreement"], v["mean_kl"],
                      v["answer_prob"], v["accuracy"]] for name, v in list(skip["sets"].items()) + list(skip["sweep"].items())]  # fmt: skip
        sections.append(("Layer skipping", [
            R.paragraph("Decoder layers bypassed during the whole generation (the residual passes unchanged). skip.1: "
                        "the stabilization stage; skip.2: the mutation stage (only when one was detected); skip.3: from the "
                        "critical layer to the last layers; then every single layer. Accuracy is against the reference "
                        "answers, counter-prior samples included: skip.2 restoring them is the planted mutation undone."),
            R.named(C.skip_chart(skip["sets"], skip["sweep"], "layer skipping: accuracy and agreement with the unskipped run"),
                    "layer_skipping"),
            R.table(["set", "skipped decoder layers", "generation agreement", "forced agreement", "mean KL", "answer p",
                     "accuracy"], skip_rows)]))  # fmt: skip
    if data["hallucination"]:
        items = [R.paragraph("For every wrong single-token answer: the overturned answer (pre-mutation leader), the layer "
                             "where it lost the top-1, and the curves of the reference and the emitted token."),
                 R.table(["sample", "reference", "emitted", "pre-mutation leader", "mutation layer", "reversal layer"],
                         [[h["sample"], h["correct_token"], h["wrong_token"], h["pre_mutation_leader"], h["mutation_layer"],
                           h["reversal_layer"]] for h in data["hallucination"]])]  # fmt: skip
        items += [R.named(C.line_chart(layers, {f"{h['correct_token']} (reference)": h["correct_prob"],
                                                f"{h['wrong_token']} (emitted)": h["wrong_prob"]},
                                       f"{h['sample']}: reversal at layer {h['reversal_layer']}", "probability"),
                          f"reversal_{h['sample']}") for h in data["hallucination"]]  # fmt: skip
        sections.append(("Hallucination reversal", items))
    return sections


def summary(model, analysed, data, variants, planted) -> list:
    agg = data["aggregate"]
    intro = [R.paragraph(
        f"Model {model.name} ({model.family}, {model.n_layers} decoder layers). Layers are stack indices everywhere: "
        f"0 = embeddings, l = after decoder layer l-1, {model.n_layers} = the model's output. Stage intervals are "
        "half-open [start, end). Lenses: the correct lens reads every layer through the model's own final norm and "
        "unembedding; the paper lens is the authors' code (lm_head on the raw residual, without the final norm, and "
        "their JS); the tuned lens adds a learned per-layer translator before the unembedding.")]  # fmt: skip
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
        crit, mut = a["critical_layer"], a["mutation_layer"]
        rows.append([f"{v} lens", _layer(crit["median"]), _layer(crit["q1"]), _layer(crit["q3"]), _layer(mut["median"]),
                     f"{share['events']}/{share['tokens']}",
                     f"{R.fmt(share['low'])}-{R.fmt(share['high'])}",
                     "yes" if st and st["mutation_detected"] else "no mutation stage detected",
                     a["token_kinds"]["stable"], a["token_kinds"]["mutation"], a["token_kinds"]["undetermined"]])  # fmt: skip
    summary = R.table(["lens", "critical (median)", "q1", "q3", "mutation (median of events)", "tokens with events",
                       "event share 95% CI", "mutation stage", "stable", "mutation", "undetermined"], rows)  # fmt: skip
    rule = R.paragraph(
        _rule(data["config"]["detection"]))
    accuracy = R.paragraph(f"answer accuracy: {R.fmt(agg['accuracy'])}") if agg.get("accuracy") is not None else ""
    return intro + [summary, rule, accuracy]


def where_in_the_image(analysed, variant: str, n: int) -> list:
    """The answer's probability at every image token, over the input image, for a few layers (the critical one among
    them): what the model reads where, for the samples that kept a patch map."""
    mapped = [s for s in analysed if getattr(s, "patch_map", None)]
    if not mapped:
        return []
    views = [R.paragraph("Where in the image: the lens's probability of the first generated token at every image token "
                         "(one cell per token, drawn over the input image), at the first layer, the middle, the "
                         "token's own critical layer and the output. Kept for the first samples of a run (--patch-maps); "
                         f"shown: {len(mapped)}.")]  # fmt: skip
    for s in mapped:
        pm = s.patch_map
        critical = s.tokens[variant][pm["step"]].critical if s.tokens.get(variant) else None
        layers = sorted({1, n // 2, n} | ({critical} if critical is not None else set()))
        title = f"{s.name}: P({pm['token']}) on the image tokens" + (f", critical layer {critical}" if critical else "")
        views.append(R.named(C.patch_overlay(s.image, pm["prob"], layers, title), f"patch_map_{s.name}"))
    return [("Where in the image", views)]


def _layer(value: float | None) -> int | None:
    """A layer order statistic (an actual layer: ``lower`` interpolation) as the integer it is."""
    return None if value is None else int(value)


def _heatmap_rows(shift) -> list[str]:
    """The paper heatmap's row labels of a live DistributionShift result or a stored sample's shift view."""
    return shift.coords["heatmap_row"] if hasattr(shift, "coords") else shift["heatmap_row"]


def _test(t) -> str:
    """The causal test of a token's candidate, in words (empty without a candidate)."""
    if t.candidate is None:
        return ""
    if t.confirmed is None:
        return f"candidate {t.candidate_leader} at layer {t.candidate} (not tested)"
    if getattr(t, "swap_tried", None) is not None:  # the image-swap test
        kept = f"the layer that overturned it wrote {t.token} with {t.swap_kept} of {t.swap_tried} other pictures"
        before = getattr(t, "swap_kept_before", None)
        if before is not None and 2 * t.swap_kept <= t.swap_tried and before:
            kept += f" (the layer before it: {before} of {t.swap_tried})"
        held = getattr(t, "swap_held", None)
        if held is not None:
            rank = getattr(t, "leader_rank", None)
            kept += (f"; {t.candidate_leader} still led with {held} of {t.swap_tried} and is "
                     + ("not among the output's candidates" if rank is None else f"the output's #{rank + 1} candidate"))
        if t.confirmed:
            return f"confirmed: {kept}"
        return f"refuted: {t.candidate_leader} lost the top-1 at layer {t.candidate}; {kept}"
    skipped = f"skip decoder {t.confirm_skipped} -> {t.confirm_top1}"
    if t.confirmed:
        return f"confirmed: {skipped}; needs the image"
    if t.grounded is False:
        return f"refuted: {skipped}, but {t.candidate_leader} leads without the image too"
    return f"refuted: {skipped}, not {t.candidate_leader}"


def _rule(d: dict) -> str:
    """The detection rule in words, from the report's echoed DetectionConfig."""
    if d.get("confirm", False) and d.get("test", "skip") == "swap":
        floor = f", peaking at p >= {d['candidate_prob']}" if d["candidate_prob"] > 0 else ""
        deep = (f", replaced in the deep layers (from {d['deep_from']:.0%} of the depth on)" if d.get("deep_from")
                else ", then replaced")  # fmt: skip
        before = ", or the layer before it writes it for all of them" if d.get("swap_before") else ""
        event = (f"A mutation event is a candidate overturn read off the lens (the last answer that was the top-1 for >= "
                 f"{d['candidate_min_run']} layer(s) from layer {d['min_start']} on{floor}{deep} before the "
                 f"output) that passes a causal test: with the image replaced by each of {d['references']} other "
                 f"pictures of the run, the layer that overturned it still writes the emitted token for most of them{before} "
                 "(the overturn does not come from this image)" + _leader_rule(d) + ".")  # fmt: skip
    elif d.get("confirm", False):
        event = (f"A mutation event is a candidate overturn read off the lens (an answer that was the top-1 for >= "
                 f"{d['candidate_min_run']} layer(s) from layer {d['min_start']} on, peaking at p >= {d['candidate_prob']}, "
                 f"then replaced before the output) that passes a causal test: skipping the decoder layer(s) where it "
                 f"lost the top-1 makes the model emit it again" + (", and it does not lead without the image"
                 if d.get("ground") else "") + ".")  # fmt: skip
    else:
        event = (f"A mutation event is the overturn of an established answer (top-1 for >= {d['min_run']} layers, "
                 f"p >= {d['establish_prob']}) before the output, read off the lens only.")  # fmt: skip
    return (event + " The critical layer is where the answer that dominates stabilization becomes the top-1. A "
            f"mutation stage is reported only when the lower end of the 95% bootstrap interval (over samples) of the "
            f"share of tokens with events exceeds {d['min_event_share']}.")


def _leader_rule(d: dict) -> str:
    """The leader half of the image-swap test in words (``leader_test``)."""
    image = "some other picture changes it"
    output = f"it is still among the output's top-{d.get('contender_k', 5)} candidates"
    test = d.get("leader_test", "off")
    words = {"image": image, "output": output, "either": f"{image}, or {output}"}.get(test)
    return f", and the overturned answer was an answer to this input: {words}" if words else ""


def token_stages(row, n_layers: int) -> dict | None:
    """One token's own stages, in the aggregate's format (half-open stack-layer intervals): rapid evolution up to its
    critical layer, stabilization, and a mutation stage from its mutation layer only when it has an event; None when
    the token has no critical layer."""
    if row.critical is None:
        return None
    c, m = row.critical, row.mutation
    return {"critical_layer": c, "mutation_layer": m, "mutation_detected": m is not None, "rapid_evolution": [0, c],
            "stabilization": [c, n_layers + 1 if m is None else m], "mutation": None if m is None else [m, n_layers + 1]}
