"""Read (image, question[, answer, id]) pairs from a JSONL or CSV manifest.

Columns: ``image`` (a path; relative paths resolve against the manifest's folder), ``question``, optional
``answer`` and ``id``. Errors name the file, the line and the fix. One implementation with ``vlm-lens analyze``'s
streaming sources: :func:`vlm_lens.experiments.runs.datasets.from_manifest`.
"""

from __future__ import annotations

from pathlib import Path

from vlm_lens.experiments.analysis.knowledge_evolution import Sample
from vlm_lens.experiments.runs.datasets import from_manifest


def read_manifest(path: str | Path) -> list[Sample]:
    """The samples of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` (header row) manifest; raises on the
    first bad row (``tune-lens`` has no ``--skip-bad``)."""
    source = from_manifest(path, _hint="")  # no "or pass --skip-bad" in its errors
    return [Sample(Path(entry.image), entry.question, entry.answer, entry.id) for entry in source]
