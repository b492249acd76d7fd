"""Output paths checked before a run does its work: a run that can only fail to write at its end is refused at its
start (the CLI maps :class:`~vlm_lens.errors.InputError` to exit 2 with one line)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from vlm_lens.errors import InputError


def check_output(path: Optional[Path], option: str, *, folder: bool = True) -> None:
    """Refuse an output path that the run could only fail to write *after* its work: a file where a folder is wanted
    (or the reverse), or a place under a folder this user cannot write. Checked before any model is loaded."""
    if path is None:
        return
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file: name a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise InputError(f"{option} {path} is a folder: name the file to write")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {parent} is not writable by this user; choose a folder you can write")
