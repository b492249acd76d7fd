"""What every sample source is made of: :class:`Entry` (one row), :class:`Source` (sized, re-iterable, lazy), and the
row checks the sources in :mod:`vlm_lens.experiments.runs.datasets` share (a bad row names itself and the fix)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from vlm_lens.errors import InputError, NotFoundError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SKIP_HINT = " or pass --skip-bad to skip and record bad rows"


@dataclass(frozen=True)
class Entry:
    index: int  # 0-based position in the source; stable across runs
    id: str  # unique sample id
    image: Any  # a path string, a PIL.Image (HF rows with embedded bytes), or None (a bad row)
    question: str
    answer: str | None
    where: str  # "m.jsonl:12", "m.csv:5", "dataset DIR row 12", "DIR/cat.jpg"
    error: str | None = None  # a bad row's message, when skip_bad
    planted: bool = False  # a counter-prior question of a planted fixture (from_samples only)


class Source:
    """A sized, re-iterable, lazy sequence of :class:`Entry`; ``fingerprint`` is computed on first use."""

    def __init__(self, description: str, length: int, entries: Callable[[], Iterator[Entry]], fingerprint: Callable):
        self.description, self._length, self.entries_from, self._fingerprint = description, length, entries, fingerprint

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Entry]:
        return self.entries_from()

    @functools.cached_property
    def fingerprint(self) -> str:
        return self._fingerprint()


class BadRow(Exception):
    """A bad row: ``BadRow(message[, the exception type to raise, InputError by default])``."""


def digest(*parts: Any) -> str:
    """A stable SHA-256 of JSON-able parts (a source's fingerprint)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def text_of(value: Any) -> str:
    """A cell as stripped text (None -> empty)."""
    return "" if value is None else str(value).strip()


def check_file(path: Path, where: str, origin: str, hint: str) -> str:
    """``path`` as a string when it is a readable image file, else a :class:`BadRow` naming the row and the fix."""
    if not path.is_file():
        raise BadRow(f"{where}: image not found: {path}{origin}; fix the path{hint}", NotFoundError)
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise BadRow(f"{where}: unreadable image {path} ({type(error).__name__}: {error}); replace the file{hint}") from None
    return str(path)


def entries_from(records: Callable[[], Iterable[tuple]], resolve: Callable, skip_bad: bool, unit: str, check: bool = True):
    """Entries of ``(where, here, id, question, answer, image or a BadRow)`` records; a repeated id is a bad row."""
    seen: dict[str, str] = {}
    for index, (where, here, key, question, answer, image) in enumerate(records()):
        key = key or f"row-{index}"
        try:
            if isinstance(image, BadRow):
                raise image
            if key in seen:  # the bad row's own id becomes key@line-N
                first, key = seen[key], f"{key}@{unit}-{here}"
                raise BadRow(f"{where}: id {key.rsplit('@', 1)[0]!r} at {unit} {here} repeats {unit} {first}; "
                           "give every row a unique id")  # fmt: skip
            seen[key] = here
            entry = Entry(index, key, resolve(image, where) if check else None, question, answer, where)
        except BadRow as bad:
            if not skip_bad:
                raise (bad.args[1:] or [InputError])[0](bad.args[0]) from None
            entry = Entry(index, key, None, question, answer, where, error=bad.args[0])
        yield entry
