"""The python blocks of docs pages run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


@pytest.mark.parametrize("page", ["extending.md"])
def test_page_runs(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    namespace: dict = {"__name__": f"docs_{page.replace('.', '_')}"}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)


def test_the_quickstart_per_token_evidence_block_prints_what_the_page_says(capsys):
    text = (DOCS / "quickstart.md").read_text()
    section = text[text.index("## Per-token evidence"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"prints\n\n```\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(DOCS / "quickstart.md"), "exec"), {"__name__": "docs_quickstart"})
    assert capsys.readouterr().out == printed
