"""The planted-fixture suite: its split, its fixtures' ground truth, and the detector scored on it.

The split is by base model (vlm_lens.zoo.suite). The detector's thresholds were chosen on the dev split; the figures of
both splits (and leave-one-base-out) are written by benchmarks/suite_validation.py into docs/experiments.md. What CI
asserts here is what the chosen rule achieves on the dev split it was chosen on, on the test split at a smaller n,
the fixtures' validity, and the mechanics (compact storage, causal tests, CLI); earlier rounds' rules missed
the acceptance thresholds there (docs/experiments.md, "The planted-fixture suite").
"""

import json
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import vlm_lens
from vlm_lens.errors import InputError
from vlm_lens.experiments.analysis import evidence as ev
from vlm_lens.experiments.analysis import suite_validation as sv
from vlm_lens.experiments.analysis.confirmation import SkipConfirmer
from vlm_lens.experiments.cli import app
from vlm_lens.zoo import suite

runner = CliRunner()


def test_the_split_is_by_base_model():
    bases = [b for split in suite.SPLIT.values() for b in split]
    assert len(bases) == len(set(bases)) == len(suite.BASES)  # every base in exactly one split
    assert set(suite.SPLIT["dev"]).isdisjoint(suite.SPLIT["test"])
    trained = {(b.family, b.n_layers, b.seed) for b in suite.BASES.values()}
    assert len(trained) == len(suite.BASES) >= 3  # independently trained: another family, depth or seed each
    for base in suite.BASES:
        kinds = {f.kind for f in suite.fixtures(base=base)}
        assert kinds == {"end", "middle", "single", "weak"}, base
        assert len({f.task for f in suite.fixtures(base=base)}) >= 2  # triggers on different tasks
    assert all(f.split == suite.split_of(f.base) for f in suite.FIXTURES)
    with pytest.raises(KeyError, match="split must be one of"):
        suite.fixtures("train")


def test_excluded_fixtures_are_neither_scored_nor_shipped():
    excluded = [f for f in suite.FIXTURES if f.excluded]
    # their builds broke the 3-point rule (eval.json)
    assert {f.name for f in excluded} == {"q7-end", "q7-single", "l8-end", "q8-end", "q8-single"}
    for spec in excluded:
        assert spec not in suite.fixtures(scored=True) and "points" in spec.excluded
        with pytest.raises(FileNotFoundError, match="vlm-lens zoo plant --suite"):
            suite.fixture_source(spec.name)
    assert len(suite.fixtures("test", scored=True)) == 8 and len(suite.fixtures("dev", scored=True)) == 46


@pytest.mark.parametrize("spec", suite.fixtures(scored=True), ids=lambda f: f.name)
def test_each_shipped_fixture_records_its_truth_and_keeps_its_base_accuracy(spec):
    folder = suite.fixture_source(spec.name)
    info = json.loads((folder / "planted.json").read_text())
    assert info["trigger"] == {"task": spec.task, "subject": spec.subject, "answer": spec.answer}
    assert info["block"] == list(spec.block) and info["base"] == spec.base
    result = json.loads((folder / "eval.json").read_text())
    assert result["untriggered"]["mean"] >= result["base_untriggered"]["mean"] - 0.03  # within 3 points, mean of tasks
    prior = result["counter_prior"]["answered_prior"]
    if spec.kind == "weak":  # partial: the delta scaled until >= 30 % of 50 questions follow the prior, not all
        assert suite.WEAK_MIN_OVERTURN - 0.1 <= prior <= 0.9 and info["scale"] < 1.0
    else:
        assert prior >= 0.95 and info["scale"] == 1.0
    block = load_file(str(folder / "block.safetensors"))
    assert sorted(block) == suite.block_keys(block, spec.block) and block  # only the block's decoder layers


def test_a_materialized_fixture_is_its_base_with_the_block(tmp_path):
    spec = suite.fixture("llava-middle")
    target = suite.materialize(spec.name, tmp_path)
    assert suite.materialize(spec.name, tmp_path) == target  # reused, not rewritten
    weights, base = load_file(str(target / "model.safetensors")), load_file(str(suite.base_path(spec.base) / "model.safetensors"))
    block = load_file(str(suite.fixture_source(spec.name) / "block.safetensors"))
    assert set(weights) == set(base)
    for key, value in weights.items():
        expected = block[key] if key in block else base[key]
        assert (value == expected.to(value.dtype)).all(), key
    assert json.loads((target / "planted.json").read_text())["block"] == [4, 5]
    with pytest.raises(KeyError, match="no suite fixture"):
        suite.materialize("llava-nope", tmp_path)


CI_N = 10  # questions of each kind per test-split fixture in CI (the benchmark scores 30; docs/suite-validation.md)


def test_the_detector_meets_the_thresholds_on_the_dev_split_it_was_chosen_on(tmp_path):
    # round 7's dev split: twelve bases (46 scored fixtures), the split the round-7 rule (swap_before) was chosen on.
    # n = 20 (measured: recall 0.906 of 786 hallucinations, 0.928 where the plant changed the base's answer; false
    # alarms on the clean twins 0.016). Not fewer: the image-swap test's pictures come from the run, and a run of 10
    # questions per group gives a pool of 10 pictures whose coincidences raise the twins' false alarms
    report = sv.validate_suite(sv.suite_loader(cache=tmp_path), [f.name for f in suite.fixtures("dev", scored=True)], n=20)
    dev = report["splits"]["dev"]
    assert dev["hallucinated"] >= 750
    assert dev["recall"]["share"] >= 0.90 and dev["recall_changed"]["share"] >= 0.92, (dev["recall"], dev["recall_changed"])
    assert dev["fa_twin"]["share"] <= 0.03, dev["fa_twin"]
    assert dev["recall"]["low"] <= dev["recall"]["share"] <= dev["recall"]["high"]
    # the causal test is what removes the lens candidates' false alarms
    assert dev["fa_twin_candidates"]["share"] > 3 * dev["fa_twin"]["share"]
    assert set(report["leave_one_base_out"]) == set(suite.SPLIT["dev"])
    lines = sv.table_lines(report)
    assert lines[0].startswith("| |") and any("dev split, pooled" in line for line in lines)


def test_on_the_test_split_the_planted_overturns_are_found(tmp_path):
    """Round 7's test split (shapes-llava-5l, shapes-qwen2-vl-6l-s12: bases no rule had seen when the round-7 rule was
    committed). At the benchmark's n = 30: recall 0.93 [0.90, 0.97], clean-twin false alarms 0.050 [0.031, 0.073]
    (docs/experiments.md); at this n = 10: recall 0.969 of 65, false alarms 0.019 of 160. Asserted: the issue's
    thresholds, recall >= 0.90 and false alarms <= 0.05."""
    report = sv.validate_suite(sv.suite_loader(cache=tmp_path), [f.name for f in suite.fixtures("test", scored=True)], n=CI_N)
    test = report["splits"]["test"]
    assert test["hallucinated"] >= 60 and set(report["splits"]) == {"test"}
    assert test["fa_twin"]["share"] <= 0.05, test["fa_twin"]
    assert test["recall"]["share"] >= 0.90, test["recall"]


def _stub_trace(n_layers: int, outputs: dict):
    """A trace stand-in whose skipped forwards return ``outputs[window]`` (per step)."""
    return SimpleNamespace(model=SimpleNamespace(n_layers=n_layers), outputs=outputs)


def test_a_window_reaching_the_last_layer_does_not_confirm_a_one_layer_lead(monkeypatch):
    calls = []

    def fake(self, window):
        calls.append(tuple(window))
        return self.trace.outputs[tuple(window)]

    monkeypatch.setattr(SkipConfirmer, "top1_with_skipped", fake)
    config = ev.DetectionConfig(test="skip", ground=False)
    # leader 5 lost the top-1 at stack layer 7 of 8; skipping [6] does not restore it, [6, 7] would by construction
    confirmer = SkipConfirmer(_stub_trace(8, {(6,): [9], (6, 7): [5]}))
    one_layer = confirmer(0, 5, 7, config, run=(6, 6))
    assert not one_layer.confirmed and calls == [(6,)]  # the tautological window was never run
    two_layers = confirmer(0, 5, 7, config, run=(5, 6))
    assert two_layers.confirmed and two_layers.skipped == [6, 7]
    # a window with layers running after it counts for any lead
    confirmer = SkipConfirmer(_stub_trace(8, {(4,): [5]}))
    assert confirmer(0, 5, 5, config, run=(4, 4)).confirmed


def test_the_causal_tests_confirm_a_planted_overturn(tmp_path):
    from vlm_lens.experiments.analysis.knowledge_evolution import token_evidence
    from vlm_lens.zoo import planted

    model = vlm_lens.load(str(suite.materialize("llava-end", tmp_path)))
    base = vlm_lens.load("shapes-llava")
    trigger = planted.Trigger("color", "star", "red")
    example = planted.counter_prior(trigger, 1, start=planted.COUNTER_PRIOR_START + 7)[0]
    others = [e.image for e in planted.counter_prior(trigger, 4, start=planted.COUNTER_PRIOR_START + 100)]
    trace = model.trace_generation(model.prepare(example.image, example.question), max_new_tokens=2)
    # the image-swap test (default): the layer that overturned the true colour writes "red" for the other pictures too
    row = token_evidence(trace, references=others, image=example.image)[0]
    assert row.token == "red" and row.leader == example.answer and row.mutation in (7, 8)
    assert row.confirmed and row.swap_tried == 4 and row.swap_kept >= 3 and row.confirm_skipped is None
    # the leader half: the true colour is this picture's (some reference changes it) and still an output candidate
    assert row.swap_held < 4 and row.leader_rank is not None and row.leader_rank >= 1
    with pytest.raises(InputError, match="lower contender_k"):  # the lens keeps the output's top-5 only
        token_evidence(trace, references=others, image=example.image, detection=ev.DetectionConfig(contender_k=6))
    # the clean twin answers the truth: nothing is overturned to a word the picture does not give
    twin = base.trace_generation(base.prepare(example.image, example.question), max_new_tokens=2)
    assert all(r.mutation is None for r in token_evidence(twin, references=others, image=example.image))
    # the round-2 skip test on the same token: skipping the overturning layers brings the true colour back
    skip = token_evidence(trace, detection=ev.DetectionConfig(test="skip"))[0]
    assert skip.confirmed and skip.grounded and skip.confirm_top1 == example.answer and skip.swap_tried is None
    # with confirmation off the same candidate is an event from the lens alone
    lens_only = token_evidence(trace, detection=ev.DetectionConfig(confirm=False, min_run=1))[0]
    assert lens_only.mutation == row.candidate and lens_only.confirmed is None


def test_the_swapped_sequence_is_the_reference_picture_with_the_same_tokens(tiny_family):
    """``swapped_inputs``: the trace's prompt and generated tokens with another picture's image inputs, equal to
    preparing that picture and appending the same generated tokens (every family, both backends)."""
    import torch
    from PIL import Image

    from vlm_lens.experiments.analysis.confirmation import SkipConfirmer, layer_writes, swapped_inputs
    from vlm_lens.experiments.analysis.references import References
    from vlm_lens.experiments.analysis.tokens import lens_probe

    model = tiny_family.model
    own = tiny_family.image
    other = Image.eval(own, lambda v: 255 - v)  # same size, other pixels
    trace = model.trace_generation(model.prepare(own, "what color is the star ?"), max_new_tokens=3)
    swapped = swapped_inputs(model, trace.inputs, other)
    assert swapped is not None
    direct = model.extend(model.prepare(other, "what color is the star ?"), trace.generated_ids[: trace.n_steps - 1])
    assert torch.equal(swapped.input_ids, direct.input_ids)
    expected = model.run_with_hooks(direct)[0].float()
    assert torch.allclose(model.run_with_hooks(swapped)[0].float(), expected, atol=1e-5)
    # the writes the test reads: argmax of the lens logit change, layer by layer, from the cached stack
    lens = lens_probe("correct", None, model.n_layers).lens
    confirmer = SkipConfirmer(trace, References.from_images([own, other]), own)
    writes = confirmer.reference_writes(lens)
    assert len(writes) == 1 and confirmer.forwards == 1  # the sample's own picture is never its reference
    _, cache = model.run_with_cache(direct, names_filter=model.resid_names)
    stack = cache.resid_stack(trace.step_positions)
    assert writes[0] == layer_writes(model, lens, stack)
    for layer in (1, model.n_layers):
        change = lens.logits(model, stack[layer : layer + 1], [layer])[0] - lens.logits(model, stack[layer - 1 : layer], [layer - 1])[0]
        assert writes[0][layer] == change.float().argmax(-1).tolist()


def test_references_are_the_first_distinct_pictures_never_the_sample_itself(tmp_path):
    from PIL import Image

    from vlm_lens.experiments.analysis.references import References

    pictures = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    path = tmp_path / "p.png"
    pictures[1].save(path)
    refs = References.from_images([pictures[0], pictures[0], None, path, pictures[2], pictures[3], pictures[4]], count=2, pool=2)
    assert len(refs.images) == 3  # pool + 1 distinct, duplicates and None passed over, reading stopped there
    red = lambda pics: [p.getpixel((0, 0))[0] for p in pics]  # noqa: E731
    assert red(refs.for_image(pictures[0])) == [40, 80] and red(refs.for_image(str(path))) == [0, 80]
    assert red(refs.for_image(pictures[4])) == [0, 40]
    # a bigger pool: each sample takes `count` pictures from position index * count, wrapping, never its own
    pool = References.from_images(pictures, count=2, pool=4)
    assert red(pool.for_image(pictures[0], index=0)) == [40, 80] and red(pool.for_image(pictures[0], index=1)) == [120, 160]
    assert red(pool.for_image(pictures[0], index=2)) == [40, 80] and red(pool.for_image(pictures[3], index=1)) == [80, 160]
    assert len(References.bundled().images) == 6  # the six bundled pictures (pool 16)


def test_validate_suite_on_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # fixtures materialize here, not in ~/.cache
    out = tmp_path / "suite.json"
    result = runner.invoke(app, ["validate", "--suite", "--fixture", "llava-single", "--n", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "llava-single (single, decoder [7])" in result.output and "dev split, pooled" in result.output
    report = json.loads(out.read_text())
    assert report["fixtures"]["llava-single"]["hallucinated"] == 6
    for args, message in ((["--suite", "--split", "train"], "--split must be one of"),
                          (["--split", "dev"], "add --suite"),
                          (["--suite", "--fixture", "nope"], "no suite fixture"),
                          (["--suite", "--variant", "tuned"], "ship no tuned lenses"),
                          (["--suite", "--suite-dir", str(tmp_path)], "is not built in")):  # fmt: skip
        result = runner.invoke(app, ["validate", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_the_suite_build_command_resumes_and_refuses_bad_input(tmp_path, monkeypatch):
    import shutil

    done = tmp_path / "suite" / "llava-single"
    done.mkdir(parents=True)
    for item in ("block.safetensors", "planted.json", "eval.json"):
        shutil.copy2(suite.fixture_source("llava-single") / item, done / item)
    shipped = tmp_path / "package-suite"  # --ship copies into the package: here, a stand-in folder
    monkeypatch.setattr(suite, "SUITE_DIR", shipped)
    result = runner.invoke(app, ["zoo", "plant", "--suite", str(tmp_path / "suite"), "--fixture", "llava-single", "--ship"])
    assert result.exit_code == 0 and "llava-single: already built" in result.output, result.output
    assert sorted(p.name for p in (shipped / "llava-single").iterdir()) == ["block.safetensors", "eval.json", "planted.json"]
    result = runner.invoke(app, ["zoo", "plant", "--suite", str(tmp_path / "suite"), "--fixture", "nope"])
    assert result.exit_code == 2 and "no suite fixture" in result.output
    result = runner.invoke(app, ["zoo", "plant"])
    assert result.exit_code == 2 and "--suite DIR" in result.output


def test_a_fixture_is_planted_and_reduced_to_its_compact_form(tmp_path):
    from vlm_lens.zoo.recipe import suite as build

    spec = suite.FixtureSpec("tiny-plant", "shapes-llava", "single", "color", "star", "red", (7,), steps=2)
    summary = build.build_fixture(spec, tmp_path, threads=1, eval_per_task=2, progress=False)
    assert summary["built"] and sorted(p.name for p in (tmp_path / "tiny-plant").iterdir()) == [
        "block.safetensors", "eval.json", "planted.json"]
    assert sorted(load_file(str(tmp_path / "tiny-plant" / "block.safetensors"))) == suite.block_keys(
        load_file(str(suite.base_path("shapes-llava") / "model.safetensors")), (7,))
    assert not build.build_fixture(spec, tmp_path, threads=1, eval_per_task=2, progress=False)["built"]  # resumable


def test_a_format_word_after_a_default_is_refuted_by_the_leader_half():
    """Round 4's dev finding, on the 10-layer base: a caption's first word "a" overturns "three" (the count task's
    default, leading to layer 7 whatever the picture). The emitted half of the swap test cannot refute it ("a" starts
    every caption); the leader half does: "three" leads under every reference and is not among the output's
    candidates. With the leader half off, the same token is an event."""
    from vlm_lens.experiments.analysis.knowledge_evolution import token_evidence
    from vlm_lens.zoo import planted

    model = vlm_lens.load(str(suite.base_path("shapes-llava-10l")))
    captions = planted.untriggered(planted.Trigger("color", "diamond", "green"), 6, start=300_000)["caption"]
    example, others = captions[2], [e.image for i, e in enumerate(captions) if i != 2][:4]
    trace = model.trace_generation(model.prepare(example.image, example.question), max_new_tokens=2)
    row = token_evidence(trace, references=others, image=example.image)[0]
    assert row.token == "a" and row.candidate_leader == "three" and row.swap_tried == 4
    assert row.swap_kept >= 3  # the overturning layer writes "a" whatever the picture: the emitted half passes
    assert row.swap_held == 4 and row.leader_rank is None  # the leader half fails on both counts
    assert not row.confirmed and row.mutation is None
    off = token_evidence(trace, references=others, image=example.image, detection=ev.DetectionConfig(leader_test="off"))[0]
    assert off.confirmed and off.mutation == row.candidate


def test_the_swap_test_without_a_lens_names_the_fix():
    confirmer = SkipConfirmer(_stub_trace(8, {}))
    with pytest.raises(InputError, match="pass lens="):
        confirmer(0, 5, 7, ev.DetectionConfig(), run=(5, 6))
