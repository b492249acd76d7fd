"""The promises of docs/reliability.md: one line and exit 2 for bad CLI input (exit 1 for a failed run, a traceback only
with --debug); no socket or DNS lookup anywhere in load/prepare/trace/analyze, mistyped and uncached names included;
the report pair always consistent under SIGINT and concurrent writers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_lens import testing
from vlm_lens.experiments.cli import app

MODEL = "shapes-llava-prior"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-bad")
    (root / "a-file").write_text("x")
    (root / "corrupt.png").write_bytes(b"not a png")
    (root / "empty-dir").mkdir()
    (root / "m.jsonl").write_text("")
    good = testing.save("llava", root / "tiny")
    remote = testing.save("llava", root / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text("raise SystemExit('foreign code ran')\n")
    truncated = testing.save("llava", root / "truncated")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return root, good


def _cases(root: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    out = ["--out", str(root / "out"), "--no-png"]
    return {
        "mistyped-model": (["analyze", "--model", "shapes-lava"], "did you mean"),
        "out-is-a-file": (["analyze", "--out", str(root / "a-file")], "is a file"),
        "missing-image": (["analyze", "--image", str(root / "nope.png"), *out], "not found"),
        "corrupt-image": (["analyze", "--image", str(root / "corrupt.png"), *out], "not a readable image"),
        "empty-prompt": (["analyze", "--model", MODEL, "--prompt", " ", "--no-skip-sweep", *out], "prompt is empty"),
        "reversed-layers": (["skip", "--layers", "3-1"], "backwards"),
        "layer-out-of-range": (["skip", "--layers", "99"], "decoder layers are"),
        "garbage-layers": (["skip", "--layers", "a-b"], "comma-separated"),
        "skip-out-is-a-folder": (["skip", "--out", str(root / "empty-dir")], "is a folder"),
        "nan-learning-rate": (["tune-lens", "--out", str(root / "lens"), "--lr", "nan"], "--lr"),
        "missing-manifest": (["analyze", "--manifest", str(root / "nope.jsonl"), *out], "not found"),
        "empty-manifest": (["analyze", "--manifest", str(root / "m.jsonl"), *out], "no samples"),
        "two-sources": (["analyze", "--manifest", str(root / "m.jsonl"), "--image", str(root / "corrupt.png")], "pass one"),
        "report-not-a-store": (["report", str(root / "empty-dir")], "not a vlm-lens store"),
        "lens-folder-without-lens": (["analyze", "--tuned-lens", str(root / "empty-dir")], "lens.json"),
        "zero-threshold": (["analyze", "--threshold", "0"], "--threshold"),
        "tuned-variant-without-lens": (["analyze", "--variant", "tuned"], "--lens tuned"),
        "resume-and-overwrite": (["analyze", "--resume", "--overwrite"], "pass one"),
        "store-is-a-file": (["analyze", "--store", str(root / "a-file")], "is a file"),
        "demo-missing-image": (["demo", "--image", str(root / "nope.png")], "not found"),
        "checkpoint-with-own-code": (["analyze", "--model", str(root / "remote"), *out], "trust_remote_code"),
        "truncated-weights": (["analyze", "--model", str(root / "truncated"), *out], "complete"),
        "hooks-mistyped-model": (["hooks", "--model", "shapes-lava"], "did you mean"),
        "dataset-not-a-dataset": (["analyze", "--dataset", str(root / "empty-dir"), *out], "save_to_disk"),
        "prompt-with-a-manifest": (["analyze", "--manifest", str(root / "m.jsonl"), "--prompt", "what ?"], "drop it"),
        "columns-without-a-dataset": (["analyze", "--image-column", "img"], "--dataset"),
        "tune-lens-missing-manifest": (["tune-lens", "--out", str(root / "lens"), "--manifest", str(root / "no.csv")],
                                       "not found"),
    }


CLI_IDS = ["mistyped-model", "out-is-a-file", "missing-image", "corrupt-image", "empty-prompt", "reversed-layers",
           "layer-out-of-range", "garbage-layers", "skip-out-is-a-folder", "nan-learning-rate", "missing-manifest",
           "empty-manifest", "two-sources", "report-not-a-store", "lens-folder-without-lens", "zero-threshold",
           "tuned-variant-without-lens", "resume-and-overwrite", "store-is-a-file", "demo-missing-image",
           "checkpoint-with-own-code", "truncated-weights", "hooks-mistyped-model", "dataset-not-a-dataset",
           "tune-lens-missing-manifest", "prompt-with-a-manifest", "columns-without-a-dataset"]  # fmt: skip


@pytest.mark.parametrize("name", CLI_IDS)
def test_cli_bad_input_exits_2_with_one_line(name, files):
    root, good = files
    args, fix = _cases(root, good)[name]
    run = CliRunner().invoke(app, args)
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert run.exit_code == 2, (run.exit_code, run.output[-2000:])
    assert len(errors) == 1 and fix in run.output, run.output[-2000:]
    assert "Traceback" not in run.output and not (root / "out" / "report.json").exists()


def test_a_failed_run_exits_1_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    from vlm_lens.experiments.report import build as report_build

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report_build, "build", broken)
    args = ["analyze", "--model", MODEL, "--out", str(tmp_path), "--no-png", "--no-skip-sweep"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 1 and "the run failed: RuntimeError: disk on fire" in run.output and "--debug" in run.output
    assert "Traceback" not in run.output
    debug = CliRunner().invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError)  # the traceback is let through


NO_NETWORK = r"""
import socket, sys
attempts = []
def refuse(kind):
    def fn(*args, **kwargs):
        attempts.append((kind, repr(args)[:80]))
        raise OSError("network refused by the test")
    return fn
real_connect = socket.socket.connect
def connect(self, address):
    if isinstance(address, tuple):  # inet sockets; unix sockets are local
        attempts.append(("connect", repr(address)))
        raise OSError("network refused by the test")
    return real_connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: connect(self, address) or 0
socket.create_connection = refuse("create_connection")
socket.getaddrinfo = refuse("getaddrinfo")
socket.gethostbyname = refuse("gethostbyname")

import vlm_lens
from vlm_lens.errors import NotFoundError
from vlm_lens.experiments import pipeline
for name in ("shapes-lava", "some-org/not-cached-model", "llava-hf/llava-1.5-7b-hf"):
    try:
        vlm_lens.load(name)
    except NotFoundError:
        pass
model = vlm_lens.load("shapes-llava-prior")
samples = pipeline.default_samples(model)[:2]
trace = model.trace_generation(model.prepare(samples[0].image, samples[0].prompt), max_new_tokens=3)
pipeline.analyze(model, samples, sys.argv[1], png=False, skip_sweep=False, tsne_iter=250)
print("ATTEMPTS", attempts)
"""


def test_nothing_touches_the_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}  # unguarded
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ATTEMPTS []"
    assert (tmp_path / "out" / "report.json").exists()


def _pair(out: Path) -> tuple[str, str]:
    """(run id in report.html, run id in report.json) read through one resolution of ``.current``."""
    folder = (out / ".current").resolve()
    page = (folder / "report.html").read_text()
    data = json.loads((folder / "report.json").read_text())
    return re.search(r"name='vlm-lens-run' content='(\w+)'", page).group(1), data["run_id"]


WRITER = r"""
import signal, sys, time
from pathlib import Path
# SIGINT raises KeyboardInterrupt even when this process inherited it ignored (a suite run under nohup or `&`)
signal.signal(signal.SIGINT, signal.default_int_handler)
from vlm_lens.experiments.report import page as R
out, rounds, slow = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "slow"
R.write_report(out, "first", [], {"n": 0}, png=False)
if slow:  # stall between the two files of the second pair, so a SIGINT lands mid-pair
    real = Path.write_bytes
    def stalled(self, data):
        if self.name == "report.html":
            print("MID-PAIR", flush=True)
            time.sleep(30)
        return real(self, data)
    Path.write_bytes = stalled
for i in range(rounds):
    R.write_report(out, f"round {i}", [], {"n": i, "padding": "x" * 200000}, png=False)
print("DONE", flush=True)
"""


def test_sigint_during_the_report_write_keeps_the_previous_pair(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "1", "slow"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "MID-PAIR"
    first = _pair(out)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert _pair(out) == first and first[0] == first[1]  # the previous pair, whole
    assert json.loads((out / "report.json").read_text())["n"] == 0
    assert [p.name for p in (out / ".runs").iterdir()] == [(out / ".current").resolve().name]  # nothing half-written


def test_concurrent_writers_always_leave_a_consistent_pair(tmp_path):
    out = tmp_path / "out"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), "15", "fast"], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]  # fmt: skip
    seen = 0
    deadline = time.time() + 240
    while any(w.poll() is None for w in writers) and time.time() < deadline:
        if (out / ".current").exists():
            try:
                html_id, json_id = _pair(out)
            except FileNotFoundError:  # the folder resolved was replaced between resolve and read: retry
                continue
            assert html_id == json_id
            seen += 1
        time.sleep(0.01)
    for w in writers:
        assert w.wait(timeout=60) == 0
    html_id, json_id = _pair(out)
    assert html_id == json_id and seen > 0
    page, data = (out / "report.html").read_text(), json.loads((out / "report.json").read_text())
    assert data["run_id"] in page  # also through the fixed names


def _commands(group, prefix=()):
    """Every leaf command of the CLI as its argument path (zoo train, zoo plant, ...)."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group) or hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def _value_kind(param):
    """The Python type an option's value converts to (typer keeps it on the parameter's type descriptor)."""
    import typing

    annotation = param.type_descriptor.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def test_every_usage_error_exits_2_with_the_usage_line():
    """typer's own click copy raises these; they are bad input (exit 2, usage + the error), never a failed run."""
    import typer.main

    from vlm_lens.experiments.cli import app

    group = typer.main.get_command(app)
    walked = bad_values = 0
    for path, command in _commands(group):
        result = CliRunner().invoke(app, [*path, "--no-such-option"])
        assert result.exit_code == 2 and "Usage:" in result.output and "the run failed" not in result.output, (path, result.output)
        valued = [p for p in command.params if getattr(p, "opts", None) and not getattr(p, "is_flag", True)
                  and p.param_type_name == "option"]  # fmt: skip
        if valued:  # an option given without its value
            result = CliRunner().invoke(app, [*path, valued[0].opts[0]])
            # click raises this one before the command's context exists; the group lends it one for the usage line
            assert result.exit_code == 2 and f" {path[0]} " in result.output.split("Usage:")[1].splitlines()[0], (path, result.output)
            assert f"Option '{valued[0].opts[0]}'" in result.output, (path, valued[0].opts, result.output)
        typed = [p for p in valued if _value_kind(p) in (int, float) or isinstance(_value_kind(p), type)
                 and issubclass(_value_kind(p), Enum)]  # fmt: skip
        if typed:  # a value of the wrong type: click's BadParameter
            result = CliRunner().invoke(app, [*path, typed[0].opts[0], "not-a-value"])
            assert result.exit_code == 2 and "Usage:" in result.output and "Invalid value" in result.output, (path, result.output)
            bad_values += 1
        walked += 1
    assert walked >= 10 and bad_values >= 8
    for args in (["frobnicate"], ["analyze", "--lens", "foo"], ["analyze", "--threshold", "2"],
                 ["analyze", "--max-new-tokens", "0"], ["tune-lens"], ["validate", "--n", "zero"]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "Usage:" in result.output and "the run failed" not in result.output, (args, result.output)


def test_outputs_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    """An --out that can only fail after the run (a file where a folder goes, a folder nobody can write) is refused
    first: exit 2, one line, and no model is loaded."""
    import vlm_lens
    from vlm_lens.experiments.cli import app

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(vlm_lens, "load", no_model)
    existing = tmp_path / "lens"
    existing.write_text("not a folder")
    for args in (["tune-lens", "--out", str(existing)], ["analyze", "--out", str(existing)],
                 ["zoo", "train", "--family", "llava", "--out", str(existing)],
                 ["validate", "--out", str(tmp_path)], ["skip", "--out", str(tmp_path)]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and ("is a file" in result.output or "is a folder" in result.output), (args, result.output)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    for args in (["tune-lens", "--out", str(locked / "lens")], ["analyze", "--out", str(locked / "report")],
                 ["validate", "--out", str(locked / "v.json")]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "is not writable by this user" in result.output, (args, result.output)


def test_a_processor_refusing_an_image_is_bad_input(tmp_path):
    from conftest import embedded
    from PIL import Image

    from vlm_lens.errors import InputError

    wide = tmp_path / "wide.png"
    Image.new("RGB", (8000, 20), "white").save(wide)
    with pytest.raises(InputError, match=r"refused the image .*wide\.png \(8000x20 px\): absolute aspect ratio"):
        embedded("shapes-qwen2-vl").prepare(str(wide), "what color is the star ?")
