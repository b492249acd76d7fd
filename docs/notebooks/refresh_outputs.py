"""Re-execute the notebooks in this folder and store their outputs (text, tables, figures as PNG) in place.

``.venv/bin/python docs/notebooks/refresh_outputs.py`` from the repository root (PNGs need Chromium for kaleido;
without it figures are stored as plotly JSON only). tests/e2e/test_notebooks.py executes the notebooks in CI and checks
that the committed ones carry outputs and a heatmap.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _figure_output(fig) -> dict:
    data = {"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": [f"<plotly figure: {fig.layout.title.text}>"]}
    from vlm_lens.experiments.report.png_export import export_pngs

    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = export_pngs(Path(tmp), [fig], ["figure"])
        if paths:
            data["image/png"] = base64.b64encode(Path(paths[0]).read_bytes()).decode()
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _result_output(value, count: int) -> dict | None:
    if value is None:
        return None
    if type(value).__module__.startswith("plotly"):
        return _figure_output(value)
    data = {"text/plain": repr(value).splitlines(True)}
    if hasattr(value, "to_html"):
        data["text/html"] = value.to_html().splitlines(True)
    return {"output_type": "execute_result", "execution_count": count, "data": data, "metadata": {}}


def run_cell(source: str, namespace: dict, count: int) -> list[dict]:
    """Execute one cell like a notebook: printed text, then the value of a final expression."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(tree, f"cell {count}", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), f"cell {count}", "eval"), namespace) if last else None
    outputs = [{"output_type": "stream", "name": "stdout", "text": stdout.getvalue().splitlines(True)}] if stdout.getvalue() else []
    result = _result_output(value, count)
    return outputs + ([result] if result else [])


def refresh(path: Path) -> None:
    notebook = json.loads(path.read_text())
    namespace: dict = {"__name__": "__main__"}
    count = 0
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        cell["outputs"] = run_cell("".join(cell["source"]), namespace, count)
        cell["execution_count"] = count
    path.write_text(json.dumps(notebook, indent=1) + "\n")
    print(f"{path.name}: {count} cells executed", file=sys.stderr)


if __name__ == "__main__":
    for notebook in sorted(HERE.glob("*.ipynb")):
        refresh(notebook)
