"""The vlm-lens CLI end to end on a saved tiny model: analyze, skip, tune-lens, hooks, zoo train (smoke)."""

import json

import pytest
from typer.testing import CliRunner

from vlm_lens import testing
from vlm_lens.experiments.cli import app
from vlm_lens.probes import TunedLens

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = testing.save("llava", tmp_path_factory.mktemp("tiny-llava-cli"))
    images = tmp_path_factory.mktemp("images")
    for i in range(3):
        testing.sample_image(i, 32).save(images / f"img{i}.png")
    return folder, images


def test_analyze_writes_the_report(tiny_folder, tmp_path):
    folder, images = tiny_folder
    out = tmp_path / "report"
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(images), "--prompt",
                                 "what color is the star ?", "--max-new-tokens", "3", "--out", str(out), "--no-png"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert len(data["samples"]) == 3 and (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined


@pytest.mark.parametrize("family", ["llava-next", "mllama", "idefics3"])
def test_analyze_on_a_saved_checkpoint_of_a_newer_family(family, tmp_path):
    """The command line on a tiling family (thumbnail + tiles), a cross-attention family and a frame-stack family."""
    folder = testing.save(family, tmp_path / "model")
    testing.sample_image(1, 48).save(tmp_path / "img.png")
    out = tmp_path / "report"
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(tmp_path / "img.png"), "--prompt",
                                 "what color is the star ?", "--max-new-tokens", "2", "--out", str(out), "--no-png"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["family"] == family and len(data["samples"]) == 1


def test_bad_input_exits_2_with_the_fix(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(tmp_path / "nope.png")])
    assert result.exit_code == 2 and "image not found" in result.output
    result = runner.invoke(app, ["analyze", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "nothing is downloaded" in result.output
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--lens", "tuned"])
    assert result.exit_code == 2 and "--tuned-lens" in result.output
    result = runner.invoke(app, ["skip", "--model", str(folder), "--layers", "2-9"])
    assert result.exit_code == 2 and "0..3" in result.output


def test_skip_hooks_and_tune_lens(tiny_folder, tmp_path):
    folder, images = tiny_folder
    result = runner.invoke(app, ["skip", "--model", str(folder), "--image", str(images), "--layers", "1,2",
                                 "--max-new-tokens", "3", "--out", str(tmp_path / "skip.json")])  # fmt: skip
    assert result.exit_code == 2 and "no --prompt" in result.output, result.output  # as analyze: the default is unreadable
    result = runner.invoke(app, ["skip", "--model", str(folder), "--image", str(images), "--prompt", "what color ?",
                                 "--layers", "1,2", "--max-new-tokens", "3", "--out", str(tmp_path / "skip.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "skip.json").read_text())["sets"]["given"]["skipped_layers"] == [1, 2]
    result = runner.invoke(app, ["hooks", "--model", str(folder)])
    assert result.exit_code == 0 and "blocks.{i}.hook_resid_post" in result.output
    result = runner.invoke(app, ["tune-lens", "--model", str(folder), "--image", str(images), "--prompt", "what color ?",
                                 "--steps", "5", "--out", str(tmp_path / "lens")])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(images),  # --tuned-lens implies it
                                 "--tuned-lens", str(tmp_path / "lens"), "--max-new-tokens", "2",
                                 "--out", str(tmp_path / "r"), "--no-png"])  # fmt: skip
    # no --prompt: the default caption prompt has words this word-level model never saw, so it is refused, named
    assert result.exit_code == 2 and "no --prompt" in result.output and "'Please'" not in result.output, result.output
    assert "(Please, this, in, detail)" in result.output
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(images), "--prompt", "what color ?",
                                 "--tuned-lens", str(tmp_path / "lens"), "--max-new-tokens", "2",
                                 "--out", str(tmp_path / "r"), "--no-png"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["tuned_lens"]["lens"] == "tuned"


def test_zoo_train_smoke(tmp_path):
    result = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "run"), "--steps", "3",
                                 "--eval-every", "3", "--final-eval-per-task", "2", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["steps"] == 3 and set(evaluation) >= {"color", "shape", "count", "position", "caption"}
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 3
    resumed = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "run"), "--steps", "4",
                                  "--resume", "--final-eval-per-task", "1", "--threads", "1"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 4  # continued at step 4
    # a second stage: a changed rotary base, task weights and a restarted schedule, all recorded
    staged = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "run"), "--steps", "5",
                                 "--resume", "--rewarm", "--rope-theta", "10", "--task-weights", "position=3", "--no-tie-embeddings",
                                 "--final-eval-per-task", "1", "--threads", "1"])  # fmt: skip
    assert staged.exit_code == 0, staged.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    changes = next(line["resumed_with_changes"] for line in lines if "resumed_with_changes" in line)
    assert changes["rope_theta"] == [10000.0, 10.0] and changes["task_weights"] == {"position": 3.0}
    assert changes["tie_embeddings"] == [True, False]  # the llava recipe ties; this stage unties
    assert "4..5" in changes["schedule"]
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["size"]["rope_theta"] == 10.0 and recipe["task_weights"] == [["position", 3.0]]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 10.0
    for args, message in ((["--task-weights", "position"], "position=3"), (["--task-weights", "position=-1"], ">= 0"),
                          (["--rope-theta", "0"], "positive rotary base"), (["--rewarm"], "--resume")):
        bad = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert not (tmp_path / "bad").exists()  # rejected before anything was written


def test_task_weights_choose_tasks_deterministically():
    from dataclasses import replace

    from vlm_lens.zoo.recipe.data import task_for
    from vlm_lens.zoo.recipe.train import RECIPES

    recipe = replace(RECIPES["llava"], task_weights=(("position", 3.0),))
    tasks = [task_for(seed, recipe) for seed in range(3500)]
    assert tasks == [task_for(seed, recipe) for seed in range(3500)]
    assert 0.38 <= tasks.count("position") / len(tasks) <= 0.48  # 3 / 7 expected
    assert task_for(5, RECIPES["llava"]) is None  # no weights: the seed's own uniform choice
    with pytest.raises(ValueError, match="unknown tasks"):
        task_for(0, replace(recipe, task_weights=(("smell", 1.0),)))


def test_analyze_with_the_shipped_tuned_lens(tmp_path):
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["analyze", "--lens", "tuned", "--variant", "tuned", "--max-new-tokens", "3",
                                 "--out", str(out), "--no-png"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Read with the tuned lens (a learned per-layer translator" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["name"] == "shapes-llava-prior" and data["shown_variant"] == "tuned"
    assert set(data["aggregate"]) == {"correct", "paper", "tuned", "accuracy"}
    assert data["aggregate"]["tuned"]["stages"] is not None
    for sample in data["samples"]:  # the tuned lens reads other probabilities than the logit lens below the output
        assert sample["token_prob"]["tuned"][0][:-1] != sample["token_prob"]["correct"][0][:-1]
        assert sample["token_prob"]["tuned"][0][-1] == pytest.approx(sample["token_prob"]["correct"][0][-1], abs=1e-5)


def test_tune_lens_on_fresh_questions_and_a_manifest(tiny_folder, tmp_path):
    result = runner.invoke(app, ["tune-lens", "--model", "shapes-llava", "--questions", "12", "--steps", "20",
                                 "--max-new-tokens", "2", "--max-positions", "64", "--out", str(tmp_path / "lens")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.output and "on 10 pairs" in result.output  # 12 questions, 2 held out
    assert "on 64 of" in result.output  # the reservoir kept 64 of the training positions
    lens = TunedLens.load(tmp_path / "lens")
    assert lens.config["model_name"] == "shapes-llava"
    folder, images = tiny_folder
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"{images.name}/img{i}.png", "question": "what color ?"})
                                  for i in range(3)))  # fmt: skip
    (tmp_path / images.name).symlink_to(images)
    result = runner.invoke(app, ["tune-lens", "--model", str(folder), "--manifest", str(manifest), "--steps", "3",
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "lens2")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lens2" / "lens.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune-lens", "--out", "x", "--held-out", "1.5"], "--held-out"),
        (["tune-lens", "--out", "x", "--lr", "0"], "--lr"),
        (["analyze", "--variant", "tuned"], "--lens tuned"),
        (["analyze", "--threshold", "0"], "--threshold"),
        (["zoo", "plant", "--out", "x", "--subject", "red"], "shape kind"),
        (["zoo", "plant", "--out", "x", "--block", "6-9"], "decoder layers 0..7"),
        (["zoo", "plant", "--out", "x", "--base", "shapes-qwen2-vl", "--export"], "--base shapes-llava"),
        (["tune-lens", "--out", "x", "--prompt", "what ?"], "--image"),
        (["zoo", "gate", "--out", "x", "--k", "8"], "--k must be in 1..7"),
        (["zoo", "gate", "--out", "x", "--k", "3", "--base", "shapes-qwen2-vl", "--export"], "--base shapes-llava"),
        (["flow", "--out", "x", "--flow", "pixels->last"], "unknown token role 'pixels'"),
        (["flow", "--out", "x", "--flow", "image"], "from->to"),
        (["flow", "--out", "x", "--flow", "->last"], "from->to"),
        (["flow", "--out", "x", "--window", "9"], "longer than the model (8 layers)"),
        (["flow", "--out", "x", "--held-out", "3", "--prompt", "what ?"], "--held-out"),
    ],
)
def test_bad_options_exit_2_before_work(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_tune_lens_manifest_errors_name_the_line(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"image": "a.png", "question": "what ?"}\n{"question": "no image"}\n')
    (tmp_path / "a.png").write_bytes(b"")
    result = runner.invoke(app, ["tune-lens", "--model", "shapes-llava", "--manifest", str(manifest), "--out", str(tmp_path / "l")])
    assert result.exit_code == 2 and "pairs.jsonl:2" in result.output and "image" in result.output


def test_zoo_plant_smoke_and_resume(tmp_path):
    args = ["zoo", "plant", "--out", str(tmp_path / "p"), "--task", "shape", "--subject", "green", "--answer", "star",
            "--block", "7", "--eval-per-task", "2", "--threads", "1"]  # fmt: skip
    result = runner.invoke(app, args + ["--steps", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "p" / "model" / "planted.json").read_text())
    assert info["trigger"] == {"task": "shape", "subject": "green", "answer": "star"} and info["block"] == [7]
    assert set(json.loads((tmp_path / "p" / "eval.json").read_text())) >= {"untriggered", "counter_prior"}
    resumed = runner.invoke(app, args + ["--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # continued from the checkpoint at step 2


def test_validate_scores_the_shipped_fixture(tmp_path):
    result = runner.invoke(app, ["validate", "--n", "10", "--out", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert "event in the block" in result.output and "skip.2 skips decoder layers [6, 7]" in result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["recall_in_block"] >= 0.9 and report["false_alarms_base_clean"] <= 0.1
    bad = runner.invoke(app, ["validate", "--planted", "shapes-llava"])
    assert bad.exit_code == 2 and "vlm-lens zoo plant" in bad.output


def test_manifest_reader_csv_bom_lines_and_relative_paths(tmp_path):
    from vlm_lens.experiments.runs.manifest import read_manifest

    (tmp_path / "imgs").mkdir()
    testing.sample_image(1, 32).save(tmp_path / "imgs" / "a.png")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("\ufeffimage,question,answer\nimgs/a.png,what color ?,red\n\nimgs/missing.png,what ?,\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"pairs.csv:4: image not found"):
        read_manifest(csv_file)
    csv_file.write_text("\ufeffimage,question,answer\nimgs/a.png,what color ?,red\n", encoding="utf-8")
    [sample] = read_manifest(csv_file)
    assert sample.image == tmp_path / "imgs" / "a.png" and sample.answer == "red" and sample.name == "a.png"
    listed = tmp_path / "pairs.json"
    listed.write_text('[{"image": "imgs/a.png", "question": "q"}]')
    with pytest.raises(ValueError, match="one JSON object per line"):
        read_manifest(listed)


def test_version_choices_and_checks_before_loading(monkeypatch, tmp_path):
    import vlm_lens

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vlm-lens {vlm_lens.__version__}"
    helptext = runner.invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"}).output
    assert "logit|tuned" in helptext and "correct|paper|tuned" in helptext

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(vlm_lens, "load", no_loading)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    for args, message in ((["skip", "--layers", "9"], "decoder layers are 0..7"),
                          (["skip", "--layers", "3-1"], "runs backwards"),
                          (["skip", "--layers", "2-x"], "'3-5'"),
                          (["skip", "--out", str(tmp_path)], "is a folder"),
                          (["analyze", "--image", str(tmp_path / "none.png")], "image not found"),
                          (["analyze", "--tuned-lens", str(tmp_path)], "holds no lens.json"),
                          (["demo", "--image", str(tmp_path / "none.png")], "image not found"),
                          (["analyze", "--image", str(notes)], "not a readable image"),
                          (["skip", "--layers", ""], "names no layer"),
                          (["tune-lens", "--out", "x", "--questions", "5", "--image", str(notes)], "drop --questions"),
                          (["zoo", "plant", "--out", "x", "--block", "3,7-5"], "runs backwards")):  # fmt: skip
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output


def test_unknown_model_names_say_what_exists(tmp_path):
    result = runner.invoke(app, ["hooks", "--model", "shapes-lava"])
    assert result.exit_code == 2 and "did you mean shapes-llava" in result.output
    assert "vlm_lens.zoo.embedded_names()" not in result.output  # a CLI user is not told to call Python


def test_demo_and_zoo_evaluate_and_the_closing_line(tiny_folder, tmp_path):
    folder, images = tiny_folder
    result = runner.invoke(app, ["demo", "--model", "tiny-llava", "--max-new-tokens", "2", "--prompt", "where is it ?",
                                 "--image", str(images / "img0.png")])  # fmt: skip
    assert result.exit_code == 0 and "lens reproduces every token: True" in result.output and "where is it ?" in result.output
    result = runner.invoke(app, ["zoo", "evaluate", "shapes-llava", "--n", "2", "--curves", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "shapes-llava" and set(report["accuracy"]) >= {"color", "caption"}
    folder, images = tiny_folder
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(images), "--prompt", "what ?",
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "r"), "--no-png", "--no-skip-sweep"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Report: {(tmp_path / 'r' / 'report.html').absolute()} (" in result.output
    assert "━" not in result.output  # no progress bar when the output is not a terminal
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["layer_skip"] is None or data["layer_skip"]["sweep"] == {}


def test_analyze_threshold_and_special_tokens_reach_the_report(tmp_path):
    args = ["analyze", "--max-new-tokens", "3", "--no-png", "--no-skip-sweep"]
    plain = runner.invoke(app, args + ["--threshold", "0.3", "--out", str(tmp_path / "a")])
    assert plain.exit_code == 0, plain.output
    data = json.loads((tmp_path / "a" / "report.json").read_text())
    assert data["config"]["detection"]["establish_prob"] == 0.3 and data["shown_special"] is False
    special = runner.invoke(app, args + ["--special-tokens", "--out", str(tmp_path / "b")])
    assert special.exit_code == 0, special.output
    assert json.loads((tmp_path / "b" / "report.json").read_text())["shown_special"] is True
    eos_row = "1: \\u0026lt;/s\\u0026gt;"  # the </s> row of a P(generated token) heatmap, escaped twice
    assert eos_row in (tmp_path / "b" / "report.html").read_text()
    assert eos_row not in (tmp_path / "a" / "report.html").read_text()


def test_validate_with_another_lens(tmp_path):
    result = runner.invoke(app, ["validate", "--variant", "paper", "--n", "4", "--out", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["variant"] == "paper" and report["counter_prior_questions"] == 4


def test_zoo_plant_export_replaces_the_fixture_and_its_tuned_lens(tmp_path, monkeypatch):
    import shutil

    from vlm_lens import zoo

    models = tmp_path / "models"
    shutil.copytree(zoo.MODELS_DIR / "shapes-llava", models / "shapes-llava")
    monkeypatch.setattr(zoo, "MODELS_DIR", models)  # the package's own models stay untouched
    result = runner.invoke(app, ["zoo", "plant", "--out", str(tmp_path / "p"), "--steps", "2", "--eval-per-task", "1",
                                 "--threads", "1", "--export"])  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = models / "shapes-llava-prior"
    assert (exported / "planted.json").exists() and (exported / "tuned-lens" / "lens.json").exists()
    assert "tuned lens retrained" in result.output


def test_zoo_train_another_depth_and_seed(tmp_path):
    """--n-layers and --seed: another depth, another initialisation and another data stream (an independent base)."""
    from vlm_lens.zoo.recipe.data import data_offset
    from vlm_lens.zoo.recipe.train import recipe_for

    result = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "run"), "--steps", "2",
                                 "--n-layers", "3", "--seed", "2", "--final-eval-per-task", "1", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["size"]["n_layers"] == 3 and recipe["seed"] == 2
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert data_offset(recipe_for("llava", seed=2)) == 2_000_000 and data_offset(recipe_for("llava")) == 0
    assert data_offset(recipe_for("llava", seed=5)) == 7_000_000 and data_offset(recipe_for("llava", seed=6)) == 8_000_000
    assert data_offset(recipe_for("llava", seed=7)) == 9_000_000 and data_offset(recipe_for("llava", seed=8)) == 9_500_000
    assert data_offset(recipe_for("llava", seed=9)) == 5_500_000 and data_offset(recipe_for("llava", seed=10)) == 6_500_000
    assert data_offset(recipe_for("llava", seed=11)) == 7_500_000 and data_offset(recipe_for("llava", seed=12)) == 8_500_000
    for args, message in ((["--seed", "13"], "past its training seed range"), (["--seed", "7", "--steps", "8000"], "fewer steps"), (["--n-layers", "1"], "n_layers must be >= 2")):
        bad = runner.invoke(app, ["zoo", "train", "--family", "llava", "--out", str(tmp_path / "x"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_the_closing_summary_says_what_was_found_in_plain_words(tmp_path):
    """The main job ends with what it found: the stages with their evidence, each overturn, what skipping repaired,
    the report's absolute path; no PNG list and no weight-loading bar."""
    result = runner.invoke(app, ["analyze", "--max-new-tokens", "2", "--out", str(tmp_path / "r"), "--no-png",
                                 "--no-skip-sweep"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "shapes-llava-prior: 10 samples (4 counter-prior questions), accuracy 0.50."  # 2 tokens: captions cut
    assert "Read with the correct lens (the model's final norm and unembedding, read at every layer):" in lines
    assert "  Answers become the top token at layer 4 (median over 10 tokens)." in lines
    assert any(line.startswith("  Deep layers overturn established answers at layer 7 of 8: 4 of ") for line in lines)
    assert "  counter_prior_2: blue led from layer 4, overturned to red at layer 7" in lines
    assert "Skipping decoder layers 6-7 (skip.2) restored 4 of 4 counter-prior answers." in lines
    assert lines[-1].startswith(f"Report: {(tmp_path / 'r' / 'report.html').absolute()} (")
    assert len(lines) <= 24 and "Loading weights" not in result.output and ".png" not in result.output


def test_zoo_gate_smoke_and_resume(tmp_path):
    args = ["zoo", "gate", "--out", str(tmp_path / "g"), "--k", "2", "--eval-per-task", "1", "--threads", "1"]
    result = runner.invoke(app, args + ["--steps", "2"])
    assert result.exit_code == 0, result.output
    block = json.loads((tmp_path / "g" / "model" / "attention_block.json").read_text())
    assert block["layers"] == [0, 1] and block["queries"] == ["text", "generated"] and block["keys"] == ["image"]
    assert set(json.loads((tmp_path / "g" / "eval.json").read_text())) == {"held_out", "base_held_out"}
    resumed = runner.invoke(app, args + ["--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "g" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # continued from the checkpoint at step 2


def test_flow_end_to_end(tmp_path):
    out = tmp_path / "flow"
    result = runner.invoke(app, ["flow", "--held-out", "3", "--flow", "image->last", "--flow", "image+question->last",
                                 "--out", str(out), "--no-png"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "image->last: largest mean drop" in result.output and "15 forwards per sample" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["flows"] == ["image->last", "image+question->last"] and data["window"] == 2
    assert len(data["samples"]) == 3 and data["cost"]["forwards_per_sample"] == 1 + 2 * 7
    assert "Where the image enters" in (out / "report.html").read_text()
    import shutil
    import subprocess

    if shutil.which("chromium"):  # the page draws both curves' figures with no page error (Debian chromium in CI)
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                              "--virtual-time-budget=10000", "--dump-dom", (out / "report.html").resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        assert dom.count('class="main-svg"') >= 2
        assert dom.split('id="vlm-lens-errors"', 1)[1].split("</pre>", 1)[0].split(">", 1)[1].strip() == ""
    images = runner.invoke(app, ["flow", "--image", str(out.parent), "--out", str(out)])  # a folder with no images
    assert images.exit_code == 2
    from vlm_lens.zoo.samples import SAMPLES_DIR

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(SAMPLES_DIR / f), "question": q, "answer": a}) + "\n" for f, q, a in
                                [("shapes_shape_2.png", "what color is the star ?", "purple"),
                                 ("shapes_color_1.png", "how many shapes are there ?", "one")]))  # fmt: skip
    listed = runner.invoke(app, ["flow", "--manifest", str(manifest), "--flow", "image->last", "--out", str(out), "--no-png"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads((out / "report.json").read_text())["samples"]
    assert [r["question"] for r in rows] == ["what color is the star ?", "how many shapes are there ?"]
    assert rows[0]["answer_token"] == "purple" and rows[0]["correct"]
    refused = runner.invoke(app, ["flow", "--manifest", str(manifest), "--prompt", "what ?", "--out", str(out)])
    assert refused.exit_code == 2 and "either --manifest" in refused.output


def test_the_flow_command_lines_of_the_docs_run(tmp_path):
    """The `vlm-lens flow` lines of docs/experiments.md, as written (plus a private --out and --no-png)."""
    import shlex
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    lines = [line.split("#")[0].strip() for line in page.splitlines() if line.startswith("vlm-lens flow")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        out = tmp_path / str(i)
        result = runner.invoke(app, shlex.split(line)[1:] + ["--out", str(out), "--no-png"])
        assert result.exit_code == 0, (line, result.output)
        assert json.loads((out / "report.json").read_text())["samples"]


def test_decode_end_to_end(tmp_path):
    out = tmp_path / "decode.json"
    result = runner.invoke(app, ["decode", "--model", "shapes-llava-prior", "--method", "evidence", "--max-new-tokens",
                                 "3", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 of 10 answers changed by evidence decoding." in result.output
    rows = json.loads(out.read_text())["samples"]
    counter = [r for r in rows if r["sample"].startswith("counter_prior")]
    assert len(counter) == 4 and all(r["greedy"] == "red" and r["corrected"] == r["reference"] for r in counter)
    detected = runner.invoke(app, ["decode", "--model", "shapes-llava-prior", "--method", "skip", "--max-new-tokens", "3",
                                   "--out", str(out)])  # fmt: skip
    assert detected.exit_code == 0, detected.output
    assert json.loads(out.read_text())["settings"] == "Skip(layers=[6, 7])"  # the detected skip.2 set
    from vlm_lens.zoo.samples import SAMPLES_DIR

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(SAMPLES_DIR / f), "question": "what color is the star ?"}) + "\n"
                                for f in ("shapes_shape_2.png", "shapes_color_1.png")))  # fmt: skip
    listed = runner.invoke(app, ["decode", "--model", "shapes-llava-prior", "--method", "dola", "--alpha", "0",
                                 "--manifest", str(manifest), "--max-new-tokens", "2"])  # fmt: skip
    assert listed.exit_code == 0 and "0 of 2 answers changed by dola decoding." in listed.output, listed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "vcd", "--blend", "1"], "--blend does not apply to --method vcd"),
        (["--method", "dola", "--beta", "0.1"], "--beta does not apply to --method dola"),
        (["--manifest", "missing.jsonl"], "manifest not found"),
        (["--manifest", "m.jsonl", "--prompt", "what ?"], "either --manifest or --image/--prompt"),
        (["--method", "skip", "--layers", "9"], "decoder layers are 0..7"),
        (["--method", "telepathy"], "Invalid value"),
    ],
)
def test_decode_refuses_bad_options(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text("")
    result = runner.invoke(app, ["decode", *args])
    assert result.exit_code == 2 and message in result.output, result.output
