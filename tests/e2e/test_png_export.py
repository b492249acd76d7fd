"""PNG export: the browser makes no outbound connection, and the run always exits (broken, hanging or absent browser)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from vlm_lens.experiments.report import png_export

EXPORT_ONE = textwrap.dedent(
    """
    import sys, plotly.graph_objects as go
    from pathlib import Path
    from vlm_lens.experiments.report.png_export import export_pngs
    paths, notice = export_pngs(Path(sys.argv[1]), [go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))], timeout=float(sys.argv[2]))
    print("PATHS", paths)
    print("NOTICE", notice)
    """
)
IPV6_PROBE = "2001:4860:4860::8888"  # Chromium's IPv6 reachability probe: a UDP connect that sends nothing


def run_export(tmp_path, env=None, timeout=120.0, prefix=()):
    script = tmp_path / "export_one.py"
    script.write_text(EXPORT_ONE)
    started = time.monotonic()
    done = subprocess.run([*prefix, sys.executable, str(script), str(tmp_path / "out"), str(timeout)], capture_output=True,
                          text=True, timeout=timeout + 60, env={**os.environ, **(env or {})})  # fmt: skip
    return done, time.monotonic() - started


def fake_browser(tmp_path, body: str):
    path = tmp_path / "fake-browser"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("strace") is None,
                    reason="needs Debian chromium (installed by .ci/run) and strace")  # fmt: skip
def test_png_export_makes_no_outbound_connection(tmp_path):
    (tmp_path / "out").mkdir()
    log = tmp_path / "strace.log"
    done, _ = run_export(tmp_path, prefix=("strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(log)))
    assert "PATHS ['" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "out" / "figure_01.png").stat().st_size > 1000
    calls = log.read_text().splitlines()
    inet = [c for c in calls if re.search(r"connect\(\d+, \{sa_family=AF_INET6?,", c)]
    outbound = [c for c in inet if "127.0.0.1" not in c and '"::1"' not in c]
    dns = [c for c in calls if "htons(53)" in c]
    assert dns == [], dns[:3]
    assert all(IPV6_PROBE in c for c in outbound), outbound[:3]  # nothing but the probe ...
    if png_export.network_namespace_prefix():
        assert all(" = -1 " in c or "<unfinished" in c for c in outbound), outbound  # ... and it fails in the namespace
        resumed = [c for c in calls if "connect resumed" in c]
        assert not any(c.rstrip().endswith("= 0") for c in resumed), resumed


def test_a_browser_that_cannot_start_never_holds_the_process(tmp_path):
    browser = fake_browser(tmp_path, "echo 'cannot open display' >&2; exit 1")
    (tmp_path / "out").mkdir()
    done, elapsed = run_export(tmp_path, env={"VLM_LENS_BROWSER": browser}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "PATHS []" in done.stdout and "NOTICE PNG export skipped" in done.stdout
    assert elapsed < 55  # the process exited by itself, well before the export's own deadline
    assert not list((tmp_path / "out").glob("*.png")) and not list((tmp_path / "out").glob(".png-*"))


def test_a_hanging_browser_is_killed_at_the_deadline(tmp_path):
    marker = f"{time.time_ns() % 10**9}.5"
    browser = fake_browser(tmp_path, f"exec sleep {marker}")
    (tmp_path / "out").mkdir()
    done, elapsed = run_export(tmp_path, env={"VLM_LENS_BROWSER": browser}, timeout=8)
    assert "did not finish within 8 s" in done.stdout, done.stdout + done.stderr
    assert elapsed < 40
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    assert left == [], "the browser's process group survived the export"
    assert not list((tmp_path / "out").iterdir())  # no staging folder or partial PNG left behind


def test_no_browser_gives_a_notice_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_LENS_BROWSER", str(tmp_path / "absent"))
    started = time.monotonic()
    paths, notice = png_export.export_pngs(tmp_path, [object()])
    assert paths == [] and "VLM_LENS_BROWSER" in notice and "not an executable" in notice
    monkeypatch.delenv("VLM_LENS_BROWSER")
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium anywhere
    paths, notice = png_export.export_pngs(tmp_path, [object()])
    assert paths == [] and "needs Chromium" in notice and time.monotonic() - started < 1


def test_analyze_exits_with_the_report_when_the_browser_fails(tmp_path):
    from vlm_lens import testing

    folder = testing.save("llava", tmp_path / "model")
    testing.sample_image(1, 32).save(tmp_path / "img.png")
    browser = fake_browser(tmp_path, "exit 3")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vlm_lens.experiments.cli", "analyze", "--model", str(folder), "--image", str(tmp_path / "img.png"),
         "--prompt", "what color ?", "--max-new-tokens", "2", "--out", str(tmp_path / "report"), "--png"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VLM_LENS_BROWSER": browser},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PNG export skipped" in done.stdout and (tmp_path / "report" / "report.json").exists()
    assert time.monotonic() - started < 240


def test_a_child_that_cannot_start_is_a_notice_and_leaves_nothing(tmp_path, monkeypatch):
    """subprocess.Popen itself raising (EAGAIN: no process slots) is a notice, never an exception; no .png-* folder."""
    import plotly.graph_objects as go

    fake = fake_browser(tmp_path, "exit 0")
    monkeypatch.setenv("VLM_LENS_BROWSER", str(fake))

    def refuse(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(png_export.subprocess, "Popen", refuse)
    out = tmp_path / "out"
    paths, notice = png_export.export_pngs(out, [go.Figure()])
    assert paths == [] and notice.startswith("PNG export skipped: ") and "Resource temporarily" in notice
    assert not list(out.glob(".png-*"))


def test_running_without_network_isolation_is_said(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    fake = fake_browser(tmp_path, "exit 0")
    monkeypatch.setenv("VLM_LENS_BROWSER", str(fake))
    monkeypatch.setattr(png_export, "network_namespace_prefix", lambda: [])

    def child(staging, browser, prefix, figures, paths, timeout):
        for path in paths:
            path.write_bytes(b"PNG")
        return None

    monkeypatch.setattr(png_export, "_run_child", child)
    paths, notice = png_export.export_pngs(tmp_path / "out", [go.Figure()])
    assert len(paths) == 1 and "without network isolation" in notice
