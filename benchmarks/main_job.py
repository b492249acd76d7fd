"""The main job (``vlm-lens analyze`` on the embedded default model) as a researcher runs it: whole processes, phase by phase.

    python benchmarks/main_job.py                          # 5 runs without and 5 with PNG export; docs/performance.md
    python benchmarks/main_job.py --before /tmp/oldpkg     # also a checkout of an earlier version, interleaved

Each run is a fresh ``python -m vlm_lens.experiments.cli analyze --timings`` (start-up and imports included); runs of
the configurations are interleaved, and the table gives each phase's median over ``--runs``. ``--before DIR`` puts
DIR first on ``PYTHONPATH`` (a folder holding a complete ``vlm_lens`` package of another version, instrumented with
``--timings``) and runs it beside this checkout. The last row is the same job in one Python process that has
loaded the model (``pipeline.analyze``, after one warm-up run): the notebook loop, imports and loading paid once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\s+(.+?)\s+(\d+\.\d+) s$")


def run_once(pythonpath: str | None, png: bool) -> dict[str, float]:
    """Phase -> seconds of one whole-process run (and ``wall``: the process's own wall time)."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "vlm_lens.experiments.cli", "analyze", "--out", out, "--timings",
                   "--png" if png else "--no-png"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out, timeout=600)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    phases = {m.group(1): float(m.group(2)) for m in map(LINE.match, lines[lines.index("Timings (wall clock):") + 1 :]) if m}
    return {**phases, "wall": wall}


def warm_child(runs: int) -> None:
    """In this process: load the default model once, run ``pipeline.analyze`` once to warm up, then ``runs`` times;
    prints the seconds of each as JSON (the notebook loop: imports and loading paid once)."""
    import vlm_lens
    from vlm_lens.experiments import pipeline

    model = vlm_lens.load(pipeline.DEFAULT_ANALYSIS_MODEL)
    samples = pipeline.default_samples(model)
    seconds = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(runs + 1):
            start = time.perf_counter()
            pipeline.analyze(model, samples, out, png=False)
            seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds[1:]))


def run_warm(pythonpath: str | None, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    done = subprocess.run([sys.executable, __file__, "--warm-child", str(runs)], capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir(), timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"warm child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", default=None, help="a folder holding another version's vlm_lens package")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="also time runs with --png")
    parser.add_argument("--warm-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_child is not None:
        warm_child(args.warm_child)
        return
    configs = [("this version", None, False), ("this version, --png", None, True)]
    if args.before:
        configs = [("before", args.before, False), ("before, with PNG (its default)", args.before, True)] + configs
    configs = [c for c in configs if args.png or not c[2]]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in configs}
    for _ in range(args.runs):
        for label, path, png in configs:
            runs[label].append(run_once(path, png))
            print(label, json.dumps(runs[label][-1]), flush=True)
    phases = list(dict.fromkeys(p for rows in runs.values() for row in rows for p in row if p != "wall"))
    lines = ["| phase | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for phase in phases:
        cells = [f"{statistics.median(r.get(phase, 0.0) for r in rows):.2f}" for rows in runs.values()]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    warm = {label: run_warm(path, args.runs) for label, path, png in configs if not png}
    lines.append("| in a session with the model loaded (`pipeline.analyze`, no PNG) | " + " | ".join(
        f"{statistics.median(warm[label]):.2f}" if label in warm else "–" for label in runs) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        import torch

        sys.path.insert(0, str(ROOT))  # only here: a --before child must import vlm_lens from its own PYTHONPATH
        from benchmarks.docs_blocks import write_block

        command = "python benchmarks/main_job.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        body = (f"Measured with `{command.strip()}` on {platform.machine()}, {os.cpu_count()} cores, torch "
                f"{torch.__version__}, {time.strftime('%Y-%m-%d')}: seconds, median of {args.runs} whole-process runs "
                f"each, interleaved.\n\n{table}\n\n<details><summary>raw numbers</summary>\n\n```json\n"
                f"{json.dumps({'processes': runs, 'in_session': warm}, indent=1)}\n```\n</details>")  # fmt: skip
        write_block("performance.md", "main-job", body, "## The main job")


if __name__ == "__main__":
    main()
