"""Keep the benchmark script from rotting: one repetition on the tiny model (no timing assertions)."""

import torch

from benchmarks import run, seed_pipeline
from vlm_lens.probes.metrics import js_divergence


def test_benchmark_smoke(capsys):
    run.main(["--models", "tiny", "--reps", "1", "--max-new-tokens", "3", "--no-memory", "--no-write", "--backends", "tiny"])
    out = capsys.readouterr().out
    assert "random LLaVA (tiny)" in out and "vlm-lens / floor" in out and "nnsight / bridge" in out


def test_seed_js_is_the_paper_variant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.allclose(seed_pipeline.authors_js(a, b), js_divergence(a.double(), b.double(), variant="paper"))


def test_dataset_benchmark_smoke(capsys):
    from benchmarks import dataset_runs

    dataset_runs.main(["--memory", "shapes-llava-prior:2", "--throughput", "shapes-llava-prior:2", "--new-tokens", "3",
                       "--batch-size", "2", "--no-write"])  # fmt: skip
    out = capsys.readouterr().out
    assert "peak RSS" in out and "batched / per-sample" in out and "| shapes-llava-prior | 2 |" in out


def test_suite_validation_benchmark_smoke(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from benchmarks import suite_validation

    suite_validation.main(["--n", "3", "--fixtures", "llava-single", "--cost-n", "2", "--reps", "1", "--no-write"])
    out = capsys.readouterr().out
    assert "llava-single (single, decoder [7])" in out and "extra forwards / trace" in out


def test_patch_localization_smoke(capsys):
    from benchmarks import patch_localization

    patch_localization.main(["--n", "2", "--no-write"])
    out = capsys.readouterr().out
    assert "**shapes-llava** (2 fresh images" in out and "| pointing, colour word |" in out and "chance 0.11" in out


def test_prefix_reuse_benchmark_smoke(capsys):
    from benchmarks import prefix_reuse

    prefix_reuse.main(["--sweep-models", "shapes-llava-prior", "--reps", "1", "--shared", "", "--no-write"])
    out = capsys.readouterr().out
    assert "| shapes-llava-prior | all | " in out and "| True |" in out  # the prefix sweep equals the naive one


def test_main_job_benchmark_smoke(capsys):
    """Runs `vlm-lens analyze --timings` as a whole process and reads its phase lines back."""
    from benchmarks import main_job

    main_job.main(["--runs", "1", "--no-png", "--no-write"])
    out = capsys.readouterr().out
    assert "| tracing | " in out and "| loading the model | " in out and "| total | " in out and "in a session" in out


def test_family_matrix_benchmark_smoke(capsys):
    from benchmarks import family_matrix

    body = family_matrix.main(["--families", "llava", "--no-write"])
    assert "| llava | transformer_lens | " in body and "| llava | nnsight | " in body
    assert "every greedy generation equal to HF's" in body and "False" not in body


def test_decoding_benchmark_resumes_from_its_rows(tmp_path, monkeypatch):
    """decoding_scores --rows: scored models are appended as JSON lines and read back, not scored again; a row cut
    off by a killed run is scored again."""
    import json

    from benchmarks import decoding_scores

    rows_file = tmp_path / "rows.jsonl"
    first = decoding_scores.rows_for(2, ["llava-single"], rows_file)
    assert [r["model"] for r in first] == ["llava-single"] and first[0]["n"] == 2
    assert set(first[0]["methods"]) == set(decoding_scores.METHODS)
    with rows_file.open("a") as f:
        f.write('{"model": "llava-end", "n": 2, "meth')  # a killed run's last line

    def refuse(*args):
        raise AssertionError("a saved model was scored again")

    monkeypatch.setattr(decoding_scores, "score_model", refuse)
    again = decoding_scores.rows_for(2, ["llava-single"], rows_file)
    assert again == [json.loads(rows_file.read_text().splitlines()[0])]
    assert "| dev | 1 |" in decoding_scores.render(again, {})
