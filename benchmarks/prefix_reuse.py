"""Prefix reuse, measured side by side: skip sweeps seeded by the trace's cached prefix, and shared image prefixes.

    python benchmarks/prefix_reuse.py                       # medium random LLaVA + the embedded models; docs/performance.md
    python benchmarks/prefix_reuse.py --sweep-models shapes-llava-prior --shared "" --no-write   # a quick look

- **sweep**: ``LayerSkip().sweep``-style single-layer skips on one trace (teacher-forced step logits + the skipped greedy
  generation per layer), ``reuse="prefix"`` (:mod:`vlm_lens.prefix_skip`) against ``reuse="none"`` (the naive way:
  a whole teacher-forced forward and a whole generation through the hook points), interleaved (rotating order,
  medians of ``--reps``) in one process, on the same trace. On the medium model ``--medium-layers`` evenly spaced
  layers stand for the sweep (the naive sweep over all 24 layers takes minutes per repetition).
- **shared**: samples/s of tracing N questions asked about N / q images (q questions per image, consecutive as in a
  VQA file) in batches of ``--batch-size``, with shared image prefixes (:mod:`vlm_lens.shared_prefix`) and without,
  back to back in one process (alternating which goes first, after one warm-up of both), at each number of new
  tokens; for ``--phase1`` values of q also the whole per-sample work (``streaming.phase1``: trace, every lens
  variant, evidence with its causal tests, reduction, store write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.docs_blocks import write_block  # noqa: E402
from benchmarks.timing import time_pipelines  # noqa: E402

QUESTIONS = ("Please describe this image in detail.", "What is in this image?", "Describe the image.",
             "What do you see in the picture?")  # fmt: skip


def question(k: int) -> str:
    """The k-th question about an image (all distinct)."""
    return QUESTIONS[k % len(QUESTIONS)] + " Answer in detail." * (k // len(QUESTIONS))


def load(kind: str):
    import vlm_lens
    from vlm_lens import testing

    if kind == "medium":
        model, processor = testing.build("llava", "medium")
        return vlm_lens.load(model, processor=processor)
    return vlm_lens.load(kind)


def sweep_row(kind: str, reps: int, medium_layers: int, new_tokens: int) -> dict:
    from vlm_lens import testing
    from vlm_lens.probes import LayerSkip
    from vlm_lens.zoo.samples import shapes_samples

    model = load(kind)
    if kind == "medium":
        image, prompt = testing.sample_image(0, testing.size_for("llava", "medium").image_size), QUESTIONS[0]
        step = max(1, model.n_layers // medium_layers)
        layers = list(range(0, model.n_layers, step))[:medium_layers]
    else:
        sample = shapes_samples()[0]
        image, prompt, layers = sample["path"], sample["question"], list(range(model.n_layers))
    trace = model.trace_generation(model.prepare(image, prompt), new_tokens, stop_at_eos=False)
    sets = {str(i): [i] for i in layers}
    fast, slow = LayerSkip(reuse="prefix"), LayerSkip(reuse="none")
    same = all(a["generated_ids"].tolist() == b["generated_ids"].tolist() and
               float((a["kl"] - b["kl"]).abs().max()) <= 1e-4
               for a, b in zip(fast.run_sets(trace, sets).values(), slow.run_sets(trace, sets).values()))  # fmt: skip
    times = time_pipelines({"prefix": lambda: fast.run_sets(trace, sets), "naive": lambda: slow.run_sets(trace, sets)}, reps)
    prefix, naive = statistics.median(times["prefix"]), statistics.median(times["naive"])
    return {"model": kind, "n_layers": model.n_layers, "layers": layers, "positions": int(trace.inputs.input_ids.shape[1]),
            "new_tokens": trace.n_steps, "prefix_s": prefix, "naive_s": naive, "speedup": naive / prefix,
            "same_results": same, "reps": reps}  # fmt: skip


def shared_rows(n: int, per_image: list[int], new_tokens: list[int], batch_size: int, phase1_per_image: list[int]) -> list[dict]:
    """Per (new tokens, questions per image): seconds to trace ``n`` questions in batches without and with shared
    prefixes (run back to back, alternating which goes first, after one warm-up of both), and for the first number of
    new tokens and each q of ``phase1_per_image`` the same for the whole per-sample work (``streaming.phase1``)."""
    from vlm_lens import testing
    from vlm_lens.experiments.analysis import knowledge_evolution as ke
    from vlm_lens.experiments.runs import datasets, streaming
    from vlm_lens.shared_prefix import PrefixCache

    model = load("medium")
    size = testing.size_for("llava", "medium").image_size

    def samples_for(q: int) -> list:
        return [ke.Sample(testing.sample_image(i // q, size), question(i % q), None, f"s{i}") for i in range(n)]

    def trace_all(prepared: list, new: int, shared: bool) -> None:
        prefixes = PrefixCache() if shared else None
        for start in range(0, len(prepared), batch_size):
            ke.trace_samples(model, prepared[start : start + batch_size], new, prefixes)

    def phase1(source, new: int, shared: bool) -> None:
        settings = streaming.StreamSettings(ke.EvolutionConfig(max_new_tokens=new), skip_sweep=False)  # 6 patch maps
        store = streaming.open_store(Path(tempfile.mkdtemp(prefix="vlm-lens-bench-")) / "store", model, source, settings,
                                     overwrite=True)  # fmt: skip
        streaming.phase1(model, source, store, settings, batch_size=batch_size, share_prefixes=shared)

    warm = [model.prepare(s.image, s.prompt) for s in samples_for(2)[:2]]
    trace_all(warm, 2, False)
    trace_all(warm, 2, True)
    rows, flip = [], False
    for new in new_tokens:
        for q in per_image:
            prepared = [model.prepare(s.image, s.prompt) for s in samples_for(q)]
            jobs = {"trace": lambda shared, prepared=prepared, new=new: trace_all(prepared, new, shared)}
            if new == new_tokens[0] and q in phase1_per_image:
                source = datasets.from_samples(samples_for(q))
                jobs["phase1"] = lambda shared, source=source, new=new: phase1(source, new, shared)
            for work, job in jobs.items():
                seconds = {}
                for shared in ((True, False) if flip else (False, True)):
                    start = time.perf_counter()
                    job(shared)
                    seconds[shared] = time.perf_counter() - start
                flip = not flip
                rows.append({"work": work, "new_tokens": new, "per_image": q, "images": -(-n // q), "n": n,
                             "batch_size": batch_size, "plain_s": seconds[False], "shared_s": seconds[True],
                             "plain_sps": n / seconds[False], "shared_sps": n / seconds[True],
                             "speedup": seconds[False] / seconds[True]})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def tables(sweeps: list[dict], shared: list[dict]) -> str:
    lines = []
    if sweeps:
        lines += ["| model | decoder layers skipped (one at a time) | positions + new tokens | naive (s) | from the cached prefix (s) "
                  "| speed-up | same results |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sweeps:
            which = "all" if len(r["layers"]) == r["n_layers"] else f"{len(r['layers'])} of {r['n_layers']} ({r['layers']})"
            lines.append(f"| {r['model']} | {which} | {r['positions']} + {r['new_tokens']} | {r['naive_s']:.2f} | "
                         f"{r['prefix_s']:.2f} | {r['speedup']:.2f}x | {r['same_results']} |")  # fmt: skip
    if shared:
        lines += ["", "| work | new tokens | questions per image | images | without sharing (samples/s) | shared prefixes "
                  "(samples/s) | speed-up |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in shared:
            work = "tracing" if r["work"] == "trace" else "trace + analysis + store (phase 1)"
            lines.append(f"| {work} | {r['new_tokens']} | {r['per_image']} | {r['images']} | {r['plain_sps']:.3f} | "
                         f"{r['shared_sps']:.3f} | {r['speedup']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-models", default="medium,shapes-llava-prior,shapes-qwen2-vl")
    parser.add_argument("--medium-layers", type=int, default=6, help="evenly spaced layers for the medium model's sweep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sweep-new-tokens", type=int, default=16)
    parser.add_argument("--shared", default="1,4,16", help="questions per image (empty: skip the shared-prefix runs)")
    parser.add_argument("--shared-n", type=int, default=16, help="questions in each shared-prefix run")
    parser.add_argument("--shared-new-tokens", default="16,64")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--phase1", default="1,16", help="questions per image whose whole phase 1 is timed too (first "
                        "number of new tokens only)")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # the random model's word vocabulary reads unknown words as <unk>: said once per word
    import torch

    sweeps = []
    for kind in filter(None, args.sweep_models.split(",")):
        sweeps.append(sweep_row(kind, args.reps, args.medium_layers, args.sweep_new_tokens))
        print(json.dumps(sweeps[-1]), flush=True)
    per_image = [int(q) for q in filter(None, args.shared.split(","))]
    new_tokens = [int(t) for t in args.shared_new_tokens.split(",")]
    phase1_q = [int(q) for q in filter(None, args.phase1.split(","))]
    shared = shared_rows(args.shared_n, per_image, new_tokens, args.batch_size, phase1_q) if per_image else []
    print(tables(sweeps, shared))
    if args.write:
        command = "python benchmarks/prefix_reuse.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        where = (f"Measured with `{command.strip()}` on {platform.machine()}, {os.cpu_count()} cores, torch "
                 f"{torch.__version__} ({torch.get_num_threads()} threads), float32, {time.strftime('%Y-%m-%d')}.")  # fmt: skip
        for name, rows, heading in (("prefix-sweep", sweeps, "### Skip sweeps from the cached prefix"),
                                    ("shared-prefix", shared, "### Shared image prefixes")):  # fmt: skip
            if rows:
                table = tables(rows, []) if name == "prefix-sweep" else tables([], rows).strip()
                body = (f"{where}\n\n{table}\n\n<details><summary>raw numbers</summary>\n\n```json\n"
                        f"{json.dumps(rows, indent=1)}\n```\n</details>")
                write_block("performance.md", name, body, heading)

if __name__ == "__main__":
    main()
