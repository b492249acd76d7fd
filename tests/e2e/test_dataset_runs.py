"""Dataset-scale runs: the store equals the in-memory analysis, batched equals one-at-a-time, a SIGKILLed run
resumes with no duplicates and no gaps, a store refuses another run, reports rebuild from the store alone, and every
input kind (manifest, folder, saved HF dataset, bad rows) goes through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embedded
from typer.testing import CliRunner

from vlm_lens.experiments import pipeline
from vlm_lens.experiments.analysis import knowledge_evolution as ke
from vlm_lens.experiments.cli import app
from vlm_lens.experiments.runs import store_analysis as store_report
from vlm_lens.experiments.runs.store import Store, StoreError

MODEL = "shapes-llava-prior"
VLM_LENS = [str(Path(sys.executable).parent / "vlm-lens")]  # the installed console script


def manifest_rows(n: int) -> list[dict]:
    """``n`` distinct (image, question, answer) rows over the bundled shapes-world images."""
    from vlm_lens.zoo.samples import shapes_samples

    base = shapes_samples()
    rows = []
    for i in range(n):
        s = base[i % len(base)]
        rows.append({"id": f"s{i:02d}", "image": str(s["path"]), "question": s["question"], "answer": s["answer"]})
    return rows


def write_manifest(folder: Path, n: int) -> Path:
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in manifest_rows(n)))
    return path


def numeric_equal(a, b, atol=1e-5) -> None:
    """Two store frames hold the same rows: exact for ids/evidence, within ``atol`` for float arrays."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        for x, y in zip(a[column], b[column]):
            if isinstance(x, (np.ndarray, list)) and len(x) and isinstance(np.asarray(x).flat[0], (float, np.floating)):
                np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=atol, err_msg=column)
            elif isinstance(x, float) and x == x:
                assert y == pytest.approx(x, abs=atol), column
            elif isinstance(x, (np.ndarray, list)):
                assert list(x) == list(y), column
            elif isinstance(x, bytes):
                continue  # thumbnails
            elif column in ("hallucination", "patch_map") and isinstance(x, str):  # JSON with floats
                _close(json.loads(x), json.loads(y), atol)
            else:
                assert (x == y) or (x != x and y != y) or (x is None and y is None), (column, x, y)


def _close(x, y, atol: float) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _close(x[k], y[k], atol)
    elif isinstance(x, list):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            _close(u, v, atol)
    elif isinstance(x, float):
        assert y == pytest.approx(x, abs=atol)
    else:
        assert x == y


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The main job's samples streamed into a store (batches of 4), and the in-memory analysis of the same."""
    model = embedded(MODEL)
    samples = pipeline.default_samples(model)
    out = tmp_path_factory.mktemp("streamed")
    result = pipeline.analyze(model, samples, out, png=False, tsne_iter=250, batch_size=4)
    live = ke.run(model, samples)
    return model, samples, out, result, live


def test_store_aggregate_equals_the_in_memory_analysis(streamed):
    model, samples, out, result, live = streamed
    agg, ref = result["data"]["aggregate"], live["aggregate"]
    for variant in ("correct", "paper"):
        for key in ("critical_layer", "mutation_layer", "event_critical_layer", "event_share", "stages", "token_kinds",
                    "stable_tokens", "mutation_tokens", "events"):  # fmt: skip
            assert agg[variant][key] == ref[variant][key], (variant, key)
        np.testing.assert_allclose(agg[variant]["median_js_adjacent"], ref[variant]["median_js_adjacent"], atol=1e-6)
    assert agg["accuracy"] == ref["accuracy"] == 0.6
    assert agg["correct"]["stages"]["mutation_layer"] == 7  # the planted block, found from the store
    # per-token numbers read back as pandas equal the live lens results
    tokens = store_report.frames(out / "store")["tokens"]
    for s in live["samples"][:3]:
        rows = tokens[(tokens.sample_id == s.name) & (tokens.variant == "correct")]
        stored = np.stack(rows["prob"].to_list()).T  # [layer, step]
        np.testing.assert_allclose(stored, s.lens["correct"]["prob"].numpy(), atol=1e-6)
    # the causal test's evidence travels with each token (both halves of the swap test)
    evidence = ("candidate", "candidate_leader", "confirmed", "swap_kept", "swap_tried", "swap_held", "leader_rank")
    tested = 0
    for s in live["samples"]:
        rows = tokens[(tokens.sample_id == s.name) & (tokens.variant == "correct")].sort_values("step")
        for row, token in zip(rows.itertuples(), s.tokens["correct"]):
            for field in evidence:
                value = getattr(row, field)
                assert (None if value is None or value != value else value) == getattr(token, field), (s.name, field)
            tested += token.swap_held is not None
    assert tested >= 4  # the planted samples' tokens and others carry a tested candidate


def test_batched_store_equals_one_at_a_time(streamed, tmp_path):
    model, samples, out, _, _ = streamed
    one = pipeline.analyze(model, samples, tmp_path, png=False, tsne_iter=250, batch_size=1, skip_sweep=False)
    assert one["data"]["aggregate"]["correct"]["events"] == streamed[3]["data"]["aggregate"]["correct"]["events"]
    a, b = store_report.frames(out / "store"), store_report.frames(tmp_path / "store")
    for table in ("samples", "tokens", "states"):
        numeric_equal(a[table], b[table])


def test_feature_clusters_from_the_store_equal_the_trace_path(streamed):
    from vlm_lens.experiments.analysis import feature_clusters

    model, samples, out, result, live = streamed
    stored = result["data"]["feature_clusters"]
    stages = live["aggregate"]["correct"]["stages"]
    traces = [s.trace for s in live["samples"]]
    ref = feature_clusters.run(traces, stages["critical_layer"], stages["mutation_layer"],
                               answers=[s.answer for s in live["samples"]], max_iter=250)  # fmt: skip
    np.testing.assert_allclose(stored["mean_cosine_per_layer"], ref["mean_cosine_per_layer"], atol=1e-6)
    np.testing.assert_allclose(stored["silhouette_per_layer"], ref["silhouette_per_layer"], atol=1e-5)
    assert stored["across"]["images_total"] == len(samples)
    # the paper variant projects HF's states (normed last layer) but its cosine and silhouette stay on the raw stream
    store = Store(out / "store")
    paper = store_report.feature_clusters(store, result["data"]["aggregate"], "paper", 250)
    ref_paper = feature_clusters.run(traces, stages["critical_layer"], stages["mutation_layer"], variant="paper",
                                     answers=[s.answer for s in live["samples"]], max_iter=250)  # fmt: skip
    np.testing.assert_allclose(paper["silhouette_per_layer"], ref_paper["silhouette_per_layer"], atol=1e-5)
    np.testing.assert_allclose(paper["silhouette_per_layer"], stored["silhouette_per_layer"], atol=1e-5)
    assert paper["across"]["tsne"] == ref_paper["across"]["tsne"], (paper["across"]["tsne"], ref_paper["across"]["tsne"])
    assert paper["across"]["tsne"]["features"] == "hf_hidden_states"
    # the one-image view: the stored (layer x token) features are the trace's, and projecting them is the probe's
    # projection (t-SNE coordinates themselves are not compared across batched/unbatched runs: 1e-7 input
    # differences can flip PCA-initialised t-SNE layouts)
    from vlm_lens.probes.geometry import FeatureProjection

    row = store_report.frames(out / "store")["single"].iloc[0]
    first = live["samples"][0].trace
    features = FeatureProjection().features(first)  # [layer 1..n, token, d]
    stack = torch.tensor(row["stack"], dtype=torch.float32).reshape(model.n_layers + 1, int(row["n_tokens"]), -1)
    torch.testing.assert_close(stack[1:], features, atol=1e-5, rtol=0)
    direct = FeatureProjection(max_iter=250)(first)
    again = FeatureProjection(max_iter=250).project_stack(FeatureProjection(drop_embedding=False).features(first),
                                                          direct.coords["token"], "token", model)  # fmt: skip
    torch.testing.assert_close(again["coords"], direct["coords"])


def test_report_rebuilds_from_the_store_without_the_model(streamed, tmp_path):
    _, _, out, result, _ = streamed
    paper = CliRunner().invoke(app, ["report", str(out / "store"), "--out", str(tmp_path / "paper"), "--no-png",
                                     "--variant", "paper", "--special-tokens"])  # fmt: skip
    assert paper.exit_code == 0, paper.output
    shown = json.loads((tmp_path / "paper" / "report.json").read_text())
    assert shown["shown_variant"] == "paper" and shown["shown_special"] and "tuned lens" not in paper.output
    run = CliRunner().invoke(app, ["report", str(out / "store"), "--out", str(tmp_path / "again"), "--no-png"])
    assert run.exit_code == 0, run.output
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    first = json.loads((out / "report.json").read_text())
    assert again["aggregate"] == first["aggregate"] and again["layer_skip"] == first["layer_skip"]
    assert again["samples"] == first["samples"] and again["hallucination"] == first["hallucination"]
    assert "10 samples (4 counter-prior questions)" in run.output
    for name in ("report.html", "report.json"):  # readable by others (umask 022), not mkstemp's 0600
        assert (tmp_path / "again" / name).stat().st_mode & 0o777 == 0o644 & ~_umask()
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a vlm-lens store" in bad.output
    from_out = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "from-out"), "--no-png"])
    assert from_out.exit_code == 0, from_out.output  # the --out folder a run wrote: its store is inside
    assert json.loads((tmp_path / "from-out" / "report.json").read_text())["aggregate"] == first["aggregate"]
    damaged = tmp_path / "damaged"  # a copy of the store with one shard and then run.json damaged
    shutil.copytree(out / "store", damaged)
    next((damaged / "tokens").glob("part-*")).write_bytes(b"garbage")
    run = CliRunner().invoke(app, ["report", str(damaged), "--out", str(tmp_path / "x"), "--no-png"])
    assert run.exit_code == 2 and "run the analysis again with --resume" in run.output
    (damaged / "run.json").write_text("{")
    run = CliRunner().invoke(app, ["report", str(damaged), "--out", str(tmp_path / "x"), "--no-png"])
    assert run.exit_code == 2 and "--overwrite" in run.output and not (tmp_path / "x" / "report.json").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(VLM_LENS + args, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_sigkill_mid_run_then_resume(tmp_path):
    """A run killed with SIGKILL loses at most its in-flight batch; --resume finishes it with no duplicates or gaps,
    the committed shards untouched, and the numbers equal an uninterrupted run's."""
    manifest = write_manifest(tmp_path, 12)
    store = tmp_path / "store"
    args = ["analyze", "--model", MODEL, "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--store",
            str(store), "--no-png", "--no-skip-sweep", "--batch-size", "1", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(VLM_LENS + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "samples").glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = Store(store).committed()
    assert 3 <= len(before) < 12, len(before)
    assert not (tmp_path / "out" / "report.json").exists()
    refused = _cli(args + ["--max-new-tokens", "5", "--resume"])  # another config: refused, store untouched
    assert refused.returncode == 2 and "cannot be resumed" in refused.stderr and "max_new_tokens" in refused.stderr
    exists = _cli(args)  # neither --resume nor --overwrite
    assert exists.returncode == 2 and "--resume" in exists.stderr
    resumed = _cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    after = Store(store).committed()
    assert sorted(after) == [f"s{i:02d}" for i in range(12)]  # no gaps
    assert all(after[sid] == part for sid, part in before.items())  # committed samples were not redone
    frames = store_report.frames(store)
    assert frames["samples"]["sample_id"].is_unique and len(frames["tokens"].groupby(["sample_id", "variant", "step"])) == len(frames["tokens"])
    fresh = tmp_path / "fresh"
    straight = _cli(["analyze", "--model", MODEL, "--manifest", str(manifest), "--out", str(fresh), "--no-png",
                     "--no-skip-sweep", "--batch-size", "3"])  # fmt: skip
    assert straight.returncode == 0, straight.stderr
    a, b = store_report.frames(store), store_report.frames(fresh / "store")
    for table in ("samples", "tokens", "states", "skip"):
        numeric_equal(a[table], b[table])
    _close(json.loads((tmp_path / "out" / "report.json").read_text())["aggregate"],
           json.loads((fresh / "report.json").read_text())["aggregate"], 1e-6)  # batches of 3 vs 1: float noise only


def test_store_refuses_another_model(tmp_path):
    from vlm_lens.experiments.runs import datasets, streaming

    source = datasets.from_manifest(write_manifest(tmp_path, 2))
    settings = streaming.StreamSettings()
    streaming.open_store(tmp_path / "s", embedded(MODEL), source, settings)
    with pytest.raises(StoreError, match="another run.*--overwrite"):
        streaming.open_store(tmp_path / "s", embedded("shapes-llava"), source, settings, resume=True)
    with pytest.raises(StoreError, match="--resume"):
        streaming.open_store(tmp_path / "s", embedded(MODEL), source, settings)
    manifest = tmp_path / "m.jsonl"  # --overwrite through the CLI starts the store afresh
    run = CliRunner().invoke(app, ["analyze", "--model", MODEL, "--manifest", str(manifest), "--store",
                                   str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--no-png", "--no-skip-sweep",
                                   "--overwrite"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert Store(tmp_path / "s").meta["model"]["name"] == MODEL and len(Store(tmp_path / "s").committed()) == 2
    clash = CliRunner().invoke(app, ["analyze", "--manifest", str(manifest), "--resume", "--overwrite"])
    assert clash.exit_code == 2 and "pass one" in clash.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a vlm-lens store"):
        streaming.open_store(tmp_path / "other", embedded(MODEL), source, settings)


def test_bad_rows_stop_the_run_or_are_recorded(tmp_path):
    rows = manifest_rows(3)
    rows.insert(1, {"id": "gone", "image": "missing.png", "question": "what color is the circle ?"})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append({"id": "broken", "image": "broken.png", "question": "what color is the circle ?"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["analyze", "--model", MODEL, "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--no-png",
            "--no-skip-sweep"]  # fmt: skip
    stopped = CliRunner().invoke(app, base)
    assert stopped.exit_code == 2 and "m.jsonl:2" in stopped.output and "--skip-bad" in stopped.output
    skipped = CliRunner().invoke(app, base + ["--skip-bad"])
    assert skipped.exit_code == 0, skipped.output
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [b["sample"] for b in data["store"]["bad"]] == ["gone", "broken"]
    assert data["store"]["analysed"] == 3 and "2 unreadable rows recorded" in skipped.output
    frame = store_report.frames(tmp_path / "out" / "store")["samples"]
    assert list(frame["sample_id"]) == ["s00", "gone", "s01", "s02", "broken"]  # in manifest order, none dropped


def test_folder_and_hf_dataset_inputs_through_the_cli(tmp_path):
    import datasets as hf
    from PIL import Image

    rows = manifest_rows(3)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, r in enumerate(rows):
        Image.open(r["image"]).save(folder / ("sub" if i else "") / f"img{i}.png")
    run = CliRunner().invoke(app, ["analyze", "--model", MODEL, "--image", str(folder), "--prompt", "what color is the "
                                   "circle ?", "--out", str(tmp_path / "f"), "--no-png", "--no-skip-sweep"])  # fmt: skip
    assert run.exit_code == 0, run.output
    names = [s["name"] for s in json.loads((tmp_path / "f" / "report.json").read_text())["samples"]]
    assert names == ["img0.png", "sub/img1.png", "sub/img2.png"]
    ds = hf.Dataset.from_dict({"img": [r["image"] for r in rows], "q": [r["question"] for r in rows],
                               "truth": [r["answer"] for r in rows]}).cast_column("img", hf.Image())  # fmt: skip
    hf.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "ds"))
    base = ["analyze", "--model", MODEL, "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "d"), "--no-png",
            "--no-skip-sweep", "--batch-size", "2"]  # fmt: skip
    ambiguous = CliRunner().invoke(app, base)
    assert ambiguous.exit_code == 2 and "--split" in ambiguous.output
    unnamed = CliRunner().invoke(app, base + ["--split", "test"])
    assert unnamed.exit_code == 2 and "--question-column" in unnamed.output and "truth" in unnamed.output
    run = CliRunner().invoke(app, base + ["--split", "test", "--image-column", "img", "--question-column", "q",
                                          "--answer-column", "truth"])  # fmt: skip
    assert run.exit_code == 0, run.output
    data = json.loads((tmp_path / "d" / "report.json").read_text())
    assert [s["answer"] for s in data["samples"]] == [r["answer"] for r in rows]
    assert data["aggregate"]["accuracy"] is not None and "3 samples" in run.output
    both = CliRunner().invoke(app, ["analyze", "--manifest", str(tmp_path / "x.jsonl"), "--dataset", str(tmp_path)])
    assert both.exit_code == 2 and "pass one of" in both.output


def test_no_ray_import_without_workers(tmp_path):
    code = ("import sys, vlm_lens; from vlm_lens.experiments import pipeline; m = vlm_lens.load('shapes-llava-prior');"
            f"pipeline.analyze(m, pipeline.default_samples(m)[:2], {str(tmp_path)!r}, png=False, skip_sweep=False,"
            " tsne_iter=250); print('ray' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_default_threads_leave_busy_cores_alone():
    from vlm_lens.experiments.cli.analyze import default_threads

    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_threads() <= cores


def test_a_second_run_cannot_write_a_store_being_written(tmp_path):
    """Two runs sharing --out would delete or mix into each other's shards: the second is refused while the first
    holds the store, and may go on once it is released."""
    code = ("import sys, time; from vlm_lens.experiments.runs.store import Store;"
            "s = Store.create(sys.argv[1], {'name': 'm'}, {}, {'fingerprint': 'f'}); print('HELD', flush=True); time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(StoreError, match="being written by another run .pid"):
            Store.create(tmp_path / "store", {"name": "m"}, {}, {"fingerprint": "f"}, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    Store.create(tmp_path / "store", {"name": "m"}, {}, {"fingerprint": "f"}, overwrite=True)  # free again


def test_a_torn_shard_is_uncommitted_and_resume_redoes_it(tmp_path):
    """A power loss can leave a committed shard's parts empty, truncated or corrupted (the rename survived, the data
    did not). Such a shard is not committed: the report refuses the store naming the fix, and --resume redoes exactly
    those samples; the result equals an uninterrupted run."""
    manifest = write_manifest(tmp_path, 5)
    common = ["--model", MODEL, "--manifest", str(manifest), "--no-png", "--no-skip-sweep", "--batch-size", "1",
              "--threads", "1"]  # fmt: skip
    straight = CliRunner().invoke(app, ["analyze", *common, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output
    out, store = tmp_path / "torn", tmp_path / "torn" / "store"
    first = CliRunner().invoke(app, ["analyze", *common, "--out", str(out)])
    assert first.exit_code == 0, first.output
    committed = Store(store).committed()
    parts = sorted(set(committed.values()))
    tokens = store / "tokens" / f"{parts[1]}.parquet"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])  # truncated
    states = store / "states" / f"{parts[2]}.parquet"
    states.write_bytes(b"\0" * states.stat().st_size)  # same size, zeroed: no footer
    (store / "samples" / f"{parts[3]}.parquet").write_bytes(b"")  # the commit itself emptied
    torn = sorted(Store(store).torn())
    assert torn == sorted(parts[1:4]), torn
    assert len(Store(store).committed()) == 2
    refused = CliRunner().invoke(app, ["report", str(store), "--out", str(tmp_path / "r"), "--no-png"])
    assert refused.exit_code == 2 and "not durably committed" in refused.output and "--resume" in refused.output
    resumed = CliRunner().invoke(app, ["analyze", *common, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    after = Store(store).committed()
    assert sorted(after) == sorted(committed) and all(after[s] == committed[s] for s in committed if committed[s] in (parts[0], parts[4]))
    a, b = store_report.frames(store), store_report.frames(tmp_path / "straight" / "store")
    for table in ("samples", "tokens", "states"):
        numeric_equal(a[table], b[table])


def test_a_column_newer_parts_carry_reads_as_missing_from_older_parts(tmp_path):
    """A store column added by a later version (patch_map) is absent from parts an older version wrote: reading it
    gives nothing for those rows, not an error."""
    import math

    store = Store.create(tmp_path / "store", {"name": "m"}, {}, {"fingerprint": "f"})
    old = {"sample_id": "a", "index": 0, "status": "ok"}  # no patch_map: an older writer
    store.write_shard("w", {"samples": [old]})
    store.write_shard("w", {"samples": [{**old, "sample_id": "b", "index": 1, "patch_map": "{\"token\": \"red\"}"}]})
    frame = store.frame("samples", ["index", "patch_map"])
    values = dict(zip(frame["sample_id"], frame["patch_map"]))
    assert values["b"] == "{\"token\": \"red\"}" and (values["a"] is None or math.isnan(values["a"]))
