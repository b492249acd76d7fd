"""Where the image enters, on models where the answer is known: the planted critical layer and the knockout curves.

    python benchmarks/planted_critical.py            # 100 fresh held-out questions per model; writes docs/experiments.md
    python benchmarks/planted_critical.py --n 8 --no-write

Models: the late-image fixtures ``shapes-llava-gate3`` / ``shapes-llava-gate5`` (text may not attend to the image in
decoder layers 0..k-1, so nothing of the image reaches the last position before stack layer k+1:
:mod:`vlm_lens.zoo.recipe.gate`), their base ``shapes-llava`` (negative control) and ``shapes-qwen2-vl``. For each:
the critical layer of every correct first answer token (the report's detector, correct lens) and the attention
knockout curves (:mod:`vlm_lens.experiments.analysis.information_flow`), on one-word questions of fresh held-out
images (seeds of their own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package beside it

MODELS = {"shapes-llava-gate3": 3, "shapes-llava-gate5": 5, "shapes-llava": None, "shapes-qwen2-vl": None}
START = 41_000_000  # held-out seeds of their own (training < 4M, plants 5M+, gates 6M+, evaluations 10M+)


def questions(n: int):
    from vlm_lens.experiments.analysis.records import Sample
    from vlm_lens.zoo import shapes_world as sw

    out, seed = [], START
    while len(out) < n:
        e = sw.example(seed)
        seed += 1
        if e.task != "caption":  # one-word answers: the first answer token is the answer
            out.append(Sample(e.image, e.question, e.answer, f"{e.task}_{seed}"))
    return out


def summary(values: list[int]) -> dict:
    from vlm_lens.experiments.analysis.summary_stats import order_stats

    stats = order_stats(values)
    return {"n": stats["n"], "median": None if not stats["n"] else int(stats["median"]),
            "quartiles": None if not stats["n"] else [int(stats["q1"]), int(stats["q3"])]}  # fmt: skip


def score(name: str, k: int | None, n: int) -> dict:
    import vlm_lens
    from vlm_lens.experiments.analysis import information_flow

    model = vlm_lens.load(name)
    information_flow.run(model, questions(2))  # warm-up: the timed run below starts warm
    result = information_flow.run(model, questions(n))
    correct = [r for r in result["samples"] if r["correct"]]
    out: dict = {"model": name, "k": k, "n": len(result["samples"]), "correct": len(correct),
                 "window": result["window"], "window_starts": result["window_starts"],
                 "mean": result["aggregate"]["mean"], "cost": result["cost"]}  # fmt: skip
    for key in ("critical_layer", "grounded_critical_layer"):
        values = [r[key] for r in correct if r[key] is not None]
        out[key] = summary(values)
        out[key]["by_task_median"] = {t: statistics.median_low(v) for t in ("color", "shape", "count", "position")
                                      if (v := [r[key] for r in correct if r[key] is not None and r["name"].startswith(t)])}  # fmt: skip
        if k is not None:
            out[key]["at_or_after_k_plus_1"] = sum(c >= k + 1 for c in values) / len(values) if values else None
            out[key]["early"] = [(r["question"], r["answer_token"], r[key]) for r in correct
                                 if r[key] is not None and r[key] < k + 1]  # fmt: skip
    if k is not None:
        curve, starts = result["aggregate"]["mean"]["image->last"], result["window_starts"]
        below = [w for w, s in enumerate(starts) if s + result["window"] - 1 < k]
        out["image_last_below_k_max_abs"] = max(abs(curve[w]) for w in below)
        out["image_last_at_k"] = curve[starts.index(k)]
    return out


def render(rows: list[dict]) -> str:
    lines = ["| model | ground truth | correct / asked | critical layer: ≥ k+1, median (quartiles), n | grounded critical "
             "layer: ≥ k+1, median (quartiles), n | by task (critical / grounded medians) |", "|---|---|---|---|---|---|"]
    for r in rows:
        truth = "none (control)" if r["k"] is None else f"image enters at decoder layer {r['k']}: ≥ {r['k'] + 1}"
        cells = []
        for key in ("critical_layer", "grounded_critical_layer"):
            c = r[key]
            share = "" if r["k"] is None else f"{c['at_or_after_k_plus_1']:.2f}, "
            q = c["quartiles"] or ["–", "–"]
            cells.append(f"{share}{c['median']} ({q[0]}-{q[1]}), {c['n']}")
        tasks = ", ".join(f"{t} {m}/{r['grounded_critical_layer']['by_task_median'].get(t, '–')}"
                          for t, m in r["critical_layer"]["by_task_median"].items())  # fmt: skip
        lines.append(f"| {r['model']} | {truth} | {r['correct']} / {r['n']} | {cells[0]} | {cells[1]} | {tasks} |")
    lines += ["", "Mean relative change of P(answer) (%) when a flow is blocked in a window of decoder layers "
              "(columns: the window's first decoder layer):", ""]
    for r in rows:
        starts = r["window_starts"]
        lines += [f"**{r['model']}** (window {r['window']}, {r['cost']['forwards_per_sample']} forwards per sample, "
                  f"{r['cost']['seconds_per_sample']} s per sample with its critical-layer traces, batches of "
                  f"{r['cost']['batch_size']}, 2 CPU cores)", "",
                  "| flow | " + " | ".join(str(s) for s in starts) + " |", "|---|" + "---|" * len(starts)]  # fmt: skip
        for flow, values in r["mean"].items():
            lines.append(f"| {flow} | " + " | ".join(f"{100 * v:.0f}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out questions per model")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/experiments.md alone")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    rows = [score(name, MODELS.get(name), args.n) for name in args.models]
    print(json.dumps(rows, indent=1))
    body = render(rows)
    print(body)
    if not args.no_write:
        from benchmarks.docs_blocks import write_block

        write_block("experiments.md", "planted-critical", body, "## Where the image enters: a planted critical layer")


if __name__ == "__main__":
    main()
