"""Score the detectors on the planted-fixture suite (:mod:`vlm_lens.zoo.suite`), per fixture, per split, per base.

For each fixture (a base with a planted block; the base is its clean twin):

- **recall in the block**: among counter-prior questions the planted model answers with the prior word
  (*hallucinated*), the share whose first answer token carries a mutation event whose layer lies in the block's stack
  layers (decoder layers b -> stack layer b + 1);
- **recall where the plant changed the answer**: the same, on the hallucinated answers the clean twin did *not* give
  the prior word to (the twin answers the same question; where the base already says the prior word, the block
  overturned nothing and no event is expected in it). Both recalls are reported; neither reads the block to detect;
- **leader = truth**: the share of those events whose overturned leader is the true answer;
- **false alarms**: the share of questions with an event on any non-special token, on the clean twin (the same
  counter-prior questions and untriggered questions of every task, asked to the base) and on the planted model's
  untriggered questions;
- **knowledge before the block**: the share of hallucinated answers whose true answer is the lens top-1 at the stack
  layer entering the block (what a detector can find at all: with nothing established, nothing is overturned).

Every share comes with a 95 % percentile bootstrap interval over questions; split and leave-one-base-out figures
pool the questions of their fixtures. ``candidates`` (the lens rule without the causal test) are scored beside the
confirmed events, so the effect of confirmation is visible. Nothing here reads the trigger or block to *detect*.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.analysis import summary_stats as ss


def share_interval(flags: Sequence[bool], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The share of true flags and its percentile bootstrap interval over questions: the event-share bootstrap of
    :func:`~vlm_lens.experiments.analysis.summary_stats.event_share_interval` with one "token" per question."""
    ones = [int(bool(f)) for f in flags]
    out = ss.event_share_interval(ones, [1] * len(ones), n_boot=n_boot, seed=seed, level=level)
    return {"share": out["share"], "low": out["low"], "high": out["high"], "n": len(flags)}


def _any_event(sample, variant: str, field: str = "mutation") -> bool:
    return any(getattr(t, field) is not None for t in sample.tokens[variant] if not t.special)


def fixture_outcomes(planted_model, base_model, info: dict, n: int = 30, *, variant: str = "correct",
                     detection: ev.DetectionConfig = ev.DetectionConfig(), start: int = 0) -> dict:  # fmt: skip
    """Per-question outcomes (booleans) of one fixture; :func:`summarize` turns them into shares and intervals."""
    from vlm_lens.zoo import planted as fixtures

    trigger = fixtures.Trigger(**info["trigger"])
    block = [b + 1 for b in info["block"]]
    short = ke.EvolutionConfig(max_new_tokens=3, variants=(variant,), detection=detection)
    long = ke.EvolutionConfig(max_new_tokens=14, variants=(variant,), detection=detection)
    counter = fixtures.counter_prior(trigger, n, start=fixtures.COUNTER_PRIOR_START + start)
    samples = [ke.Sample(e.image, e.question, e.answer, f"cp{i}", planted=True) for i, e in enumerate(counter)]
    planted = ke.run(planted_model, samples, short)["samples"]
    base_counter = ke.run(base_model, samples, short)["samples"]
    clean = [e for task in fixtures.untriggered(trigger, max(1, -(-n // 5)), start=300_000 + start).values() for e in task][:n]
    clean_samples = [ke.Sample(e.image, e.question, e.answer, f"clean{i}") for i, e in enumerate(clean)]
    base_clean = ke.run(base_model, clean_samples, long)["samples"]
    planted_clean = ke.run(planted_model, clean_samples, long)["samples"]
    tok = planted_model.tokenizer
    out: dict[str, Any] = {"recall": [], "recall_changed": [], "recall_candidates": [], "leader_true": [], "knowledge_before_block": [], "event_layers": [],
           "forwards": [s.confirm_forwards for s in planted + base_counter + base_clean + planted_clean]}  # fmt: skip
    for s, twin in zip(planted, base_counter):
        if s.generated_text.strip() != trigger.answer:
            continue
        row = s.tokens[variant][0]
        out["recall"].append(row.mutation in block)
        if twin.generated_text.strip() != trigger.answer:  # the base did not give the prior word: the plant did
            out["recall_changed"].append(row.mutation in block)
        out["recall_candidates"].append(row.candidate in block)
        out["leader_true"].append(row.mutation in block and row.leader == tok.convert_ids_to_tokens(
            planted_model.to_single_token(s.answer)))  # fmt: skip
        top1 = s.lens[variant]["topk_ids"][block[0] - 1, 0, 0].item()  # lens top-1 entering the block, first step
        out["knowledge_before_block"].append(tok.convert_ids_to_tokens(top1) == s.answer)
        if row.mutation is not None:
            out["event_layers"].append(row.mutation)
    out["hallucinated"] = len(out["recall"])
    out["counter_prior"] = len(planted)
    for key, group in (("twin_counter_prior", base_counter), ("twin_clean", base_clean), ("planted_untriggered", planted_clean)):
        out[f"fa_{key}"] = [_any_event(s, variant) for s in group]
        out[f"fa_{key}_candidates"] = [_any_event(s, variant, "candidate") for s in group]
    out["accuracy_twin_clean"] = [bool(s.correct) for s in base_clean]
    out["accuracy_planted_untriggered"] = [bool(s.correct) for s in planted_clean]
    return out


SHARES = ("recall", "recall_changed", "recall_candidates", "leader_true", "knowledge_before_block", "fa_twin", "fa_twin_candidates",
          "fa_planted_untriggered", "fa_planted_untriggered_candidates")  # fmt: skip


def pooled(outcomes: Sequence[dict]) -> dict:
    """Pool the per-question outcomes of several fixtures (the twin's false alarms: counter-prior + clean questions)."""
    keys = ("recall", "recall_changed", "recall_candidates", "leader_true", "knowledge_before_block", "fa_planted_untriggered",
            "fa_planted_untriggered_candidates", "event_layers", "forwards")  # fmt: skip
    out = {k: [x for o in outcomes for x in o[k]] for k in keys}
    out["fa_twin"] = [x for o in outcomes for x in o["fa_twin_counter_prior"] + o["fa_twin_clean"]]
    out["fa_twin_candidates"] = [x for o in outcomes for x in o["fa_twin_counter_prior_candidates"] + o["fa_twin_clean_candidates"]]
    out["hallucinated"] = sum(o["hallucinated"] for o in outcomes)
    return out


def summarize(outcomes: dict, seed: int = 0) -> dict:
    """Shares with 95 % bootstrap intervals of pooled outcomes (:func:`pooled`)."""
    summary = {k: share_interval(outcomes[k], seed=seed) for k in SHARES}
    summary["hallucinated"] = outcomes["hallucinated"]
    summary["forwards_per_trace"] = sum(outcomes["forwards"]) / max(1, len(outcomes["forwards"]))
    return summary


def validate_suite(load, names: Sequence[str] | None = None, n: int = 30, *, variant: str = "correct",
                   detection: ev.DetectionConfig = ev.DetectionConfig(), progress=None) -> dict:  # fmt: skip
    """Score every fixture of the suite (or ``names``); ``load(name)`` returns the loaded model of a fixture or base.

    Returns per-fixture summaries, per-split and per-base pooled summaries, and leave-one-base-out figures (each base
    scored alone against the pool of the others: with no fitted parameter, what a base the rule never saw gets)."""
    from vlm_lens.zoo import suite

    specs = [suite.fixture(x) for x in names] if names else suite.fixtures(scored=True)
    per_fixture, raw = {}, {}
    for i, spec in enumerate(specs):
        planted_model, base_model = load(spec.name), load(spec.base)
        info = {"trigger": {"task": spec.task, "subject": spec.subject, "answer": spec.answer}, "block": list(spec.block)}
        raw[spec.name] = fixture_outcomes(planted_model, base_model, info, n, variant=variant, detection=detection)
        per_fixture[spec.name] = {"base": spec.base, "split": spec.split, "kind": spec.kind, "block": list(spec.block),
                                  "trigger": info["trigger"], **summarize(pooled([raw[spec.name]]))}  # fmt: skip
        if progress is not None:
            progress(i + 1, len(specs), spec.name)
    splits = {split: summarize(pooled([raw[s.name] for s in specs if s.split == split]))
              for split in suite.SPLIT if any(s.split == split for s in specs)}  # fmt: skip
    bases = sorted({s.base for s in specs})
    by_base = {b: summarize(pooled([raw[s.name] for s in specs if s.base == b])) for b in bases}
    lobo = {b: {"held_out": by_base[b], "others": summarize(pooled([raw[s.name] for s in specs if s.base != b]))}
            for b in bases if len(bases) > 1}  # fmt: skip
    return {"variant": variant, "n": n, "detection": asdict(detection), "fixtures": per_fixture, "splits": splits,
            "bases": by_base, "leave_one_base_out": lobo}  # fmt: skip


def suite_loader(suite_dir=None, cache=None):
    """``load(name)`` for :func:`validate_suite`: a base by name, a fixture materialized into ``cache`` (default
    ``$XDG_CACHE_HOME/vlm-lens/suite``) from ``suite_dir`` (a ``zoo plant --suite`` folder) or the shipped suite;
    each model is loaded once."""
    import os
    from pathlib import Path

    import vlm_lens
    from vlm_lens.zoo import suite

    cache = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm-lens" / "suite"
    loaded: dict = {}

    def load(name: str):
        if name not in loaded:
            if name in suite.BASES:
                loaded[name] = vlm_lens.load(name if suite.BASES[name].embedded else str(suite.base_path(name)))
            else:
                loaded[name] = vlm_lens.load(str(suite.materialize(name, cache, suite_dir)))
        return loaded[name]

    return load


def _cell(s: dict) -> str:
    return "–" if s["share"] is None else f"{s['share']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def table_lines(report: dict) -> list[str]:
    """The suite's figures as Markdown table rows (per fixture, per split, per base, leave-one-base-out)."""
    head = ("| | split | halluc. | recall in block | recall, answer changed by the plant | lens candidates only | leader = truth | false alarms, clean twin "
            "| (candidates only) | false alarms, planted untriggered | forwards / trace |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]

    def row(label, split, s):
        return (f"| {label} | {split} | {s['hallucinated']} | {_cell(s['recall'])} | {_cell(s['recall_changed'])} | "
                f"{_cell(s['recall_candidates'])} | "
                f"{_cell(s['leader_true'])} | {_cell(s['fa_twin'])} | {_cell(s['fa_twin_candidates'])} | "
                f"{_cell(s['fa_planted_untriggered'])} | {s['forwards_per_trace']:.2f} |")  # fmt: skip

    for name, s in report["fixtures"].items():
        lines.append(row(f"{name} ({s['kind']}, decoder {s['block']})", s["split"], s))
    for split, s in report["splits"].items():
        lines.append(row(f"**{split} split, pooled**", split, s))
    for base, s in report["bases"].items():
        lines.append(row(f"base {base}, pooled", "", s))
    for base, s in report["leave_one_base_out"].items():
        lines.append(row(f"leave out {base}: the others", "", s["others"]))
    return lines
