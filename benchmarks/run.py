"""Side-by-side benchmark: plain HF generate (the floor), the seed pipeline, and vlm-lens's analysis.

    python benchmarks/run.py                       # medium random LLaVA + the embedded model, writes docs/performance.md
    python benchmarks/run.py --models tiny --reps 1 --no-write   # smoke test

Timing: in one process, the three pipelines run interleaved (rotating order) after one warm-up each; medians of
``--reps`` repetitions and their ratios. Memory: each pipeline runs once in its own child process; the figure is the
child's peak RSS during the run (``/proc/self/statm`` polled every 2 ms) minus its RSS just before it, i.e. what the
generation and analysis add on top of the loaded model. Lens throughput: ``final norm + lm_head`` on float32 rows vs a raw ``x @ W.T`` of the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import backends as compare_backends  # noqa: E402
from benchmarks import seed_pipeline  # noqa: E402
from benchmarks.docs_blocks import write_block  # noqa: E402
from benchmarks.timing import time_pipelines  # noqa: E402

PIPELINES = ("floor", "seed", "vlm_lens")


def build(kind: str):
    """(plain HF model, HookedVLM over an identical copy, image, prompt, label)."""
    import copy

    import vlm_lens
    from vlm_lens import testing

    if kind in ("tiny", "medium"):
        model, processor = testing.build("llava", kind)
        plain = copy.deepcopy(model)  # the bridge rewires the model it wraps: the plain pipelines get an untouched copy
        hooked = vlm_lens.load(model, processor=processor)
        size = testing.size_for("llava", kind).image_size
        from vlm_lens.zoo.samples import real_photos

        photos = real_photos()
        image = photos["chelsea"] if photos else testing.sample_image(0, size)
        return plain, hooked, image, "Please describe this image in detail.", f"random LLaVA ({kind})"
    from transformers import AutoModelForImageTextToText

    from vlm_lens.zoo import embedded_path
    from vlm_lens.zoo.samples import shapes_samples

    folder = embedded_path(kind)
    plain = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    hooked = vlm_lens.load(kind)
    sample = next(s for s in shapes_samples() if s["task"] == "caption")
    return plain, hooked, sample["path"], sample["question"], f"embedded {kind}"


def pipelines(plain, hooked, inputs, max_new_tokens: int):
    from vlm_lens.experiments.analysis import knowledge_evolution as ke
    from vlm_lens.probes import TokenTrajectory

    tok = hooked.tokenizer
    # no EOS: every pipeline generates exactly max_new_tokens tokens, so all three do the same work
    common = dict(eos_token_id=None, pad_token_id=tok.pad_token_id, suppress_tokens=hooked.placeholder_ids + [tok.eos_token_id])

    def floor():
        with torch.no_grad():
            return plain.generate(**inputs.model_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  output_hidden_states=True, return_dict_in_generate=True, **common).sequences  # fmt: skip

    def seed():
        return seed_pipeline.run(plain, inputs.model_inputs, max_new_tokens, **common)["generated_ids"]

    config = ke.EvolutionConfig(variants=("paper",), max_new_tokens=max_new_tokens)

    def ours():
        trace = hooked.trace_generation(inputs, max_new_tokens=max_new_tokens, stop_at_eos=False)
        evolution = ke.analyze_trace(trace, config=config)
        TokenTrajectory.from_lens_result(evolution.lens["paper"])  # the paper's candidate-token probabilities
        return trace.generated_ids

    return {"floor": floor, "seed": seed, "vlm_lens": ours}


def lens_throughput(hooked, rows: int = 2048, reps: int = 5) -> dict:
    """Projection rows/s through ``unembed`` (final norm + lm_head) vs a raw matmul of the same shape."""
    x = torch.randn(rows, hooked.d_model)
    weight = hooked.unembedder.head.weight.detach()

    def raw():
        return x @ weight.T

    def lens():
        return hooked.unembed(x)

    result = {}
    for name, fn in (("raw_matmul", raw), ("lens", lens)):
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    flops = 2 * rows * hooked.d_model * weight.shape[0]
    result["raw_gflops"] = flops / result["raw_matmul"] / 1e9
    result["lens_gflops"] = flops / result["lens"] / 1e9
    result["lens_vs_raw"] = result["raw_matmul"] / result["lens"]
    result["shape"] = [rows, hooked.d_model, int(weight.shape[0])]
    return result


def child(kind: str, pipeline: str, max_new_tokens: int) -> None:
    """Run one pipeline once in this process and print its memory figures as JSON."""
    plain, hooked, image, prompt, _ = build(kind)
    inputs = hooked.prepare(image, prompt)
    fn = pipelines(plain, hooked, inputs, max_new_tokens)[pipeline]
    import gc
    import threading

    gc.collect()
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page_mb

    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:  # the build's own high-water mark would hide the run's: poll RSS during the run
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_mb())
    print(json.dumps({"baseline_mb": base, "peak_mb": peak[0], "added_mb": peak[0] - base}))


def memory(kind: str, max_new_tokens: int) -> dict:
    out = {}
    for name in PIPELINES:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, name, "--max-new-tokens", str(max_new_tokens),
                               "--threads", str(torch.get_num_threads())],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {name} failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def bench(kind: str, reps: int, max_new_tokens: int, with_memory: bool) -> dict:
    plain, hooked, image, prompt, label = build(kind)
    inputs = hooked.prepare(image, prompt)
    fns = pipelines(plain, hooked, inputs, max_new_tokens)
    same = bool(torch.equal(fns["floor"]()[0, inputs.input_ids.shape[1]:].cpu(), fns["vlm_lens"]().cpu()))
    times = time_pipelines(fns, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in plain.parameters())
    result = {
        "model": label, "params_m": n_params / 1e6, "n_layers": hooked.n_layers, "vocab": hooked.d_vocab,
        "prompt_tokens": int(inputs.input_ids.shape[1]), "image_tokens": int(inputs.layout.image.sum()),
        "new_tokens": max_new_tokens, "reps": reps, "median_s": med, "times_s": times, "same_tokens": same,
        "ratios": {"vlm_lens_over_floor": med["vlm_lens"] / med["floor"], "seed_over_vlm_lens": med["seed"] / med["vlm_lens"]},
        "lens": lens_throughput(hooked),
    }  # fmt: skip
    if with_memory:
        mem = memory(kind, max_new_tokens)
        result["memory"] = mem
        result["ratios"]["vlm_lens_over_seed_memory"] = mem["vlm_lens"]["added_mb"] / max(mem["seed"]["added_mb"], 1e-9)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| model | prompt / image tokens | new tokens | floor: HF generate + hidden states (s) | seed pipeline (s) | vlm-lens analysis (s) | vlm-lens / floor | seed / vlm-lens | memory added: seed / vlm-lens (MB) | lens vs raw matmul |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median_s"]
        mem = r.get("memory")
        mem_cell = f"{mem['seed']['added_mb']:.0f} / {mem['vlm_lens']['added_mb']:.0f}" if mem else "–"
        lines.append(
            f"| {r['model']} ({r['params_m']:.0f}M, {r['n_layers']} layers, V={r['vocab']}) | {r['prompt_tokens']} / {r['image_tokens']} "
            f"| {r['new_tokens']} | {m['floor']:.2f} | {m['seed']:.2f} | {m['vlm_lens']:.2f} | {r['ratios']['vlm_lens_over_floor']:.2f}x "
            f"| {r['ratios']['seed_over_vlm_lens']:.2f}x | {mem_cell} | {r['lens']['lens_vs_raw']:.2f} ({r['lens']['lens_gflops']:.0f} vs {r['lens']['raw_gflops']:.0f} GFLOP/s) |"
        )  # fmt: skip
    return "\n".join(lines)


def write_docs(results: list[dict], command: str) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
               f"float32, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    body = (f"Measured with `{command}` on {machine}.\n\n{table(results)}\n\n<details><summary>raw numbers</summary>\n\n"
            f"```json\n{json.dumps(results, indent=1)}\n```\n</details>")  # fmt: skip
    write_block("performance.md", "bench", body, "## vlm-lens beside the seed pipeline")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="medium,shapes-llava", help="comma-separated: tiny, medium, shapes-llava, shapes-qwen2-vl")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/performance.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--backends", default=None, help="also compare the two backends on this random size (tiny, medium)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PIPELINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], args.child[1], args.max_new_tokens)
        return
    results = []
    if args.backends:
        print(f"backends on {args.backends} ...", flush=True)
        row = compare_backends.backends(args.backends, args.reps, args.max_new_tokens)
        print(compare_backends.backend_table(row), flush=True)
        if not args.no_write:
            compare_backends.write_backends(row, " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]))
    for kind in [k for k in args.models.split(",") if k]:
        print(f"benchmarking {kind} ...", flush=True)
        results.append(bench(kind, args.reps, args.max_new_tokens, not args.no_memory))
        print(table(results[-1:]), flush=True)
    if not results:
        return
    print(table(results))
    if not args.no_write:
        write_docs(results, " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
