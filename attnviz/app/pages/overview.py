"""Overview page ("/"): model card, image overview (thumbnail grid), selected sample, all heads."""

from __future__ import annotations

from typing import Any

import dash
import numpy as np
from dash import Input, Output, callback, dcc, html, no_update

from attnviz.app import ids
from attnviz.app.components import HeadGrid, graph, message
from attnviz.app.selection import patch, resolve
from attnviz.app.views import COLOUR_BY, model_card, no_image_note, thumbnail_page
from attnviz.figures import fig_message, image_data_uri

dash.register_page(__name__, path="/", name="Overview", order=0, title="attnviz - overview")

P = "overview"
CARD = ids.page_id(P, "card")
THUMBS = ids.page_id(P, "thumbs")
COLOUR = ids.page_id(P, "colour-by")
CLASSES = ids.page_id(P, "classes")
CORRECTNESS = ids.page_id(P, "correctness")
PAGE = ids.page_id(P, "page")
COUNT = ids.page_id(P, "count")
SAMPLE = ids.page_id(P, "sample")
PER_PAGE = 160
COLS = 16

grid = HeadGrid(P, title=None)


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.Div([
            html.Div([html.H3("Model"), html.Div(id=CARD)], className="av-card av-col-narrow"),
            html.Div([
                html.H3("Inputs"),
                html.Div([
                    html.Label("colour by", htmlFor=COLOUR, className="av-label"),
                    dcc.RadioItems(id=COLOUR, value="correctness", inline=True,
                                   options=[{"label": c, "value": c} for c in COLOUR_BY]),
                    html.Label("classes", htmlFor=CLASSES, className="av-label"),
                    dcc.Dropdown(id=CLASSES, multi=True, placeholder="all classes", className="av-dropdown"),
                    html.Label("show", htmlFor=CORRECTNESS, className="av-label"),
                    dcc.RadioItems(id=CORRECTNESS, value="all", inline=True,
                                   options=[{"label": c, "value": c} for c in ("all", "correct", "incorrect")]),
                ], className="av-row"),
                html.Div([
                    html.Label("page", htmlFor=PAGE, className="av-label"),
                    dcc.Input(id=PAGE, type="number", min=1, step=1, value=1, debounce=True, style={"width": "70px"}),
                    html.Span(id=COUNT, className="av-note"),
                ], className="av-row"),
                graph(THUMBS, filename="inputs"),
            ], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Selected sample"), html.Div(id=SAMPLE)], className="av-card av-col-narrow"),
            html.Div([html.H3("All heads"), grid.layout()], className="av-card av-col"),
        ], className="av-cols"),
    ], className="av-page")


@callback(Output(CARD, "children"), Output(CLASSES, "options"), Input(ids.SELECTION, "data"))
def card(data: Any):
    """Selection -> model card and the class filter's options."""
    _, rec, problem = resolve(data)
    if problem:
        return message(problem, "error"), []
    rows = model_card(rec)
    dl = html.Dl(sum(([html.Dt(k), html.Dd(v)] for k, v in rows), []), className="av-kv")
    return dl, [{"label": n, "value": i} for i, n in enumerate(rec.class_names())]


@callback(Output(THUMBS, "figure"), Output(COUNT, "children"), Output(PAGE, "max"),
          Input(ids.SELECTION, "data"), Input(COLOUR, "value"), Input(CLASSES, "value"), Input(CORRECTNESS, "value"),
          Input(PAGE, "value"))
def thumbs(data: Any, colour_by: str, classes: list[int] | None, correctness: str, page: int | None):
    """Selection and filters -> one page of the thumbnail grid."""
    sel, rec, problem = resolve(data)
    if problem:
        return fig_message(problem), "", 1
    if not rec.has_thumbnails:
        return fig_message(no_image_note(sel.file, rec, "thumbnail to show"), height=220), "", 1
    colour_by = colour_by if colour_by in COLOUR_BY else "correctness"
    p = thumbnail_page(rec, colour_by=colour_by, classes=classes or None, correctness=correctness or "all",
                       page=(page or 1) - 1, per_page=PER_PAGE, cols=COLS, selected=sel.sample)
    first = p.page * PER_PAGE + 1
    last = min(p.n_matching, (p.page + 1) * PER_PAGE)
    count = (f"{p.n_matching} of {rec.n_samples} samples match; showing {first}–{last} "
             f"(page {p.page + 1} of {p.n_pages}). Click a tile to select it." if p.n_matching else "no sample matches")
    if not rec.has_predictions:
        count += (" The model has no classification head, so there are no predictions: tiles are coloured by "
                  "label and the correct/incorrect filter does not apply.")
    return p.figure, count, p.n_pages


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(THUMBS, "clickData"), prevent_initial_call=True)
def pick_sample(click: Any):
    """Click on a tile -> selection sample."""
    try:
        return patch(sample=int(click["points"][0]["customdata"]))
    except (TypeError, KeyError, IndexError, ValueError):
        return no_update


@callback(Output(SAMPLE, "children"), Input(ids.SELECTION, "data"))
def sample_card(data: Any):
    """Selection -> the selected sample: image, label, prediction, top classes."""
    sel, rec, problem = resolve(data)
    if problem:
        return message(problem, "error")
    s = sel.sample
    if not rec.has_thumbnails:
        meta = rec.meta(s)
        rows = [html.Dt("sample"), html.Dd(f"#{s}  {rec.sample_ids()[s]}")]
        if "text" in meta:
            rows += [html.Dt("transcript"), html.Dd(meta["text"] or "(nothing)")]
        if meta.get("reference") is not None:
            rows += [html.Dt("reference"), html.Dd(meta["reference"])]
        return html.Div([message(no_image_note(sel.file, rec, "image to show"), "info"),
                         html.Dl(rows, className="av-kv"), dcc.Link("open the Speech page →", href="/speech")])
    names = rec.class_names()
    lab, pred = int(rec.labels()[s]), int(rec.predictions()[s])
    name = lambda c: names[c] if 0 <= c < len(names) else "—"  # noqa: E731
    rows = [html.Dt("sample"), html.Dd(f"#{s}  {rec.sample_ids()[s]}"), html.Dt("label"), html.Dd(name(lab))]
    if rec.has_predictions:
        logits = np.asarray(rec.logits(s), np.float64)
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        top = np.argsort(-prob)[:5]
        verdict = "" if lab < 0 else (" ✓" if lab == pred else " ✗")
        rows += [html.Dt("prediction"), html.Dd(name(pred) + verdict)]
        if np.isfinite(logits).all():  # a generative model predicts by its generated text: no class scores
            rows += sum(([html.Dt(f"p({name(int(c))})"), html.Dd(f"{prob[c]:.3f}")] for c in top), [])
    else:
        rows += [html.Dt("prediction"), html.Dd("none: the model has no classification head")]
    return html.Div([
        html.Img(src=image_data_uri(rec.thumbnail(s)), style={"width": "160px", "imageRendering": "pixelated",
                                                              "border": "1px solid #ddd"}),
        html.Dl(rows, className="av-kv"),
        dcc.Link("open in the attention explorer →", href="/explorer"),
    ])
