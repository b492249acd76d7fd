"""One atomic-write helper for files and folders: readable permissions, and a failed replacement keeps the old one."""

import os
import stat

import pytest

from vlm_lens.atomic import write_file, write_folder


def test_files_are_replaced_whole_and_readable(tmp_path):
    target = tmp_path / "a" / "report.json"
    write_file(target, "old")
    write_file(target, b"new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~mask  # not mkstemp's 0600: others may read the report

    def fails(path):
        open(path, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_file(target, fails)
    assert target.read_text() == "new" and len(list(target.parent.iterdir())) == 1


def test_a_folder_is_swapped_in_and_a_failure_keeps_the_old_one(tmp_path):
    target = tmp_path / "result"
    with write_folder(target) as tmp:
        (tmp / "x.json").write_text("1")
    with write_folder(target) as tmp:
        (tmp / "y.json").write_text("2")
    assert [p.name for p in target.iterdir()] == ["y.json"]  # replaced, not merged
    with pytest.raises(RuntimeError):
        with write_folder(target) as tmp:
            (tmp / "z.json").write_text("3")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["y.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no temporary folders left


def test_probe_results_overwrite_atomically(tmp_path):
    import torch

    from vlm_lens.probes import ProbeResult

    first = ProbeResult("p", {"v": torch.ones(2)}, {"v": ("layer",)}, {"layer": ["0", "1"]})
    second = ProbeResult("p", {"v": torch.zeros(2)}, {"v": ("layer",)}, {"layer": ["0", "1"]})
    first.save(tmp_path / "r")
    second.save(tmp_path / "r")
    assert torch.equal(ProbeResult.load(tmp_path / "r")["v"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


_STEPS = [("os", "replace"), ("os", "rename"), ("os", "symlink"), ("os", "link"), ("os", "unlink"), ("os", "chmod"),
          ("os", "rmdir"), ("shutil", "rmtree")]  # every state-changing call write_set and its helpers make


def _interrupt_after(monkeypatch, k: int) -> list:
    """Patch every state-changing call so that the k-th one (0-based) completes, then a KeyboardInterrupt lands."""
    import shutil

    calls = []
    for module_name, name in _STEPS:
        module = {"os": os, "shutil": shutil}[module_name]
        real = getattr(module, name)

        def wrapped(*args, __real=real, __name=name, **kwargs):
            result = __real(*args, **kwargs)
            calls.append(__name)
            if len(calls) == k + 1:
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(module, name, wrapped)
    return calls


def _pair(folder):
    return tuple((folder / name).read_text() if (folder / name).exists() else None for name in ("report.json", "report.html"))


@pytest.mark.parametrize("layout", ["set", "plain files", "empty"])
def test_a_report_pair_survives_an_interrupt_after_every_step(tmp_path, monkeypatch, layout):
    from vlm_lens.atomic import CURRENT, write_set

    def prepare(folder):
        folder.mkdir()
        if layout == "set":
            write_set(folder, {"report.json": "old", "report.html": "old"})
        elif layout == "plain files":  # an earlier version wrote plain files
            for name in ("report.json", "report.html"):
                (folder / name).write_text("old")
        return _pair(folder)

    steps, k = None, 0
    while steps is None or k < steps:
        folder = tmp_path / f"{layout.replace(' ', '-')}-{k}"
        before = prepare(folder)
        with monkeypatch.context() as patch:
            calls = _interrupt_after(patch, k)
            try:
                write_set(folder, {"report.json": "new", "report.html": "new"})
                steps = len(calls)  # ran to the end: every step has been interrupted once
            except KeyboardInterrupt:
                pass
        after = _pair(folder)
        assert after in (before, ("new", "new")), (layout, k, calls, after)  # the old pair or the new one, whole
        if (folder / CURRENT).is_symlink():
            assert (folder / CURRENT).resolve().is_dir(), (layout, k, calls)  # nothing published was deleted
        write_set(folder, {"report.json": "next", "report.html": "next"})  # and the folder stays usable
        assert _pair(folder) == ("next", "next")
        k += 1
    assert steps >= 4
