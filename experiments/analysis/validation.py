"""Score the detectors against planted ground truth (a model from :mod:`vlm_lens.zoo.recipe.plant`) and its clean twin.

The planted model's ``planted.json`` says which questions must mutate (the trigger) and where (the fine-tuned
block of decoder layers b0..b1, i.e. stack layers b0+1..b1+1). On counter-prior questions (true answer != prior
word) that the planted model answers with the prior, a correct detector finds a mutation event whose layer lies in
the block and whose pre-mutation leader is the true answer; on clean questions of the base model (and on the same
counter-prior questions asked to the base model) it should find almost none. The layer-skip check applies the
paper's skip.2 (the detected mutation stage) and skip.1 (the detected stabilization stage) to the hallucinated
questions. Nothing here reads the trigger or block to *detect*: they are used only to score.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import hallucination, layer_skip
from vlm_lens.experiments.analysis import knowledge_evolution as ke


def _events(result: dict, variant: str) -> list[bool]:
    """Per sample: does any non-special token carry a mutation event?"""
    return [any(t.mutation is not None for t in s.tokens[variant] if not t.special) for s in result["samples"]]


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def validate(planted_model, base_model, n: int = 30, *, variant: str = "correct", tuned_lens=None,
             base_tuned_lens=None, config: ke.EvolutionConfig | None = None, start: int = 0) -> dict:  # fmt: skip
    """Recall, placement and false alarms of the mutation detector on ``n`` counter-prior and ``n`` clean questions.

    ``tuned_lens`` / ``base_tuned_lens``: the tuned lenses of the planted and the base model (needed when ``variant``
    or ``config.variants`` include ``"tuned"``; each model is read through its own lens).
    """
    from dataclasses import replace

    from vlm_lens.zoo import planted as fixtures

    info = fixtures.planted_info_for(planted_model)
    if info is None:
        raise InputError(f"{planted_model.name!r} has no planted.json: validate against a model made by `vlm-lens zoo plant`")
    trigger = fixtures.Trigger(**info["trigger"])
    block = [b + 1 for b in info["block"]]  # stack layers written by the fine-tuned decoder layers
    variants = tuple(dict.fromkeys((variant,) + (config.variants if config else ())))
    config = replace(config, variants=variants) if config else ke.EvolutionConfig(max_new_tokens=3, variants=variants)
    if "tuned" in variants and (tuned_lens is None or base_tuned_lens is None):
        raise InputError("the 'tuned' variant needs tuned_lens= and base_tuned_lens= (each model's own TunedLens)")
    counter = fixtures.counter_prior(trigger, n, start=fixtures.COUNTER_PRIOR_START + start)
    samples = [ke.Sample(e.image, e.question, e.answer, f"cp{i}", planted=True) for i, e in enumerate(counter)]
    planted = ke.run(planted_model, samples, config, tuned_lens=tuned_lens)
    hallucinated = [s for s in planted["samples"] if s.generated_text.strip() == trigger.answer]
    found, in_block, leader_true, reversal_in_block = [], [], [], []
    for s in hallucinated:
        row = s.tokens[variant][0]
        found.append(row.mutation is not None)
        in_block.append(row.mutation in block)
        leader_true.append(row.leader == hallucination.token_string(planted_model, s.answer))
        h = s.hallucination.get(variant) or hallucination.analyze(  # the pipeline's, unless the answer is not one token
            s.trace, s.answer, variant=variant, tuned_lens=tuned_lens, config=config.detection, evolution=s)
        reversal_in_block.append(h["leader_is_reference"] and h["reversal_layer"] in block)
    stages = planted["aggregate"][variant]["stages"]
    skip = None
    if hallucinated and stages and stages["mutation_detected"]:
        sets = layer_skip.skip_sets(stages["critical_layer"], stages["mutation_layer"], planted_model.n_layers)
        traces, answers = [s.trace for s in hallucinated], [s.answer for s in hallucinated]
        skip = {name: {"skipped_layers": layers, **_skip_scores(traces, answers, layers)}
                for name, layers in sets.items() if name in ("skip.1", "skip.2")}  # fmt: skip
    clean_examples = [e for task_examples in fixtures.untriggered(trigger, max(1, -(-n // 5)), start=300_000 + start).values()
                      for e in task_examples][:n]  # fmt: skip
    clean_samples = [ke.Sample(e.image, e.question, e.answer, f"clean{i}") for i, e in enumerate(clean_examples)]
    clean_config = ke.EvolutionConfig(max_new_tokens=14, variants=config.variants, detection=config.detection)
    base_clean = ke.run(base_model, clean_samples, clean_config, tuned_lens=base_tuned_lens)
    base_counter = ke.run(base_model, samples, config, tuned_lens=base_tuned_lens)
    planted_clean = ke.run(planted_model, clean_samples, clean_config, tuned_lens=tuned_lens)
    return {
        "planted_model": planted_model.name, "base_model": base_model.name, "variant": variant,
        "trigger": info["trigger"], "block_decoder_layers": info["block"], "block_stack_layers": block,
        "counter_prior_questions": len(samples), "hallucinated": len(hallucinated),
        "recall": _share(found), "recall_in_block": _share(in_block), "leader_is_true_answer": _share(leader_true),
        "hallucination_reversal_in_block": _share(reversal_in_block),
        "event_layers": sorted(s.tokens[variant][0].mutation for s in hallucinated if s.tokens[variant][0].mutation is not None),
        "stages": stages, "event_share": planted["aggregate"][variant]["event_share"], "skip": skip,
        "false_alarms_base_clean": _share(_events(base_clean, variant)), "base_clean_questions": len(clean_samples),
        "base_clean_accuracy": base_clean["aggregate"]["accuracy"],
        "false_alarms_base_counter_prior": _share(_events(base_counter, variant)),
        "false_alarms_planted_untriggered": _share(_events(planted_clean, variant)),
        "base_clean_stages": base_clean["aggregate"][variant]["stages"],
        "detection": asdict(config.detection),
    }  # fmt: skip


def _skip_scores(traces, answers, layers) -> dict:
    """Share of hallucinated answers restored to the true answer / changed at all when ``layers`` are skipped."""
    from vlm_lens.probes import LayerSkip

    restored, changed = [], []
    for trace, answer in zip(traces, answers):
        text = LayerSkip(list(layers))(trace).provenance["generated_text"].strip()
        restored.append(text == answer)
        changed.append(text != trace.text.strip())
    return {"restored_true_answer": _share(restored), "changed_answer": _share(changed)}
