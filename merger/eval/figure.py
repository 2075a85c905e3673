"""The Eval tab's chart: each task's headline score per model, bars with ±1 standard error."""

from __future__ import annotations

import html

import plotly.graph_objects as go

from merger.eval.runner import EvalReport

MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def eval_figure(report: EvalReport) -> go.Figure:
    """Grouped bars: one group per task (its headline metric), one bar per model, error bars of
    one standard error. Names are text (Plotly reads a subset of HTML in labels: escaped)."""
    tasks = [html.escape(f"{t.name} ({t.headline[0]})") for t in report.tasks]
    fig = go.Figure()
    for i, candidate in enumerate(report.candidates):
        scores = [report.headline(candidate.label, t) for t in report.tasks]
        values = [s[0] if s else None for s in scores]
        errors = [s[1] if s and s[1] is not None else 0.0 for s in scores]
        name = html.escape(candidate.label.removeprefix("bundled:"))
        fig.add_trace(
            go.Bar(
                x=tasks,
                y=values,
                name=name,
                marker_color=MODEL_COLORS[i % len(MODEL_COLORS)],
                error_y={"type": "data", "array": errors, "visible": True},
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.4f}} ± %{{error_y.array:.4f}}<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        title="Scores on the same items (error bars: ±1 standard error)",
        yaxis_title="score",
        legend_title_text="model",
        height=420,
        margin={"l": 60, "r": 20, "t": 60, "b": 80},
    )
    return fig
