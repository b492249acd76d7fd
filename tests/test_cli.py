"""The vlm-lens CLI end to end on a saved tiny model: analyze, skip, tune-lens, hooks, zoo train (smoke)."""

import json

import pytest
from typer.testing import CliRunner

from experiments.cli import app
from vlm_lens import testing

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
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "skip.json").read_text())["sets"]["given"]["skipped_layers"] == [1, 2]
    result = runner.invoke(app, ["hooks", "--model", str(folder)])
    assert result.exit_code == 0 and "blocks.{i}.hook_resid_post" in result.output
    result = runner.invoke(app, ["tune-lens", "--model", str(folder), "--image", str(images), "--steps", "5",
                                 "--out", str(tmp_path / "lens")])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["analyze", "--model", str(folder), "--image", str(images), "--lens", "tuned",
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

    from vlm_lens.zoo.train import RECIPES, _task_for

    recipe = replace(RECIPES["llava"], task_weights=(("position", 3.0),))
    tasks = [_task_for(seed, recipe) for seed in range(3500)]
    assert tasks == [_task_for(seed, recipe) for seed in range(3500)]
    assert 0.38 <= tasks.count("position") / len(tasks) <= 0.48  # 3 / 7 expected
    assert _task_for(5, RECIPES["llava"]) is None  # no weights: the seed's own uniform choice
    with pytest.raises(ValueError, match="unknown tasks"):
        _task_for(0, replace(recipe, task_weights=(("smell", 1.0),)))
