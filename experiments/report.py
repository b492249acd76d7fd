"""Reports: one self-contained offline HTML page (plotly.js inlined once, no CDN), ``report.json`` with every number
behind it, and PNG files of each figure when a browser for kaleido is present.

Token text reaches the page only through ``html.escape`` (tables) or plotly's JSON (figures, with ``<``/``>``/``&``
escaped as unicode so no token can close a ``<script>``). Files are written atomically.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any


STAGE_COLORS = {"rapid_evolution": "rgba(255,99,71,0.15)", "stabilization": "rgba(60,179,113,0.15)",
                "mutation": "rgba(147,112,219,0.2)"}  # fmt: skip
GROUP_COLORS = {"rapid_evolution": "#FF6347", "stabilization": "#3CB371", "mutation": "#9370DB"}  # the bands' hues


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


def _label(text: str) -> str:
    """Token text for a plotly label: plotly renders a subset of HTML, so ``</s>`` would vanish unescaped."""
    return html.escape(str(text), quote=False)


def js_heatmap(js: list[list[float]], tokens: list[str], transitions: list[str], title: str):
    import plotly.graph_objects as go

    labels = [_label(f"{i}:{t}") for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=js, x=transitions, y=labels, colorscale="Purples"))
    fig.update_layout(title=_label(title), xaxis_title="layer transition", yaxis_title="generated token",
                      yaxis_autorange="reversed", height=max(320, 24 * len(tokens) + 140))  # fmt: skip
    return fig


LAYER_AXIS = "stack layer (0 = embeddings, l = after decoder layer l-1)"


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
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    else:
        picture.thumbnail((width, width))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return (f"<div class='card'><img alt='input image' src='data:image/png;base64,{data}' "
            f"style='image-rendering:pixelated;width:{width}px'><table>{cells}</table></div>")  # fmt: skip


def prob_heatmap(probs: list[list[float]], tokens: list[str], title: str,
                 markers: list[tuple[int | None, int | None]] | None = None):  # fmt: skip
    """P(emitted token) per stack layer (x) and generated token (y): where each answer appears.

    ``markers[i] = (critical, mutation)``: token i's own critical layer (a diamond) and mutation layer (a cross;
    None without an event), drawn on its row."""
    import plotly.graph_objects as go

    rows = [_label(f"{i}: {t}") for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=probs, x=list(range(len(probs[0]) if probs else 0)), y=rows, colorscale="Viridis",
                               zmin=0, zmax=1, colorbar=dict(title="p")))  # fmt: skip
    for index, (name, symbol) in enumerate((("critical layer (this token)", "diamond-open"),
                                            ("mutation layer (this token)", "x-thin-open"))):  # fmt: skip
        points = [(m[index], rows[i]) for i, m in enumerate(markers or []) if m[index] is not None]
        if points:
            fig.add_trace(go.Scatter(x=[x for x, _ in points], y=[y for _, y in points], mode="markers", name=name,
                                     marker=dict(symbol=symbol, size=14, color="#ff2d55", line=dict(width=2.5, color="#ff2d55"))))  # fmt: skip
    if markers:  # the legend under the chart: beside it, it would sit on the colour bar
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.45, x=0))
    fig.update_layout(title=_label(title), xaxis_title=LAYER_AXIS, yaxis_title="generated token", yaxis_autorange="reversed",
                      height=max(260, 28 * len(tokens) + 150) + (40 if markers else 0), xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


def top1_grid(top_tokens: list[list[list[str]]], top_probs: list[list[list[float]]], tokens: list[str], title: str):
    """The lens's top-1 token at every (generated token, layer), coloured by its probability; top-5 on hover.

    ``top_tokens[step][layer][k]`` / ``top_probs[step][layer][k]``."""
    import plotly.graph_objects as go

    text = [[_label(cell[0]) for cell in row] for row in top_tokens]
    hover = [["<br>".join(f"{_label(t)}: {p:.3f}" for t, p in zip(cells, probs)) for cells, probs in zip(row, prow)]
             for row, prow in zip(top_tokens, top_probs)]  # fmt: skip
    fig = go.Figure(go.Heatmap(z=[[probs[0] for probs in prow] for prow in top_probs], text=text, texttemplate="%{text}",
                               hovertext=hover, hoverinfo="text", colorscale="Blues", zmin=0, zmax=1,
                               x=list(range(len(top_tokens[0]) if top_tokens else 0)),
                               y=[_label(f"{i}: {t}") for i, t in enumerate(tokens)], colorbar=dict(title="top-1 p")))  # fmt: skip
    fig.update_layout(title=_label(title), xaxis_title=LAYER_AXIS, yaxis_title="generated token", yaxis_autorange="reversed",
                      height=max(260, 32 * len(tokens) + 150), xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


def skip_chart(sets: dict, sweep: dict, title: str):
    """Layer skipping: accuracy and generation agreement per skip set (bars) and per single skipped layer (lines)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        subplot_titles=("skip sets", "single decoder layer skipped"))  # fmt: skip
    names = list(sets)
    for key, colour in (("accuracy", "#9370DB"), ("generation_agreement", "#3CB371")):
        values = [sets[n][key] for n in names]
        if any(v is not None for v in values):
            fig.add_trace(go.Bar(x=names, y=values, name=key.replace("_", " "), marker_color=colour,
                                 legendgroup=key), row=1, col=1)  # fmt: skip
            if sweep:
                fig.add_trace(go.Scatter(x=[int(k) for k in sweep], y=[sweep[k][key] for k in sweep], mode="lines+markers",
                                         name=f"{key.replace('_', ' ')} (sweep)", line=dict(color=colour),
                                         legendgroup=key, showlegend=False), row=1, col=2)  # fmt: skip
    fig.update_yaxes(range=[0, 1.05])
    fig.update_xaxes(title_text="decoder layer", row=1, col=2, tickmode="linear", dtick=1)
    fig.update_layout(title=_label(title), height=380, barmode="group")
    return fig


def token_probability_chart(layers: list[str], curves: dict[str, list[float]], title: str, stages: dict | None,
                            marker_label: str = "this token"):  # fmt: skip
    """Paper Fig. P: one filled area per candidate token, overlapping (not stacked); x = stack layer index. ``stages``
    are this token's own (:func:`~vlm_lens.experiments.knowledge_evolution.token_stages`)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    x = list(range(len(layers)))
    for token, probs in curves.items():
        fig.add_trace(go.Scatter(x=x, y=probs, name=_label(token), fill="tozeroy", mode="lines", opacity=0.6))
    _stage_bands(fig, stages, len(layers) - 1, 1.0, label=marker_label)
    fig.update_layout(title=_label(title), xaxis_title=LAYER_AXIS, yaxis_title="probability", yaxis_range=[0, 1.05],
                      height=380, xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


def stage_profile(layers: list[str], transitions: list[str], median_js: list[float], stages: dict | None, title: str,
                  spread: dict | None = None, marker_label: str = "median"):  # fmt: skip
    """Median adjacent-layer JS plotted at the layer each transition leads into (1..n), with the aggregate stage
    bands; ``marker_label`` says what the critical / mutation lines are (e.g. "median over 12 tokens")."""
    import plotly.graph_objects as go

    x = list(range(1, len(layers)))
    fig = go.Figure(go.Scatter(x=x, y=median_js, mode="lines+markers", name="median adjacent JS",
                               text=[f"{l - 1}→{l}" for l in x]))  # fmt: skip
    positive = sorted(v for v in median_js if v > 0)
    log = len(positive) > 2 and positive[-1] > 20 * positive[len(positive) // 2]  # one transition dwarfs the rest
    # a log axis cannot show 0: there the marker lines start below the smallest positive value
    _stage_bands(fig, stages, len(layers) - 1, max(median_js, default=1.0), positive[0] / 2 if log else 0.0,
                 label=marker_label)  # fmt: skip
    if spread is not None and spread.get("q1") is not None:
        fig.add_vrect(x0=spread["q1"] - 0.5, x1=spread["q3"] + 0.5, fillcolor="rgba(0,0,0,0)", line_width=1,
                      line_dash="dash", line_color="grey")  # fmt: skip
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="grey", dash="dash"),
                                 name=f"critical layers q1-q3 ({spread['q1']:g}-{spread['q3']:g})"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=f"{LAYER_AXIS}; JS of the transition into it",
                      yaxis_title="JS (nats, log scale)" if log else "JS (nats)", yaxis_type="log" if log else "linear",
                      height=380, xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


def _stage_bands(fig, stages: dict | None, n_layers: int, y_top: float, y_bottom: float = 0.0, *,
                 label: str = "") -> None:  # fmt: skip
    """Stage bands over stack layers (a half-open [start, end) covers x in [start - 0.5, end - 0.5]) and the
    critical / mutation layers as dashed / dotted lines with legend entries (``label`` says whose: "this token",
    "median over 12 tokens")."""
    import plotly.graph_objects as go

    if not stages:
        return
    for name in ("rapid_evolution", "stabilization", "mutation"):
        if not stages.get(name):
            continue  # no mutation stage detected
        start, end = stages[name]
        fig.add_vrect(x0=start - 0.5, x1=min(end, n_layers + 1) - 0.5, fillcolor=STAGE_COLORS[name], line_width=0,
                      layer="below")  # fmt: skip
        fig.add_annotation(x=(start + min(end, n_layers + 1) - 1) / 2, y=1.0, yref="paper", yanchor="bottom",
                           text=name.replace("_", " "), showarrow=False, font=dict(size=11))  # fmt: skip
    for key, dash in (("critical_layer", "dash"), ("mutation_layer", "dot")):
        if stages.get(key) is not None:
            layer = stages[key]
            name = f"{key.replace('_', ' ')} {layer}" + (f" ({label})" if label else "")
            fig.add_trace(go.Scatter(x=[layer, layer], y=[y_bottom, y_top], mode="lines", name=name,
                                     line=dict(color="black", dash=dash, width=1.5)))  # fmt: skip


def scatter_view(coords: list, layers: list[str], items: list[str], groups: list[str], title: str):
    """t-SNE/PCA points (layer x item), coloured by the stage of their layer (embedding layer dropped)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_group: dict[str, dict[str, list]] = {}
    offset = len(groups) - len(layers)  # the projection dropped the embedding layer
    for li, layer in enumerate(layers):
        group = groups[li + offset]
        bucket = by_group.setdefault(group, {"x": [], "y": [], "text": []})
        for ii, item in enumerate(items):
            x, y = coords[li][ii]
            bucket["x"].append(x)
            bucket["y"].append(y)
            bucket["text"].append(_label(f"layer {layer} · {item}"))
    for group, pts in by_group.items():
        fig.add_trace(go.Scatter(x=pts["x"], y=pts["y"], text=pts["text"], mode="markers", name=group,
                                 marker=dict(color=GROUP_COLORS.get(group), size=6, opacity=0.75)))  # fmt: skip
    fig.update_layout(title=_label(title), height=420, xaxis_showticklabels=False, yaxis_showticklabels=False)
    return fig


def line_chart(x: list[str], series: dict[str, list[float | None]], title: str, y_title: str):
    """Per-layer series; x = stack layer index (``x`` gives the number of layers)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=_label(name)))
    fig.update_layout(title=_label(title), xaxis_title=LAYER_AXIS, yaxis_title=y_title, height=340,
                      xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


# -- page --------------------------------------------------------------------------------------------------


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
    written = {"html": str(out_dir / "report.html"), "json": str(out_dir / "report.json"), "png": []}
    if png:
        written["png"], written["png_notice"] = export_pngs(out_dir, [f for _, items in sections for f in items
                                                                      if not isinstance(f, str)])  # fmt: skip
        written["png"] = written["png"] or []
    return written


def export_pngs(out_dir: Path, figures: list) -> tuple[list[str], str | None]:
    """PNG files of ``figures`` named by :func:`png_names` (offline browser, bounded in time;
    :mod:`vlm_lens.experiments.png_export`), or a notice."""
    from vlm_lens.experiments.png_export import export_pngs as export

    return export(out_dir, figures, png_names(figures))
