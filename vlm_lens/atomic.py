"""Atomic writes: one helper for files and one for folders, both correct when replacing an existing target.

A reader never sees a half-written file or folder: content goes to a temporary sibling (same file system), then is
renamed into place. Files are created with the usual permissions (0666 minus the umask, typically 0644), not the
0600 of ``mkstemp``. A folder replacement renames the old folder aside first, so if the swap fails the old one is
restored; it is removed only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_path(path: str | Path) -> None:
    """Flush a file's or folder's data and metadata to the disk (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: str | bytes | Callable[[str], None], *, durable: bool = False) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to ``path`` atomically.

    ``durable=True``: the content is fsynced before the rename and the folder after it, so the file survives a power
    loss whole once this returns (what the trusted stores do before they write a commit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, _umask_mode(0o666))
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def write_folder(path: str | Path) -> Iterator[Path]:
    """``with write_folder(dest) as tmp:`` fill ``tmp``; on success it replaces ``dest`` in one rename (the old
    folder, if any, is moved aside first and deleted after); on error ``dest`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        if path.exists():
            os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside.exists():
                os.rename(aside, path)  # put the old folder back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CURRENT = ".current"  # symlink to the folder holding the current set of a pair-written folder
RUNS = ".runs"


def write_set(out_dir: str | Path, files: dict[str, str | bytes], *, stale_after_s: float = 3600.0) -> dict[str, Path]:
    """Write ``files`` (name -> content) into ``out_dir`` as one consistent set: a reader never sees one file of a
    run beside another file of a different run, and a write that fails or is interrupted at any instruction (full
    disk, SIGINT) leaves either the previous set or the new one, complete; nothing published is deleted.

    The files go into a fresh folder ``out_dir/.runs/run-XXXX``; one atomic rename of the symlink
    ``out_dir/.current`` then switches every name at once; ``out_dir/NAME`` is a fixed symlink to ``.current/NAME``.
    A folder holding plain files from an older version is first turned into that layout *with its old content* (the
    files are hard-linked into a run folder of their own, ``.current`` points at it, each name becomes a symlink to
    the same bytes), so the switch stays one rename. Two writers racing on one folder each install a complete set;
    the last rename wins. The previous set's folder is removed after the switch, and leftovers of killed writers once
    older than ``stale_after_s``. To read two files of one set, resolve ``out_dir/.current`` once.
    """
    import time

    out = Path(out_dir)
    runs = out / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    for name in files:
        if "/" in name or name in (CURRENT, RUNS):
            from vlm_lens.errors import InputError

            raise InputError(f"a set's file names are plain names, got {name!r}")
    tmp = Path(tempfile.mkdtemp(dir=runs, prefix="run-"))
    current = out / CURRENT
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
            os.chmod(tmp / name, _umask_mode(0o666))
        os.chmod(tmp, _umask_mode(0o777))
        _adopt_plain_files(out, list(files))  # the old layout becomes the new one, content unchanged
        previous = os.readlink(current) if current.is_symlink() else None
        _symlink_atomically(os.path.relpath(tmp, out), current)  # the switch: one rename
    except BaseException:
        # read the state, not a flag: an interrupt can land between the rename and any assignment after it
        if not (current.is_symlink() and (out / os.readlink(current)).resolve() == tmp.resolve()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous and (out / previous).resolve() != tmp.resolve():
        shutil.rmtree(out / previous, ignore_errors=True)
    now = time.time()
    for old in runs.glob("run-*"):
        try:
            stale = old.resolve() != tmp.resolve() and now - old.stat().st_mtime > stale_after_s
        except FileNotFoundError:  # a concurrent writer removed it between the listing and the stat
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)
    return {name: out / name for name in files}


def _symlink_atomically(target: str, path: Path) -> None:
    """Make ``path`` a symlink to ``target`` in one rename (a temporary link beside it is removed if the rename fails)."""
    link = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    os.symlink(target, link)
    try:
        os.replace(link, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(link)
        raise


def _adopt_plain_files(out: Path, names: list[str]) -> None:
    """Turn ``out/NAME`` into symlinks to ``.current/NAME`` without changing what any name reads.

    Plain files of an older version are hard-linked into a run folder of their own, which ``.current`` points at
    when nothing else does; then each name is swapped for a symlink to the same bytes. Interrupted anywhere, every
    name still reads its old content."""
    current = out / CURRENT
    plain = [n for n in names if (out / n).is_file() and not (out / n).is_symlink()]
    if plain and not current.is_symlink():
        legacy = Path(tempfile.mkdtemp(dir=out / RUNS, prefix="run-"))
        for name in plain:
            os.link(out / name, legacy / name)
        os.chmod(legacy, _umask_mode(0o777))
        _symlink_atomically(os.path.relpath(legacy, out), current)
    for name in names:
        target = os.path.join(CURRENT, name)
        path = out / name
        if path.is_symlink() and os.readlink(path) == target:
            continue
        if path.is_file() and not (current / name).is_file():
            continue  # a plain file the current set lacks: keep it until a set that has it is current
        _symlink_atomically(target, path)
