"""Benchmark results written into the docs between markers (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``), so a
rerun replaces its own block and leaves the page's prose alone; the page is written atomically."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_block(page: str, name: str, body: str, heading: str) -> None:
    """Put ``body`` between the ``name`` markers of ``docs/page`` (appended under ``heading`` when they are absent)."""
    from vlm_lens.atomic import write_file

    path = ROOT / "docs" / page
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n{heading}\n\n{block}\n"
    write_file(path, text)
