"""Corrected decoding scored on planted ground truth, and its cost per generated token.

    python benchmarks/decoding_scores.py                 # every suite fixture + shapes-llava-prior; writes docs/experiments.md
    python benchmarks/decoding_scores.py --n 6 --fixtures llava-end --no-write

For each planted fixture (``vlm_lens.zoo.suite``: 16 fixtures over 4 independently trained bases, and the shipped
``shapes-llava-prior``): ``--n`` counter-prior questions (the trigger asked about an image whose truth is not the prior
word) and ``--n`` untriggered questions (every other task), decoded greedily and with each method; on each clean base
the same untriggered questions. A *hallucination* is a counter-prior question greedy decoding answers wrongly; it is
*fixed* when the method's answer is the truth. The skip method skips the paper's skip.2 set of the mutation stage
the analysis detects on a separate dev set of that model's questions (10 counter-prior + 10 untriggered, or 20
untriggered on a clean base); with no stage detected it is plain greedy. Intervals: Wilson 95 %.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package beside it

METHODS = ("greedy", "skip", "deco", "dola", "vcd", "evidence", "evidence, both leader halves", "evidence, skip test (round 2)")
SCORE_START, DEV_START = 850_000, 870_000  # held-out seed offsets of their own


def wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    p, z = k / n, 1.96
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def questions(trigger, n: int, start: int):
    from vlm_lens.zoo import planted
    from vlm_lens.zoo import shapes_world as sw

    counter = planted.counter_prior(trigger, n, start=start) if trigger else []
    tasks = [t for t in sw.TASKS if t != "caption"]
    per_task = planted.untriggered(trigger or planted.Trigger(), max(1, n // len(tasks) + 1), start=start)
    other = [e for t in tasks for e in per_task[t]][:n]
    return counter, other


def skip_layers(model, trigger) -> list[int]:
    from vlm_lens.experiments.analysis import knowledge_evolution as ke
    from vlm_lens.experiments.analysis.layer_skip import skip_sets

    counter, other = questions(trigger, 10, DEV_START)
    samples = [ke.Sample(e.image, e.question, e.answer) for e in (counter + other if trigger else other + questions(None, 10, DEV_START + 5000)[1])]
    stages = ke.run(model, samples, ke.EvolutionConfig(max_new_tokens=2, variants=("correct",)))["aggregate"]["correct"]["stages"]
    if stages is None or stages["mutation_layer"] is None:
        return []
    return skip_sets(stages["critical_layer"], stages["mutation_layer"], model.n_layers)["skip.2"]


def corrections(layers: list[int]) -> dict:
    from vlm_lens.experiments.analysis import evidence as ev
    from vlm_lens.experiments.analysis.evidence_decoding import Evidence
    from vlm_lens.probes import decoding as D

    round2 = ev.DetectionConfig(test="skip", candidate_prob=0.3)
    return {"greedy": None, "skip": D.Skip(layers), "deco": D.DeCo(), "dola": D.DoLa(), "vcd": D.VCD(), "evidence": Evidence(),
            "evidence, both leader halves": Evidence(config=ev.DetectionConfig(leader_test="both")),
            "evidence, skip test (round 2)": Evidence(config=round2)}  # fmt: skip


def answers(model, examples, correction) -> list[str]:
    from vlm_lens.experiments.analysis.evidence_decoding import per_sample_corrections

    per_sample = per_sample_corrections(correction, examples)  # evidence: the swap test's pictures, as the CLI's
    return [model.generate(model.prepare(e.image, e.question), 2, correction=per_sample(i)) for i, e in enumerate(examples)]


def score_model(path, trigger, n: int) -> dict:
    import vlm_lens

    model = vlm_lens.load(str(path))
    layers = skip_layers(model, trigger)
    counter, other = questions(trigger, n, SCORE_START)
    out = {"skip_layers": layers, "n_counter": len(counter), "n_other": len(other), "methods": {}}
    greedy_counter = answers(model, counter, None)
    hallucinated = [i for i, (a, e) in enumerate(zip(greedy_counter, counter)) if a != e.answer]
    for name, correction in corrections(layers).items():
        got_counter = greedy_counter if correction is None else answers(model, counter, correction)
        got_other = answers(model, other, correction)
        out["methods"][name] = {"fixed": sum(got_counter[i] == counter[i].answer for i in hallucinated),
                                "hallucinated": len(hallucinated),
                                "other_correct": sum(a == e.answer for a, e in zip(got_other, other))}  # fmt: skip
    return out


def cost(n: int, reps: int = 3) -> dict:
    """Seconds per generated token of each method on shapes-llava-prior, interleaved repetitions (8 tokens each),
    against plain greedy HF ``generate`` on the same plain modules (the route every corrected run takes)."""
    import vlm_lens
    from vlm_lens.capture import plain_capture
    from vlm_lens.probes.decoding import Method
    from vlm_lens.zoo import planted

    model = vlm_lens.load("shapes-llava-prior")
    inputs = [model.prepare(e.image, e.question) for e in planted.counter_prior(planted.Trigger(), n, start=SCORE_START)]
    kwargs = model.greedy_kwargs(8, False, with_logits=False)

    def plain(x):
        with plain_capture(model, [], {}):
            model.hf_model.generate(**x.model_inputs, **kwargs)

    runs = {"plain greedy (HF generate, plain modules)": plain,
            "model.generate (through the TransformerLens bridge)": lambda x: model.generate_ids(x, 8, stop_at_eos=False),
            "corrected loop, no correction": Method(), **corrections([6, 7])}  # fmt: skip
    runs.pop("greedy")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, run in runs.items():
            started = time.perf_counter()
            for x in inputs:
                run(x) if callable(run) and not hasattr(run, "scores") else model.generate(x, 8, stop_at_eos=False, correction=run)
            times[name].append((time.perf_counter() - started) / (8 * len(inputs)))
    base = statistics.median(times["plain greedy (HF generate, plain modules)"])
    return {k: {"ms_per_token": round(1000 * statistics.median(v), 2), "ratio": round(statistics.median(v) / base, 2)}
            for k, v in times.items()}  # fmt: skip


def rows_for(n: int, names: list[str], saved: Path | None = None) -> list[dict]:
    """One row per model; with ``saved`` (JSON lines) the models already there are read back, not scored again, and
    each new row is appended as it is scored (an interrupted run resumes)."""
    from vlm_lens.zoo import embedded_path, planted, suite

    cache = Path(tempfile.mkdtemp(prefix="vlm-lens-suite-"))
    done: dict[str, dict] = {}
    if saved is not None and saved.is_file():
        for line in saved.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last row of a run killed while writing it: scored again
                continue
            if row.get("n") == n:
                done[row["model"]] = row
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        if name == "shapes-llava-prior":
            path, split, kind = embedded_path(name), "dev", "fixture"
        elif name in suite.BASES:
            path, split, kind = suite.base_path(name), suite.split_of(name), "clean base"
        else:
            path, split, kind = suite.materialize(name, cache), suite.fixture(name).split, "fixture"
        info = planted.planted_info(path)
        trigger = planted.Trigger(**info["trigger"]) if info else None
        rows.append({"model": name, "split": split, "kind": kind, "n": n, **score_model(path, trigger, n)})
        print(json.dumps(rows[-1]), flush=True)
        if saved is not None:
            with saved.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    return rows


def render(rows: list[dict], costs: dict) -> str:
    lines = ["| split | fixtures | hallucinations | " + " | ".join(f"{m}: fixed" for m in METHODS[1:]) + " |",
             "|---|---|---|" + "---|" * (len(METHODS) - 1)]  # fmt: skip
    for split in ("dev", "test"):
        group = [r for r in rows if r["kind"] == "fixture" and r["split"] == split]
        total = sum(r["methods"]["greedy"]["hallucinated"] for r in group)
        cells = []
        for m in METHODS[1:]:
            fixed = sum(r["methods"][m]["fixed"] for r in group)
            cells.append(f"{fixed / total:.2f} {wilson(fixed, total)}" if total else "–")
        lines.append(f"| {split} | {len(group)} | {total} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy on untriggered questions (fixtures) and on the clean bases, greedy and each method:", "",
              "| split | models | questions | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]  # fmt: skip
    for split in ("dev", "test"):
        for kind in ("fixture", "clean base"):
            group = [r for r in rows if r["kind"] == kind and r["split"] == split]
            total = sum(r["n_other"] for r in group)
            if not total:
                continue
            cells = [f"{sum(r['methods'][m]['other_correct'] for r in group) / total:.3f}" for m in METHODS]
            lines.append(f"| {split} | {len(group)} {kind}{'s' if len(group) > 1 else ''} | {total} | " + " | ".join(cells) + " |")
    lines += ["", "Per model (hallucinations fixed / hallucinations; skip set = the detected skip.2, decoder layers):", "",
              "| model | split | skip set | " + " | ".join(METHODS[1:]) + " |", "|---|---|---|" + "---|" * (len(METHODS) - 1)]  # fmt: skip
    for r in rows:
        if r["kind"] == "fixture":
            h = r["methods"]["greedy"]["hallucinated"]
            cells = [f"{r['methods'][m]['fixed']}/{h}" for m in METHODS[1:]]
            lines.append(f"| {r['model']} | {r['split']} | {r['skip_layers'] or 'none detected'} | " + " | ".join(cells) + " |")
    lines += ["", "Cost per generated token on shapes-llava-prior (8 tokens, median of 3 interleaved repetitions, 1 process, "
              "2 CPU cores):", "", "| decoding | ms per token | × plain greedy |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['ms_per_token']} | {v['ratio']} |" for k, v in costs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from vlm_lens.zoo import suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30, help="counter-prior and untriggered questions per model")
    parser.add_argument("--fixtures", nargs="*", default=["shapes-llava-prior"] + [f.name for f in suite.fixtures(scored=True)] + list(suite.BASES))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/experiments.md alone")
    parser.add_argument("--rows", type=Path, default=None, help="JSON lines of scored models: resume from / append to")
    args = parser.parse_args(argv)
    rows = rows_for(args.n, args.fixtures, args.rows)
    costs = cost(min(args.n, 10))
    body = render(rows, costs)
    print(body)
    if not args.no_write:
        from benchmarks.docs_blocks import write_block

        write_block("experiments.md", "decoding-scores", body, "## Correcting what the analysis found: decoding scored on planted hallucinations")


if __name__ == "__main__":
    main()
