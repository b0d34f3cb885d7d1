"""Pure figure functions: data (numpy arrays, plain values) -> ``plotly.graph_objects.Figure``.

No Dash, no h5py: every ``fig_*`` takes arrays and returns a figure, so the dashboard, the static
report and the tests use the same functions. Import by module, e.g.
``from attnviz.figures.heads import fig_head_grid``. Shared helpers live here.
"""

from __future__ import annotations

import plotly.graph_objects as go

__all__ = ["fig_message", "base_layout", "HEAT_SCALE", "DIVERGING_SCALE", "FONT"]

FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)
HEAT_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"


def base_layout(fig: go.Figure, *, title: str | None = None, height: int | None = None,
                width: int | None = None) -> go.Figure:
    """Apply the house style (font, white template, tight margins) in place and return ``fig``."""
    fig.update_layout(template="plotly_white", font=FONT, margin=dict(l=50, r=20, t=50 if title else 20, b=40),
                      title=dict(text=title, x=0.01, xanchor="left") if title else None)
    if height:
        fig.update_layout(height=height)
    if width:
        fig.update_layout(width=width)
    return fig


def fig_message(text: str, *, height: int = 300) -> go.Figure:
    """An empty figure that says ``text`` in its middle (no data, no axes)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, height=height)
