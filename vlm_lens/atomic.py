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


def write_file(path: str | Path, data: str | bytes | Callable[[str], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to ``path`` atomically."""
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
        os.replace(tmp, path)
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
