"""Attention explorer page (placeholder until filled in)."""

from __future__ import annotations

import dash
from dash import html

from attnviz.app.components import HeadGrid

dash.register_page(__name__, path="/explorer", name="Explorer", order=1, title="attnviz - explorer")

P = "explorer"
grid = HeadGrid(P)


def layout(**_kwargs):
    return html.Div([html.H2("Attention explorer"), grid.layout()], className="av-page")
