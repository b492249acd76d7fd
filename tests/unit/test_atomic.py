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
