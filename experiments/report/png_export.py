"""PNG export of plotly figures through kaleido, with the browser kept offline, bounded in time and always shut down.

kaleido 1.x drives a headless Chromium (through choreographer). Left alone, Chromium's background services (DNS
prefetch, component and safe-browsing updates, variations, metrics, optimization hints) open outbound connections,
and when the browser fails to start kaleido's threads can keep the Python process alive. So the export

- runs in a **child process** (``python -m vlm_lens.experiments.report.png_export``) in a session of its own: whatever happens to the
  browser there, this process only waits for the child, with a deadline, and then kills its whole process group;
- launches Chromium through a small **wrapper script** that adds :data:`OFFLINE_FLAGS` (background networking off,
  every host name resolved to "not found" inside the browser and every request sent to a closed loopback proxy, so
  no DNS query and no TCP connection is attempted; no component updates, pings or metrics), runs it in a new network
  namespace where one can be made (``unshare -rn``: no device but a loopback that is down), and records the
  browser's process group, which is killed when the export ends, also after a crash or a hang. What stock Chromium
  cannot switch off is its IPv6 reachability probe: a UDP ``connect()`` to 2001:4860:4860::8888 that sends no
  packet (inside the namespace it fails with ENETUNREACH);
- never raises: the caller gets the PNG paths, or none and a one-line notice saying why.

``VLM_LENS_BROWSER`` names the browser executable (default: ``chromium``, ``chromium-browser`` or
``google-chrome`` on PATH).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

OFFLINE_FLAGS = (
    "--disable-background-networking",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no DNS, no connection to any host name
    # every request the browser's own services still make (sign-in account list, update checks, search-engine
    # preconnect) goes to a proxy on a closed loopback port: refused at once, and no host name is resolved, so no
    # DNS query and no IPv6 reachability probe leave the machine
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--dns-prefetch-disable",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-sync",
    "--no-pings",
    "--no-first-run",
    "--metrics-recording-only",
    "--disable-breakpad",
    "--disable-features=OptimizationHints,MediaRouter,DialMediaRouteProvider,Translate,NetworkTimeServiceQuerying,"
    "CertificateTransparencyComponentUpdater,AutofillServerCommunication,InterestFeedContentSuggestions,"
    "PreconnectToSearch,SearchPrefetchServicePrefetching,SigninInterception",
)
DEFAULT_TIMEOUT_S = 120.0


def find_browser() -> str | None:
    """The browser kaleido will drive: ``VLM_LENS_BROWSER`` or a Chromium on PATH."""
    chosen = os.environ.get("VLM_LENS_BROWSER")
    if chosen:
        return shutil.which(chosen) or (chosen if Path(chosen).is_file() else None)
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def network_namespace_prefix() -> list[str]:
    """``["unshare", "-rn"]`` where a process may enter a new user + network namespace (only a loopback device that
    is down: nothing can leave the machine), else ``[]``. ``VLM_LENS_BROWSER_NETNS=0`` turns it off."""
    if os.environ.get("VLM_LENS_BROWSER_NETNS", "1") == "0":
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [unshare, "-rn"] if ok else []


def _wrapper(folder: Path, browser: str, prefix: list[str]) -> Path:
    """A script that records its process group and execs the browser, isolated (``prefix``) and with the offline flags."""
    script = folder / "browser"
    command = " ".join(shlex.quote(part) for part in [*prefix, browser, *OFFLINE_FLAGS])
    # the browser's process group (choreographer starts it in a session of its own): field 5 of /proc/self/stat
    record = f'cut -d" " -f5 /proc/$$/stat > {shlex.quote(str(folder / "browser.pgid"))} 2>/dev/null'
    script.write_text(f'#!/bin/sh\n{record}\nexec {command} "$@"\n')
    script.chmod(0o700)
    return script


def _kill_group(pgid_file: Path) -> None:
    """Kill the browser's whole process group (recorded by the wrapper), also when its leader has already exited."""
    try:
        pgid = int(pgid_file.read_text().strip())
        if pgid > 1 and pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGKILL)
    except (OSError, ValueError):
        pass  # never started, or already gone


def export_pngs(out_dir: Path, figures: list, names: list[str] | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], str | None]:  # fmt: skip
    """PNG files of ``figures`` in ``out_dir`` (``names`` without suffix; default ``figure_01`` ...).

    Returns ``(paths, None)``; ``(paths, notice)`` when the PNGs were written without network isolation (the kernel
    refused a network namespace: said, never silent); or ``([], notice)`` with the reason when no PNG was written.
    PNG export is optional: it never raises (any failure, a child that cannot even start included, is the notice),
    never leaves its staging folder, a browser or a thread behind.
    """
    try:
        return _export(out_dir, figures, names, timeout)
    except Exception as error:  # noqa: BLE001 - optional output: a failure is a notice, never a failed run
        return [], f"PNG export skipped: {type(error).__name__}: {error}"


def _export(out_dir: Path, figures: list, names: list[str] | None, timeout: float) -> tuple[list[str], str | None]:
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        return [], "PNG export skipped: kaleido is not installed (pip install 'vlm-lens[png]')"
    browser = find_browser()
    if browser is None:
        if os.environ.get("VLM_LENS_BROWSER"):
            return [], f"PNG export skipped: VLM_LENS_BROWSER={os.environ['VLM_LENS_BROWSER']} is not an executable"
        return [], "PNG export skipped: kaleido needs Chromium (Debian: apt-get install -y chromium)"
    if not figures:
        return [], None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = names or [f"figure_{i + 1:02d}" for i in range(len(figures))]
    paths = [out_dir / f"{name}.png" for name in names]
    prefix = network_namespace_prefix()
    staging = Path(tempfile.mkdtemp(prefix=".png-", dir=out_dir))  # same file system as the PNGs: atomic renames
    try:
        result = _run_child(staging, browser, prefix, figures, paths, timeout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if result is not None:
        return [], result
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        return [], f"PNG export skipped: {len(missing)} of {len(paths)} files were not written"
    unisolated = None if prefix else ("PNG export ran without network isolation: this kernel refused a new network "
                                      "namespace (unshare -rn), so the browser had the network the process has")  # fmt: skip
    return [str(p) for p in paths], unisolated


def _run_child(staging: Path, browser: str, prefix: list[str], figures: list, paths: list[Path],
               timeout: float) -> str | None:  # fmt: skip
    """Write the PNGs in a child process; None on success, else the notice."""
    with tempfile.TemporaryDirectory(prefix="vlm-lens-png-") as tmp:
        folder = Path(tmp)
        job: dict[str, Any] = {"browser": str(_wrapper(folder, browser, prefix)), "figures": [], "paths": [str(p) for p in paths],
               "staging": str(staging)}  # fmt: skip
        for i, figure in enumerate(figures):
            spec = folder / f"fig{i}.json"
            spec.write_text(figure.to_json())
            job["figures"].append(str(spec))
        (folder / "job.json").write_text(json.dumps(job))
        # TMPDIR inside our temporary folder: the browser profile choreographer creates goes when the folder goes
        child = subprocess.Popen(
            [sys.executable, "-m", "vlm_lens.experiments.report.png_export", str(folder / "job.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, "TMPDIR": tmp},
        )  # fmt: skip
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return f"PNG export skipped: the browser did not finish within {timeout:.0f} s"
        finally:
            _kill_group(folder / "browser.pgid")
        if child.returncode != 0:
            reason = (err or b"").decode(errors="replace").strip().splitlines()
            return f"PNG export skipped: {reason[-1] if reason else f'exit status {child.returncode}'}"
    return None


def _run(job_file: str) -> None:
    """Child process: write the PNGs (each to a temporary name, then renamed into place)."""
    import plotly.io as pio

    job = json.loads(Path(job_file).read_text())
    figures = [pio.from_json(Path(spec).read_text()) for spec in job["figures"]]
    finals = [Path(p) for p in job["paths"]]
    staging = Path(job["staging"])  # made and removed by the parent, also when this process is killed
    try:
        import kaleido

        # mathjax=False: kaleido would otherwise load MathJax from a CDN; plotly.js comes from the installed plotly
        specs = [{"fig": fig.to_dict(), "path": staging / final.name,
                  "opts": {"format": "png", "width": fig.layout.width or 1000, "height": fig.layout.height or 500,
                           "scale": 2}}
                 for fig, final in zip(figures, finals)]  # fmt: skip
        kaleido.write_fig_from_object_sync(specs, kopts={"path": job["browser"], "mathjax": False, "enable_extensions": False})
        for final in finals:
            os.replace(staging / final.name, final)
    except BaseException as error:
        print(f"{type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover - exercised through export_pngs in a child process
    _run(sys.argv[1])
