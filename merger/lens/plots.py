"""Plotly figures of the lens: functions take lens results and return `go.Figure`; no I/O.

Axis convention for a model of L layers: capture point i < L is the stream entering layer i,
point L (labelled "out") leaves the last layer, before the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merger.lens.capture import Lens
from merger.lens.seams import SeamScores
from merger.lens.search import RecurrencePoint, Suggestions
from merger.plan import expected_points
from merger.recipe import Recipe

SEAM_COLOR = "#d62728"
SLICE_COLOR = "#2ca02c"
PREDICTED_COLOR = "#1f77b4"
MEASURED_COLOR = "#ff7f0e"


def _point_names(num_layers: int) -> list[str]:
    return [str(i) for i in range(num_layers)] + ["out"]


def _short(model: str) -> str:
    return model.removeprefix("bundled:").rstrip("/").split("/")[-1]


def angular_distance_figure(lens: Lens, *, recipe: Recipe | None = None, title: str | None = None) -> go.Figure:
    """Heatmap of the lens's angular distances, exact values and mean cos on hover. With a recipe,
    each of its slices of this model is outlined on the diagonal (the block from the stream entering
    its first layer to the stream leaving its last), and each seam is marked at the cell whose value
    is its predicted damage: row = the point the previous layer hands on, column = the point the
    layer expects."""
    names = _point_names(lens.num_layers)
    n = len(names)
    cos = lens.mean_cos.tolist()
    fig = go.Figure(
        go.Heatmap(
            z=lens.angular_distance.tolist(),
            x=list(range(n)),
            y=list(range(n)),
            customdata=[[[names[i], names[j], cos[i][j]] for j in range(n)] for i in range(n)],
            colorscale="Viridis",
            zmin=0.0,
            colorbar={"title": {"text": "arccos(cos)/π"}},
            hovertemplate=(
                "entering %{customdata[0]} vs entering %{customdata[1]}<br>"
                "angular distance %{z}<br>mean cos %{customdata[2]}<extra></extra>"
            ),
        )
    )
    if recipe is not None:
        _mark_recipe(fig, lens, recipe)
    ticks = {"tickmode": "array", "tickvals": list(range(n)), "ticktext": names}
    fig.update_xaxes(title_text="capture point j (stream entering layer j)", constrain="domain", **ticks)
    fig.update_yaxes(title_text="capture point i", autorange="reversed", scaleanchor="x", **ticks)
    fig.update_layout(
        title=title or f"Angular distance between residual streams: {_short(lens.model)} ({lens.tokens:,} tokens)",
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return fig


def _mark_recipe(fig: go.Figure, lens: Lens, recipe: Recipe) -> None:
    for s in recipe.slices:
        if s.source.model != lens.model:
            continue
        a, b = s.source.start, s.source.end
        fig.add_shape(
            type="rect",
            x0=a - 0.5,
            x1=b + 0.5,
            y0=a - 0.5,
            y1=b + 0.5,
            line={"color": SLICE_COLOR, "width": 2},
            fillcolor="rgba(0,0,0,0)",
        )
        fig.add_annotation(
            x=b + 0.5,
            y=a - 0.5,
            text=f"[{a},{b})" + (f" x{s.repeat}" if s.repeat > 1 else ""),
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            font={"color": SLICE_COLOR, "size": 11},
        )
    sources = recipe.layer_sources
    xs, ys, text = [], [], []
    for d, ((m, a), (pm, p)) in enumerate(zip(sources, expected_points(sources, recipe.primary_model), strict=True)):
        if (m, a) != (pm, p) and m == pm == lens.model:
            xs.append(a)
            ys.append(p)
            after = f"after layer {p - 1}" if p > 0 else "after the embeddings"
            text.append(f"seam at depth {d}: layer {a} {after}<br>predicted {float(lens.angular_distance[p, a]):.4f}")
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                marker={"symbol": "x-thin-open", "size": 14, "line": {"width": 3, "color": SEAM_COLOR}},
                name="seams",
                text=text,
                hovertemplate="%{text}<extra></extra>",
                showlegend=False,
            )
        )


def block_influence_figure(lens: Lens, *, title: str | None = None) -> go.Figure:
    """Block influence per layer (1 − mean cos between the stream entering and leaving it)."""
    bi = lens.block_influence.tolist()
    fig = go.Figure(
        go.Scatter(
            x=list(range(len(bi))),
            y=bi,
            mode="lines+markers",
            hovertemplate="layer %{x}<br>block influence %{y}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Block influence: {_short(lens.model)}",
        xaxis_title="layer",
        yaxis_title="1 − mean cos(in, out)",
        yaxis_rangemode="tozero",
    )
    return fig


def seam_scores_figure(scores: SeamScores, *, title: str | None = None) -> go.Figure:
    """Predicted damage (bars, at seams) and measured distance from each layer's parent input
    (line, every depth) along the merged stack; seams as dashed lines."""
    depths = list(range(len(scores.layer_sources)))
    where = [f"{_short(m)} layer {a}" for m, a in scores.layer_sources]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=depths,
            y=list(scores.predicted),
            name="predicted (parents' lens)",
            marker_color=PREDICTED_COLOR,
            customdata=where,
            hovertemplate="depth %{x}: %{customdata}<br>predicted %{y}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=depths,
            y=list(scores.measured),
            mode="lines+markers",
            name="measured (merge vs parent)",
            line={"color": MEASURED_COLOR},
            customdata=where,
            hovertemplate="depth %{x}: %{customdata}<br>measured %{y}<extra></extra>",
        )
    )
    for d in scores.seams:
        fig.add_vline(x=d - 0.5, line={"color": SEAM_COLOR, "dash": "dash", "width": 1})
    fig.update_layout(
        title=title or f"Seam damage along the merged stack ({len(scores.seams)} seam(s))",
        xaxis_title="merged depth",
        yaxis_title="angular distance (arccos/π)",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def suggestions_figure(suggestions: Suggestions, *, top: int = 15, title: str | None = None) -> go.Figure:
    """The best `top` blocks to duplicate by what ranked them (predicted damage, or measured output
    drift when ranked by drift); beside them the confirmed merges' perplexity, the parent's dashed."""
    shown = list(suggestions.ranked[:top])[::-1]  # best at the top of a horizontal bar chart
    confirmed = {(s.start, s.end): s.perplexity for s in suggestions.confirmed}
    labels = [s.label for s in shown]
    by_drift = bool(shown) and all(s.drift is not None for s in shown)
    key, what = ("drift", "measured output drift") if by_drift else ("predicted", "predicted damage d(x_end, x_start)")
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=(what, f"perplexity on held-out text (parent {suggestions.parent_perplexity:.2f}, dashed)"),
    )
    fig.add_trace(
        go.Bar(
            x=[getattr(s, key) for s in shown],
            y=labels,
            orientation="h",
            marker_color=PREDICTED_COLOR,
            name=key,
            customdata=[s.predicted for s in shown],
            hovertemplate=f"duplicate %{{y}}<br>{key} %{{x}}<br>predicted %{{customdata}}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    ppl = [confirmed.get((s.start, s.end)) for s in shown]
    fig.add_trace(
        go.Bar(
            x=[p if p is not None else 0 for p in ppl],
            y=labels,
            orientation="h",
            marker_color=MEASURED_COLOR,
            name="merge perplexity",
            text=[f"{p:.2f}" if p is not None else "" for p in ppl],
            hovertemplate="duplicate %{y}<br>perplexity %{x}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_vline(x=suggestions.parent_perplexity, line={"color": "black", "dash": "dash"}, row=1, col=2)
    fig.update_layout(
        title=title or f"Blocks to duplicate in {_short(suggestions.model)}",
        showlegend=False,
        yaxis_title="block [start, end)",
    )
    return fig


def recurrence_figure(points: Sequence[RecurrencePoint], *, title: str | None = None) -> go.Figure:
    """Perplexity (left axis) and total predicted seam damage (right axis) against how many times
    the block runs."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    ks = [p.repeats for p in points]
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[p.perplexity for p in points],
            mode="lines+markers",
            name="perplexity",
            line={"color": MEASURED_COLOR},
            customdata=[p.num_layers for p in points],
            hovertemplate="x%{x} (%{customdata} layers)<br>perplexity %{y}<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[p.predicted for p in points],
            mode="lines+markers",
            name="predicted seam damage",
            line={"color": PREDICTED_COLOR, "dash": "dot"},
            hovertemplate="x%{x}<br>predicted %{y}<extra></extra>",
        ),
        secondary_y=True,
    )
    fig.update_xaxes(title_text="times the block runs", dtick=1)
    fig.update_yaxes(title_text="perplexity", secondary_y=False)
    fig.update_yaxes(title_text="sum of predicted damage", secondary_y=True, rangemode="tozero", showgrid=False)
    fig.update_layout(title=title or "Recurrence sweep", legend={"orientation": "h", "y": -0.2})
    return fig
