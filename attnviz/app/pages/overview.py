"""Overview page ("/"): model card and the image overview (placeholder until filled in)."""

from __future__ import annotations

import dash
from dash import html

from attnviz.app.components import HeadGrid

dash.register_page(__name__, path="/", name="Overview", order=0, title="attnviz - overview")

P = "overview"
grid = HeadGrid(P)


def layout(**_kwargs):
    return html.Div([html.H2("Overview"), grid.layout()], className="av-page")
