"""The docs notebooks execute top to bottom (code cells run in order in one namespace)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "docs" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notebook = json.loads(path.read_text())
    namespace: dict = {"__name__": "__main__"}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)


def test_there_are_three_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_composing_probes", "02_patching", "03_new_probe"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_with_outputs_and_a_heatmap(path):
    """Readers see results without running anything (refresh with docs/notebooks/refresh_outputs.py)."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in cells if "print(" in "".join(c["source"])), "a printing cell has no stored output"
    figures = [o["data"]["application/vnd.plotly.v1+json"] for c in cells for o in c["outputs"]
               if "application/vnd.plotly.v1+json" in o.get("data", {})]  # fmt: skip
    assert any(trace.get("type") == "heatmap" for fig in figures for trace in fig["data"]), "no heatmap"
