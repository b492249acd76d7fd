"""The package's shape: no training history shipped, build-time recipes off the run-time import path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_training_history_in_the_package():
    tracked = subprocess.run(["git", "ls-files", "vlm_lens/zoo/checkpoints"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout.strip() == ""
    assert not list((ROOT / "vlm_lens" / "zoo").glob("models/*/optimizer*"))


def test_run_time_never_imports_the_recipes():
    code = (
        "import sys, vlm_lens\n"
        "from vlm_lens.experiments import pipeline\n"
        "model = vlm_lens.load('shapes-llava-prior')\n"
        "samples = pipeline.default_samples(model)\n"
        "model.trace_generation(model.prepare(samples[-1].image, samples[-1].prompt), max_new_tokens=2)\n"
        "print(sorted(m for m in sys.modules if m.startswith('vlm_lens.zoo.recipe')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_python_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "experiments").glob("*.py")
           if (n := len(p.read_text().splitlines())) > 400}  # fmt: skip
    assert not big, big
