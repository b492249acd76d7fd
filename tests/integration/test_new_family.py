"""Adding a model family costs one adapter file: a throw-away family registered from one file runs the family matrix.

``tests/fixtures/toy_family.py`` declares ``ToyLlavaForConditionalGeneration`` (an HF class vlm-lens has never seen)
in one :class:`~vlm_lens.adapters.AdapterSpec`. Registered through ``VLM_LENS_TEST_ADAPTERS``, it joins every test
that runs per family (hooks, caches, traces, both backends, batching, conventions, loading) with no other change.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests" / "fixtures" / "toy_family.py"


def test_a_family_declared_in_one_file_passes_the_family_matrix():
    env = {**os.environ, "VLM_LENS_TEST_ADAPTERS": str(TOY)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration",
                          "-k", "toy-llava", "-W", "ignore::UserWarning"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1)) if "passed" in summary else 0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "failed" not in summary and "skipped" not in summary and "error" not in summary, summary
    assert passed >= 20, summary  # every per-family test ran on the new family


def test_the_registry_is_the_one_family_list():
    from conftest import FAMILIES

    from vlm_lens import adapters, builders, testing

    assert FAMILIES == tuple(adapters.families(buildable=True)) == ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-next", "llava-onevision", "gemma3", "internvl", "idefics3", "smolvlm", "mistral3", "mllama", "glm4v")
    assert not hasattr(builders, "FAMILIES")  # no second list to keep in step
    assert testing.size_for("qwen2-vl").patch_size == testing.size_for("llava").patch_size // 2  # the adapter's rule
