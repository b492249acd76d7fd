"""The report's figures: plotly charts over stack layers, each a small function of plain lists (the report module
turns them into HTML and PNG; :mod:`vlm_lens.experiments.report.sections` decides what goes where)."""

from __future__ import annotations

import html

STAGE_COLORS = {"rapid_evolution": "rgba(255,99,71,0.15)", "stabilization": "rgba(60,179,113,0.15)",
                "mutation": "rgba(147,112,219,0.2)"}  # fmt: skip
GROUP_COLORS = {"rapid_evolution": "#FF6347", "stabilization": "#3CB371", "mutation": "#9370DB"}  # the bands' hues
LAYER_AXIS = "stack layer (0 = embeddings, l = after decoder layer l-1)"


def label(text: str) -> str:
    """Token text for a plotly label: plotly renders a subset of HTML, so ``</s>`` would vanish unescaped."""
    return html.escape(str(text), quote=False)


def js_heatmap(js: list[list[float]], tokens: list[str], transitions: list[str], title: str):
    import plotly.graph_objects as go

    labels = [label(f"{i}:{t}") for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=js, x=transitions, y=labels, colorscale="Purples"))
    fig.update_layout(title=label(title), xaxis_title="layer transition", yaxis_title="generated token",
                      yaxis_autorange="reversed", height=max(320, 24 * len(tokens) + 140))  # fmt: skip
    return fig

def prob_heatmap(probs: list[list[float]], tokens: list[str], title: str,
                 markers: list[tuple[int | None, int | None]] | None = None):  # fmt: skip
    """P(emitted token) per stack layer (x) and generated token (y): where each answer appears.

    ``markers[i] = (critical, mutation)``: token i's own critical layer (a diamond) and mutation layer (a cross;
    None without an event), drawn on its row."""
    import plotly.graph_objects as go

    rows = [label(f"{i}: {t}") for i, t in enumerate(tokens)]
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
    fig.update_layout(title=label(title), xaxis_title=LAYER_AXIS, yaxis_title="generated token", yaxis_autorange="reversed",
                      height=max(260, 28 * len(tokens) + 150) + (40 if markers else 0), xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig

def top1_grid(top_tokens: list[list[list[str]]], top_probs: list[list[list[float]]], tokens: list[str], title: str):
    """The lens's top-1 token at every (generated token, layer), coloured by its probability; top-5 on hover.

    ``top_tokens[step][layer][k]`` / ``top_probs[step][layer][k]``."""
    import plotly.graph_objects as go

    text = [[label(cell[0]) for cell in row] for row in top_tokens]
    hover = [["<br>".join(f"{label(t)}: {p:.3f}" for t, p in zip(cells, probs)) for cells, probs in zip(row, prow)]
             for row, prow in zip(top_tokens, top_probs)]  # fmt: skip
    fig = go.Figure(go.Heatmap(z=[[probs[0] for probs in prow] for prow in top_probs], text=text, texttemplate="%{text}",
                               hovertext=hover, hoverinfo="text", colorscale="Blues", zmin=0, zmax=1,
                               x=list(range(len(top_tokens[0]) if top_tokens else 0)),
                               y=[label(f"{i}: {t}") for i, t in enumerate(tokens)], colorbar=dict(title="top-1 p")))  # fmt: skip
    fig.update_layout(title=label(title), xaxis_title=LAYER_AXIS, yaxis_title="generated token", yaxis_autorange="reversed",
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
    fig.update_layout(title=label(title), height=380, barmode="group")
    return fig

def token_probability_chart(layers: list[str], curves: dict[str, list[float]], title: str, stages: dict | None,
                            marker_label: str = "this token"):  # fmt: skip
    """Paper Fig. P: one filled area per candidate token, overlapping (not stacked); x = stack layer index. ``stages``
    are this token's own (:func:`~vlm_lens.experiments.report.sections.token_stages`)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    x = list(range(len(layers)))
    for token, probs in curves.items():
        fig.add_trace(go.Scatter(x=x, y=probs, name=label(token), fill="tozeroy", mode="lines", opacity=0.6))
    stage_bands(fig, stages, len(layers) - 1, 1.0, label=marker_label)
    fig.update_layout(title=label(title), xaxis_title=LAYER_AXIS, yaxis_title="probability", yaxis_range=[0, 1.05],
                      height=380, xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig

def stage_profile(layers: list[str], transitions: list[str], median_js: list[float], stages: dict | None, title: str,
                  spread: dict | None = None, marker_label: str | dict = "median"):  # fmt: skip
    """Median adjacent-layer JS plotted at the layer each transition leads into (1..n), with the aggregate stage
    bands; ``marker_label`` says what the critical / mutation lines are (e.g. "median over 12 tokens"; a dict gives
    each line its own: ``{"critical_layer": ..., "mutation_layer": ...}``)."""
    import plotly.graph_objects as go

    x = list(range(1, len(layers)))
    fig = go.Figure(go.Scatter(x=x, y=median_js, mode="lines+markers", name="median adjacent JS",
                               text=[f"{l - 1}→{l}" for l in x]))  # fmt: skip
    positive = sorted(v for v in median_js if v > 0)
    log = len(positive) > 2 and positive[-1] > 20 * positive[len(positive) // 2]  # one transition dwarfs the rest
    # a log axis cannot show 0: there the marker lines start below the smallest positive value
    stage_bands(fig, stages, len(layers) - 1, max(median_js, default=1.0), positive[0] / 2 if log else 0.0,
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

def stage_bands(fig, stages: dict | None, n_layers: int, y_top: float, y_bottom: float = 0.0, *,
                 label: str | dict = "") -> None:  # fmt: skip
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
            text = label.get(key, "") if isinstance(label, dict) else label
            name = f"{key.replace('_', ' ')} {layer}" + (f" ({text})" if text else "")
            fig.add_trace(go.Scatter(x=[layer, layer], y=[y_bottom, y_top], mode="lines", name=name,
                                     line=dict(color="black", dash=dash, width=1.5)))  # fmt: skip

def scatter_view(coords: list, layers: list[str], items: list[str], groups: list[str], title: str):
    """t-SNE/PCA points (layer x item), coloured by the stage of their layer, marker size growing with the layer
    (embedding layer dropped)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_group: dict[str, dict[str, list]] = {}
    offset = len(groups) - len(layers)  # the projection dropped the embedding layer
    for li, layer in enumerate(layers):
        group = groups[li + offset]
        bucket = by_group.setdefault(group, {"x": [], "y": [], "text": [], "size": []})
        size = 4 + 10 * li / max(1, len(layers) - 1)  # the layer cue: small points early, large points deep
        for ii, item in enumerate(items):
            x, y = coords[li][ii]
            bucket["x"].append(x)
            bucket["y"].append(y)
            bucket["text"].append(label(f"layer {layer} · {item}"))
            bucket["size"].append(size)
    for group, pts in by_group.items():
        fig.add_trace(go.Scatter(x=pts["x"], y=pts["y"], text=pts["text"], mode="markers", name=group,
                                 marker=dict(color=GROUP_COLORS.get(group), size=pts["size"], opacity=0.75)))  # fmt: skip
    fig.update_layout(title=label(title), height=420, xaxis_showticklabels=False, yaxis_showticklabels=False)
    return fig

def patch_overlay(image, prob: list, layers: list[int], title: str):
    """Small multiples: the probability of a token at every image token (``prob`` ``[layer][row][col]``) drawn over
    the input image for each of ``layers`` (stack indices), the token grid visible (one cell per image token)."""
    import base64
    import io

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = len(prob[0]), len(prob[0][0])
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {layer}" for layer in layers],
                        horizontal_spacing=0.04)  # fmt: skip
    source = None
    if image is not None:
        from PIL import Image

        picture = image if isinstance(image, Image.Image) else Image.open(image)
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format="PNG")
        source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    for k, layer in enumerate(layers, start=1):
        fig.add_trace(go.Heatmap(z=prob[layer], zmin=0, zmax=1, colorscale="Magma", opacity=0.55, xgap=2, ygap=2,
                                 showscale=k == len(layers), hovertemplate="row %{y}, col %{x}: p=%{z:.3f}<extra></extra>"),
                      row=1, col=k)  # fmt: skip
        if source is not None:
            fig.add_layout_image(source=source, xref=f"x{k}", yref=f"y{k}", x=-0.5, y=-0.5, sizex=cols, sizey=rows,
                                 sizing="stretch", layer="below", xanchor="left", yanchor="top")  # fmt: skip
        fig.update_xaxes(showticklabels=False, range=[-0.5, cols - 0.5], row=1, col=k)
        fig.update_yaxes(showticklabels=False, range=[rows - 0.5, -0.5], scaleanchor=f"x{k}", row=1, col=k)
    fig.update_layout(title=label(title), height=300, margin=dict(t=70))
    return fig


def line_chart(x: list[str], series: dict[str, list[float | None]], title: str, y_title: str):
    """Per-layer series; x = stack layer index (``x`` gives the number of layers)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=label(name)))
    fig.update_layout(title=label(title), xaxis_title=LAYER_AXIS, yaxis_title=y_title, height=340,
                      xaxis=dict(tickmode="linear", dtick=1))  # fmt: skip
    return fig


# -- page --------------------------------------------------------------------------------------------------


def flow_chart(starts: list[int], window: int, curves: dict[str, list[float | None]], critical: int | None, title: str):
    """Relative change of the answer's probability (%) per flow against the first decoder layer of the knockout
    window; the critical layer (stack index c = the output of decoder layer c-1) drawn at decoder layer c-1."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in curves.items():
        fig.add_trace(go.Scatter(x=starts, y=[None if v is None else 100 * v for v in values], mode="lines+markers",
                                 name=label(name)))  # fmt: skip
    if critical is not None:
        fig.add_vline(x=critical - 1, line_dash="dash", line_color="#9370DB",
                      annotation_text=f"critical layer {critical} (output of decoder layer {critical - 1})")  # fmt: skip
    fig.update_layout(title=label(title), height=360, yaxis_title="change of P(answer), %",
                      xaxis=dict(title=f"first decoder layer of the {window}-layer window", tickmode="linear", dtick=1))  # fmt: skip
    return fig
