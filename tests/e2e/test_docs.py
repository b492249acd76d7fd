"""Every python block of README.md and docs/*.md runs as written (on the embedded models), and prints what the page
says it prints.

Blocks of one page run in order in one namespace (a page reads top to bottom), in a fresh working folder. A python
block followed by "prints" and a plain fenced block must print exactly that block's text.
"""

import contextlib
import io
import linecache
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```(?:\n\nprints\n\n```\n(.*?)```)?", re.S)


def python_blocks(page: Path) -> list[tuple[str, str | None]]:
    """``(code, printed or None)`` of every python block of ``page``."""
    return [(code, printed) for lang, code, printed in FENCE.findall(page.read_text()) if lang == "python"] if page.exists() else []


WITH_CODE = [page for page in PAGES if python_blocks(page)]


def test_the_pages_with_code_are_all_found():
    names = {page.name for page in WITH_CODE}
    assert {"README.md", "quickstart.md", "datasets.md", "backends.md", "extending.md", "zoo.md"} <= names


@pytest.mark.parametrize("page", WITH_CODE, ids=lambda p: p.name)
def test_every_python_block_runs_and_prints_what_the_page_says(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, (code, printed) in enumerate(python_blocks(page)):
        out, filename = io.StringIO(), f"{page.name}[python block {index}]"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # nnsight reads with-block source
        with contextlib.redirect_stdout(out):
            exec(compile(code, filename, "exec"), namespace)
        if printed:  # printed is an empty match ("") for a block without a "prints" block after it
            assert out.getvalue() == printed, f"{page.name} block {index} printed:\n{out.getvalue()}"


def test_the_roles_table_is_what_the_models_say():
    from benchmarks import family_matrix

    text = (ROOT / "docs" / "hooks.md").read_text()
    block = text[text.index("<!-- family-roles:start -->") + len("<!-- family-roles:start -->") : text.index("<!-- family-roles:end -->")]
    assert block.strip() == family_matrix.roles_table()
