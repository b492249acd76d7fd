"""Dataset-scale benchmarks: memory flat in the number of samples, and throughput of batched generation.

    python benchmarks/dataset_runs.py                 # medium random LLaVA + the embedded model; writes docs/performance.md

- **memory vs N**: peak RSS of the process during a whole run (trace, reduce, store, skip sets, report) of N samples, each N in a
  fresh child process, streamed (``pipeline.analyze``) beside the in-memory API (``knowledge_evolution.run``, which
  keeps every trace: what ``analyze`` did before the store);
- **throughput**: samples/s of the per-sample work (trace + every lens variant + evidence + reduction + store write,
  i.e. ``streaming.phase1``) batched, one sample at a time, and one at a time on the nnsight backend.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package beside it
PROMPT = "Please describe this image in detail."


def build(kind: str, backend: str = "transformer_lens"):
    """(model, source of ``n`` distinct images) for ``medium`` (random LLaVA, 377M) or an embedded model name."""
    import vlm_lens
    from vlm_lens import testing

    if kind == "medium":
        model, processor = testing.build("llava", "medium")
        return vlm_lens.load(model, processor=processor, backend=backend)
    return vlm_lens.load(kind, backend=backend)


def source_for(model, kind: str, n: int):
    from vlm_lens import testing
    from vlm_lens.experiments.analysis.knowledge_evolution import Sample
    from vlm_lens.experiments.runs import datasets
    from vlm_lens.zoo.samples import shapes_samples

    if kind == "medium":
        size = testing.size_for("llava", "medium").image_size
        return datasets.from_samples([Sample(testing.sample_image(i, size), PROMPT, None, f"img{i}") for i in range(n)])
    base = shapes_samples()
    return datasets.from_samples([Sample(base[i % len(base)]["path"], base[i % len(base)]["question"],
                                         base[i % len(base)]["answer"], f"s{i}") for i in range(n)])  # fmt: skip


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_during(fn) -> tuple[float, float, float]:
    """(peak RSS of this process while ``fn`` runs, RSS before it, seconds), in MB. The kernel's high-water mark
    (VmHWM) is reset just before the run (``/proc/self/clear_refs`` <- 5), so loading the model does not hide the
    run's own peak; the peak includes the resident model, identical at every N."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return _status_mb("VmHWM"), before, elapsed


def child(kind: str, mode: str, n: int, max_new_tokens: int, batch_size: int) -> None:
    """One measurement in this process; prints JSON."""
    import torch

    from vlm_lens.experiments import pipeline
    from vlm_lens.experiments.analysis import knowledge_evolution as ke
    from vlm_lens.experiments.runs import streaming

    backend = "nnsight" if mode == "nnsight" else "transformer_lens"
    model = build(kind, backend)
    source = source_for(model, kind, n)
    config = ke.EvolutionConfig(max_new_tokens=max_new_tokens)
    out = Path(tempfile.mkdtemp(prefix="vlm-lens-bench-"))
    if mode == "streamed":
        fn = lambda: pipeline.analyze(model, source, out, config=config, png=False, skip_sweep=False, tsne_iter=250,  # noqa: E731
                                      batch_size=batch_size)
    elif mode == "in_memory":
        samples = [ke.Sample(e.image, e.question, e.answer, e.id) for e in source]
        fn = lambda: ke.run(model, samples, config)  # noqa: E731
    else:  # throughput of the per-sample work: phase 1 into a store (no image-token lens maps: the report's first
        # 6 samples get one, 4.4 s each on the medium model, a fixed cost of a run, not a per-sample one)
        settings = streaming.StreamSettings(config, skip_sweep=False, patch_maps=0)
        store = streaming.open_store(out / "store", model, source, settings, overwrite=True)
        fn = lambda: streaming.phase1(model, source, store, settings, batch_size=batch_size)  # noqa: E731
    try:
        peak, before, seconds = peak_during(fn)
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # stores and reports of a benchmark are not kept
    print(json.dumps({"kind": kind, "mode": mode, "n": n, "batch_size": batch_size, "peak_mb": peak,
                      "before_mb": before, "added_mb": peak - before, "seconds": seconds,
                      "samples_per_s": n / seconds, "threads": torch.get_num_threads()}))  # fmt: skip


def run_child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, metavar=("KIND", "MODE", "N", "NEW_TOKENS", "BATCH"))
    parser.add_argument("--memory", default="medium:2,32;shapes-llava-prior:8,512", help="KIND:N,N;... (empty: skip)")
    parser.add_argument("--throughput", default="medium:8", help="KIND:N;... (empty: skip)")
    parser.add_argument("--new-tokens", default="16,64", help="new tokens per sample for the throughput runs")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput runs")
    parser.add_argument("--memory-batch-size", type=int, default=2, help="batch size of the memory runs: the same at "
                        "every N, so that only what grows with N is compared (memory grows with the batch, see "
                        "docs/datasets.md)")
    parser.add_argument("--in-memory-max", type=int, default=32, help="largest N for the in-memory comparison")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.child:
        kind, mode, n, new, batch = args.child
        child(kind, mode, int(n), int(new), int(batch))
        return
    results = {"memory": [], "throughput": []}
    for spec in filter(None, args.memory.split(";")):
        kind, ns = spec.split(":")
        for n in map(int, ns.split(",")):
            for mode in ("streamed", "in_memory"):
                if mode == "in_memory" and n > args.in_memory_max:
                    continue
                row = run_child(kind, mode, n, 8, args.memory_batch_size)
                print(json.dumps(row), flush=True)
                results["memory"].append(row)
    for spec in filter(None, args.throughput.split(";")):
        kind, n = spec.split(":")
        for new in map(int, args.new_tokens.split(",")):
            for mode, batch in (("batched", args.batch_size), ("per_sample", 1), ("nnsight", 1)):
                row = {**run_child(kind, mode, int(n), new, batch), "new_tokens": new, "mode": mode}
                print(json.dumps(row), flush=True)
                results["throughput"].append(row)
    print(tables(results))
    if args.write:
        write_docs(results, "python benchmarks/dataset_runs.py " + shlex.join(argv or sys.argv[1:]))


def tables(results: dict) -> str:
    lines = ["| model | samples N | streamed (batch {b}): peak RSS (MB) | in-memory API, every trace kept: peak RSS (MB) | streamed s/sample |"
             .format(b=results["memory"][0]["batch_size"] if results["memory"] else "-"), "|---|---|---|---|---|"]
    by = {}
    for r in results["memory"]:
        by.setdefault((r["kind"], r["n"]), {})[r["mode"]] = r
    for (kind, n), rows in by.items():
        s, m = rows.get("streamed"), rows.get("in_memory")
        lines.append(f"| {kind} | {n} | {s['peak_mb']:.0f} | {m['peak_mb']:.0f} | {s['seconds'] / n:.2f} |" if m else
                     f"| {kind} | {n} | {s['peak_mb']:.0f} | – | {s['seconds'] / n:.2f} |")  # fmt: skip
    lines += ["", "| model | new tokens | batched (samples/s) | per-sample loop | nnsight per-sample loop | batched / per-sample | batched / nnsight |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    tp = {}
    for r in results["throughput"]:
        tp.setdefault((r["kind"], r["new_tokens"]), {})[r["mode"]] = r
    for (kind, new), rows in tp.items():
        b, p, n = (rows[k]["samples_per_s"] for k in ("batched", "per_sample", "nnsight"))
        lines.append(f"| {kind} (batch {rows['batched']['batch_size']}, {rows['batched']['n']} samples) | {new} | "
                     f"{b:.3f} | {p:.3f} | {n:.3f} | {b / p:.2f}x | {b / n:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def write_docs(results: dict, command: str) -> None:
    import platform

    import torch

    from benchmarks.docs_blocks import write_block

    if not results["memory"] or not results["throughput"]:  # a partial rerun keeps the other table's numbers
        previous = _previous_results()
        results = {key: results[key] or previous.get(key, []) for key in ("memory", "throughput")}
    body = (f"Measured with `{command.strip()}` on {platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, float32, {time.strftime('%Y-%m-%d')}.\n\n{tables(results)}\n\n<details><summary>raw "
            f"numbers</summary>\n\n```json\n{json.dumps(results, indent=1)}\n```\n</details>")  # fmt: skip
    write_block("performance.md", "datasets", body, "## Dataset runs: memory and throughput")


def _previous_results() -> dict:
    """The raw numbers of the datasets block now in docs/performance.md (empty when there are none)."""
    text = (ROOT / "docs" / "performance.md").read_text()
    if "<!-- datasets:start -->" not in text:
        return {}
    block = text.split("<!-- datasets:start -->", 1)[1].split("<!-- datasets:end -->", 1)[0]
    raw = block.split("```json", 1)[1].split("```", 1)[0] if "```json" in block else "{}"
    return json.loads(raw)


if __name__ == "__main__":
    main()
