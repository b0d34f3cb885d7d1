"""Attention explorer ("/explorer"): click a patch to make it the query; its attention for the
selected head over the image; the same query for all heads of the layer; CLS attention; rollout
and attributions beside the object mask; the raw token-by-token matrix on demand."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.app import ids
from attnviz.app.components import HeadGrid, graph, user_triggered
from attnviz.app.selection import patch, resolve
from attnviz.app.views import (
    attribution_panels,
    cls_overlay,
    explorer_kind,
    head_multiples,
    no_image_note,
    query_of_cell,
    query_overlay,
    token_matrix,
)
from attnviz.figures import fig_message
from attnviz.figures.explorer import cell_of_point

dash.register_page(__name__, path="/explorer", name="Explorer", order=1, title="attnviz - explorer")

P = "explorer"
LAYER = ids.page_id(P, "layer")
HEAD = ids.page_id(P, "head")
CLS_BUTTON = ids.page_id(P, "query-cls")
OVERLAY = ids.page_id(P, "overlay")
MULTIPLES = ids.page_id(P, "multiples")
CLS = ids.page_id(P, "cls")
ATTRIB = ids.page_id(P, "attributions")
RAW_TOGGLE = ids.page_id(P, "raw-toggle")
RAW = ids.page_id(P, "raw")
RAW_BOX = ids.page_id(P, "raw-box")

grid = HeadGrid(P)


def _kind(rec) -> str | None:
    return explorer_kind(rec)


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.Div([
            html.Label("layer", htmlFor=LAYER, className="av-label"),
            html.Div(dcc.Slider(id=LAYER, min=0, max=1, step=1, value=None), className="av-slider"),
            html.Label("head", htmlFor=HEAD, className="av-label"),
            html.Div(dcc.Slider(id=HEAD, min=0, max=1, step=1, value=None), className="av-slider"),
            html.Button("query: CLS", id=CLS_BUTTON, n_clicks=0, className="av-button"),
            dcc.Checklist(id=RAW_TOGGLE, options=[{"label": " raw token × token matrix", "value": "raw"}], value=[]),
        ], className="av-row av-card"),
        html.Div([
            html.Div([graph(OVERLAY, filename="query-attention"),
                      html.Div("Click a patch to make it the query.", className="av-note")], className="av-card av-col"),
            html.Div(graph(MULTIPLES, filename="layer-heads"), className="av-card av-col"),
            html.Div([html.H3("All heads (click to select)"), grid.layout()], className="av-card av-col-narrow"),
        ], className="av-cols"),
        html.Div([
            html.Div(graph(CLS, filename="cls-attention"), className="av-card av-col-narrow"),
            html.Div(graph(ATTRIB, filename="attributions"), className="av-card av-col"),
        ], className="av-cols"),
        html.Div(graph(RAW, filename="raw-attention"), id=RAW_BOX, className="av-card", style={"display": "none"}),
    ], className="av-page")


def _resolve(data: Any):
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, None, problem
    kind = _kind(rec)
    if kind is None:
        return sel, None, None, no_image_note(sel.file, rec, "image patch to explore")
    sel, rec, problem = resolve(data, kind)
    return sel, rec, kind, problem


@callback(Output(LAYER, "value"), Output(LAYER, "max"), Output(LAYER, "marks"),
          Output(HEAD, "value"), Output(HEAD, "max"), Output(HEAD, "marks"),
          Input(ids.SELECTION, "data"))
def sliders_from_selection(data: Any):
    """Selection -> sliders (see :func:`slider_state`)."""
    return slider_state(data)


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(LAYER, "value"), Input(HEAD, "value"),
          State(ids.SELECTION, "data"), prevent_initial_call=True)
def selection_from_sliders(layer: int | None, head: int | None, data: Any):
    """Slider move -> selection (see :func:`slider_moved`). Only page-local inputs, so the callback
    never fires on other pages; it returns no update when the sliders just followed the selection."""
    if user_triggered() is None:  # page insertion: the sliders show their initial values
        return no_update
    return slider_moved(data, layer, head)


def slider_state(data: Any) -> tuple:
    """Selection -> (layer value, max, marks, head value, max, marks)."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return (no_update,) * 6
    n_layers, n_heads = rec.stack_shape(kind)

    def marks(n: int) -> dict[int, str]:
        step = 1 if n <= 24 else max(1, n // 12)
        return {i: str(i) for i in range(0, n, step)}

    return sel.layer, n_layers - 1, marks(n_layers), sel.head, n_heads - 1, marks(n_heads)


def slider_moved(data: Any, layer: int | None, head: int | None):
    """Slider values -> selection patch (no update when they already agree)."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return no_update
    new = (sel.layer if layer is None else int(layer), sel.head if head is None else int(head))
    return no_update if new == (sel.layer, sel.head) else patch(layer=new[0], head=new[1])


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(OVERLAY, "clickData"), Input(CLS_BUTTON, "n_clicks"),
          Input(MULTIPLES, "clickData"), State(ids.SELECTION, "data"), prevent_initial_call=True)
def pick(click: Any, cls_clicks: int | None, multiples_click: Any, data: Any):
    """Click on a patch -> query; "query: CLS" -> query 0; click on a small multiple -> head."""
    trigger = user_triggered()
    if trigger is None:
        return no_update
    if trigger == CLS_BUTTON:
        return cls_query(data) if cls_clicks else no_update
    if trigger == MULTIPLES:
        return head_from_click(multiples_click, data)
    return query_from_click(click, data)


def query_from_click(click: Any, data: Any):
    """A click on the image (pixel x, y) -> the patch under it becomes the query."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return no_update
    lay = rec.layout(kind)
    try:
        pt = click["points"][0]
        cell = cell_of_point(float(pt["x"]), float(pt["y"]), lay.grid, lay.patch_size)
    except (TypeError, KeyError, IndexError, ValueError):
        return no_update
    return no_update if cell is None else patch(query=query_of_cell(lay, cell))


def head_from_click(click: Any, data: Any):
    """A click on a small multiple -> its head."""
    try:
        h = int(click["points"][0]["customdata"])
    except (TypeError, KeyError, IndexError, ValueError):
        return no_update
    return patch(head=h) if h >= 0 else no_update


def cls_query(data: Any):
    """The first prefix token (CLS) becomes the query."""
    sel, rec, kind, problem = _resolve(data)
    if problem or not rec.layout(kind).n_prefix:
        return no_update
    return patch(query=0)


@callback(Output(OVERLAY, "figure"), Input(ids.SELECTION, "data"))
def overlay(data: Any):
    """Selection -> the query's attention for the selected head, over the image."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return query_overlay(rec, sel.sample, sel.layer, sel.head, sel.query, kind)


@callback(Output(MULTIPLES, "figure"), Input(ids.SELECTION, "data"))
def multiples(data: Any):
    """Selection -> the query for every head of the layer (one figure)."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return head_multiples(rec, sel.sample, sel.layer, sel.head, sel.query, kind)


@callback(Output(CLS, "figure"), Input(ids.SELECTION, "data"))
def cls_map(data: Any):
    """Selection -> CLS attention of the selected head."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return cls_overlay(rec, sel.sample, sel.layer, sel.head, kind)


@callback(Output(ATTRIB, "figure"), Input(ids.SELECTION, "data"))
def attributions(data: Any):
    """Selection (sample) -> rollout and stored attributions beside the object mask."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return attribution_panels(rec, sel.sample, kind)


@callback(Output(RAW, "figure"), Output(RAW_BOX, "style"), Input(ids.SELECTION, "data"), Input(RAW_TOGGLE, "value"))
def raw(data: Any, toggle: list[str] | None):
    """Selection + toggle -> the raw matrix of the selected head (read only when shown)."""
    if not toggle or "raw" not in toggle:
        return no_update, {"display": "none"}
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem), {"display": "block"}
    return token_matrix(rec, sel.sample, sel.layer, sel.head, kind), {"display": "block"}
