"""Reports: one self-contained offline HTML page (plotly.js inlined once, no CDN), ``report.json`` with every number
behind it, and PNG files of each figure when a browser for kaleido is present.

Token text reaches the page only through ``html.escape`` (tables) or plotly's JSON (figures, with ``<``/``>``/``&``
escaped as unicode so no token can close a ``<script>``). Files are written atomically. The figures themselves are
built in :mod:`vlm_lens.experiments.report.charts`.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any


def _safe_json(value: Any) -> str:
    return json.dumps(value, allow_nan=False, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _clean(value: Any) -> Any:
    """NaN/inf -> None so report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# -- figures (plotly) ----------------------------------------------------------------------------------------


def named(fig, name: str):
    """Give ``fig`` the file name its PNG gets (``stages_median_js`` -> ``stages_median_js.png``)."""
    fig.layout.meta = {"png_name": name}
    return fig


def png_names(figures: list) -> list[str]:
    """File stems for ``figures``: their given names (made unique and file-safe) or ``figure_NN``."""
    import re

    names, seen = [], set()
    for i, fig in enumerate(figures):
        meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
        raw = re.sub(r"\.(png|jpe?g|bmp|webp)(?![A-Za-z0-9])", "", str(meta.get("png_name") or f"figure_{i + 1:02d}"),
                     flags=re.I)  # fmt: skip
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "figure"
        candidate, k = stem, 2
        while candidate in seen:
            candidate, k = f"{stem}_{k}", k + 1
        seen.add(candidate)
        names.append(candidate)
    return names


def image_card(image, rows: list[tuple[str, Any]], width: int = 144) -> str:
    """An inline (base64 PNG) thumbnail of a sample's input image beside its prompt and answers."""
    import base64
    import io

    from PIL import Image

    picture = Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image.convert("RGB")
    scale = max(1, width // max(picture.size))
    if scale > 1:  # tiny shapes-world images: enlarge without blurring
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    else:
        picture.thumbnail((width, width))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return (f"<div class='card'><img alt='input image' src='data:image/png;base64,{data}' "
            f"style='image-rendering:pixelated;width:{width}px'><table>{cells}</table></div>")  # fmt: skip


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def paragraph(text: str) -> str:
    """Explanatory text for a section (escaped)."""
    return f"<p>{html.escape(text)}</p>"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "–"
    return str(value)


def render_html(title: str, sections: list[tuple[str, list]]) -> str:
    """A page of ``(heading, [plotly figure | html string])`` sections with plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    parts = []
    n = 0
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, str):
                parts.append(item)
            else:
                n += 1
                spec = item.to_plotly_json()
                parts.append(
                    f'<div class="plotly-graph-div" id="fig{n}" style="width:100%;"></div>'
                    f"<script>Plotly.newPlot('fig{n}', {_safe_json(spec.get('data', []))}, "
                    f"{_safe_json(spec.get('layout', {}))}, {{responsive: true}});</script>"
                )
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
             "th{background:#f3f0fa}h2{border-bottom:2px solid #9370DB;padding-bottom:4px}"
             ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{display:flex;gap:8px;align-items:flex-start;"
             "border:1px solid #ddd;padding:6px;border-radius:4px}.card table{margin:0}")  # fmt: skip
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style>"
        # page errors are collected into a visible box (and read by the headless-browser test)
        "<script>window.addEventListener('error',function(e){var box=document.getElementById('vlm-lens-errors');"
        "if(box){box.hidden=false;box.textContent+=e.message+'\\n';}});</script>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        "<pre id='vlm-lens-errors' hidden style='color:#b00'></pre>"
        f"<h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def write_report(out_dir: Path, title: str, sections: list[tuple[str, list]], data: dict, png: bool = True) -> dict:
    """Write ``report.html`` and ``report.json`` as one consistent pair (:func:`vlm_lens.atomic.write_set`: both
    switched in by one rename, the previous pair kept if anything fails) and PNGs of the figures when possible."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import uuid

    from vlm_lens.atomic import write_set

    run_id = uuid.uuid4().hex
    data = {**data, "run_id": run_id}  # both files carry it: a reader can check they belong together
    page = render_html(title, sections).replace("<head>", f"<head><meta name='vlm-lens-run' content='{run_id}'>", 1)
    write_set(out_dir, {"report.json": json.dumps(_clean(data), indent=1, allow_nan=False), "report.html": page})
    written: dict[str, Any] = {"html": str(out_dir / "report.html"), "json": str(out_dir / "report.json"), "png": []}
    if png:
        written["png"], written["png_notice"] = export_pngs(out_dir, figures_of(sections))
        written["png"] = written["png"] or []
    return written


def figures_of(sections: list[tuple[str, list]]) -> list:
    """The figures of drawn sections, in order (the items that are not HTML strings)."""
    return [f for _, items in sections for f in items if not isinstance(f, str)]


def export_pngs(out_dir: Path, figures: list) -> tuple[list[str], str | None]:
    """PNG files of ``figures`` named by :func:`png_names` (offline browser, bounded in time;
    :mod:`vlm_lens.experiments.report.png_export`), or a notice."""
    from vlm_lens.experiments.report.png_export import export_pngs as export

    return export(out_dir, figures, png_names(figures))
