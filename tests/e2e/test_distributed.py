"""Scale-out on a real local Ray cluster: 2 workers give the single-process store; a worker killed mid-run loses
nothing (its chunks go to a fresh actor)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import embedded

pytest.importorskip("ray")

from test_dataset_runs import MODEL, _close, numeric_equal, write_manifest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlm_lens.experiments import pipeline
from vlm_lens.experiments.cli import app  # noqa: E402
from vlm_lens.experiments.runs import (
    datasets,
    streaming,  # noqa: E402
)
from vlm_lens.experiments.runs import store_analysis as store_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_equal_one_process_and_survive_a_killed_worker(tmp_path):
    from vlm_lens.experiments.runs import distributed

    model = embedded(MODEL)
    source = datasets.from_manifest(write_manifest(tmp_path, 8))
    single = pipeline.analyze(model, source, tmp_path / "single", png=False, tsne_iter=250, batch_size=1)
    # the CLI path on a cluster started apart (``ray start --head``), reached with --ray-address
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)  # fmt: skip
    try:
        run = CliRunner().invoke(app, ["analyze", "--model", MODEL, "--manifest", str(tmp_path / "m.jsonl"), "--out",
                                       str(tmp_path / "two"), "--no-png", "--batch-size", "1", "--workers", "2",
                                       "--ray-address", f"127.0.0.1:{port}"])  # fmt: skip
    finally:
        import ray

        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert run.exit_code == 0, run.output
    two = {"data": json.loads((tmp_path / "two" / "report.json").read_text())}
    a, b = store_report.frames(tmp_path / "single" / "store"), store_report.frames(tmp_path / "two" / "store")
    for table in ("samples", "tokens", "states", "single", "skip"):
        numeric_equal(a[table], b[table])
    # equal up to float noise (workers run 1 torch thread each, this process 2: other summation orders)
    _close(two["data"]["aggregate"], json.loads(json.dumps(single["data"]["aggregate"])), 1e-6)
    _close(two["data"]["layer_skip"], json.loads(json.dumps(single["data"]["layer_skip"])), 1e-6)
    writers = {p.name.split("-")[1] for p in (tmp_path / "two" / "store" / "samples").glob("part-*")}
    assert writers == {"w1", "w2"}  # both workers wrote shards

    # kill worker 1 right after its first commit: its remaining chunks are re-sent to a fresh actor
    store_path = tmp_path / "killed"
    store = streaming.open_store(store_path, model, source, streaming.StreamSettings())
    killed = []

    def kill_first(pids):
        def watch():
            deadline = time.time() + 120
            while time.time() < deadline:
                if any(f"-{pids[0]}-" in p.name for p in (store_path / "samples").glob("part-*")):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    counts = distributed.run(model, source, store, streaming.StreamSettings(), batch_size=1, workers=2,
                             on_started=kill_first)  # fmt: skip
    assert killed and counts["restarts"] >= 1
    c = store_report.frames(store_path)
    assert sorted(c["samples"]["sample_id"]) == sorted(a["samples"]["sample_id"])  # no gaps, no duplicates
    for table in ("samples", "tokens", "states", "single", "skip"):
        numeric_equal(a[table], c[table])
    assert np.isfinite(np.stack(c["tokens"]["prob"].to_list())).all()
