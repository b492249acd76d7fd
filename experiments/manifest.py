"""Read (image, question[, answer, id]) pairs from a JSONL or CSV manifest.

Columns: ``image`` (a path; relative paths resolve against the manifest's folder), ``question``, optional
``answer`` and ``id``. Errors name the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vlm_lens.experiments.knowledge_evolution import Sample


def _sample(row: dict, where: str, folder: Path) -> Sample:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'image' and 'question', got {type(row).__name__}; "
                         "write one JSON object per line")
    missing = [key for key in ("image", "question") if not str(row.get(key) or "").strip()]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; every row needs 'image' and 'question'")
    path = Path(str(row["image"]))
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image not found: {path} (relative paths resolve against the manifest's folder)")
    answer = row.get("answer")
    answer = None if answer is None or str(answer).strip() == "" else str(answer)
    return Sample(path, str(row["question"]), answer, str(row.get("id") or path.name))


def read_manifest(path: str | Path) -> list[Sample]:
    """The samples of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` (header row) manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    folder = path.parent
    samples: list[Sample] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "question"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the header must name 'image' and 'question' columns, got {reader.fieldnames}")
            for row in reader:
                samples.append(_sample(row, f"{path}:{reader.line_num}", folder))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); write one object per line") from None
            samples.append(_sample(row, f"{path}:{number}", folder))
    else:
        raise ValueError(f"{path}: a manifest is .jsonl or .csv, got {path.suffix!r}")
    if not samples:
        raise ValueError(f"{path} lists no samples")
    return samples
