"""The package's shape: no training history shipped, build-time recipes off the run-time import path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    files = [p for folder in ("vlm_lens", "probes", "experiments") for p in (ROOT / folder).rglob("*.py")]
    big = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big


def test_tests_are_sorted_by_kind():
    tests = ROOT / "tests"
    assert {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))} >= {"unit", "integration", "e2e"}
    assert not list(tests.glob("test_*.py"))  # every test file sits in one of them
