"""Query-key page ("/qk"): the joint query-key embedding of AttentionViz for the selected head, every head
small, and the attention map of a clicked token.

Reads only the cached analysis ``analyses/qk_embedding`` (``attnviz analyze FILE --qk``, on a recording
made with ``attnviz extract --store-qk``); the clicked token's map is one query row of the recording.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.analysis.qk import QKEmbedding, load_qk_embedding
from attnviz.app import ids
from attnviz.app.components import graph, message, user_triggered
from attnviz.app.data import memo
from attnviz.app.selection import patch, resolve
from attnviz.app.views import no_image_note, query_overlay
from attnviz.figures import fig_message
from attnviz.figures.qk import QK_COLOUR_BY, clicked_panel, clicked_token, fig_qk_multiples, fig_qk_scatter
from attnviz.store.reader import Recording

dash.register_page(__name__, path="/qk", name="Query-key", order=5, title="attnviz - query-key")

P = "qk"
STATUS = ids.page_id(P, "status")
COLOUR = ids.page_id(P, "colour")
SCATTER = ids.page_id(P, "scatter")
TOKEN = ids.page_id(P, "token")
MULTIPLES = ids.page_id(P, "multiples")

_ABOUT = ("Each token of the sampled images gives two points: its query (circle) and its key (diamond) for the "
          "selected head, projected together after AttentionViz's normalisation (queries scaled by a, keys by 1/a "
          "and moved onto the queries' centre: every attention map stays the same), so a query lies near the keys "
          "it attends to. Click a point to see that token's attention map; click a small panel to select its "
          "head. Definitions: docs/qk.md.")


def _howto(file: str, rec: Recording) -> str:
    if rec.family == "s2t":
        return no_image_note(file, rec, "query-key view of image tokens")
    if not any(rec.has_qk(k) for k in rec.kinds()):
        return (f"{file} stores no query/key vectors. Record with `attnviz extract ... --store-qk 0.25` (a quarter "
                f"of each image's tokens; 1 = all), then run `attnviz analyze {file} --qk`.")
    return f"The joint embedding is not computed yet: run `attnviz analyze {file} --qk` (UMAP; --qk-method pca is fast)."


def embedding(rec: Recording) -> QKEmbedding | None:
    return memo(rec, ("qk_embedding",), lambda: load_qk_embedding(rec))


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Query-key embedding"),
        html.Div(id=STATUS),
        html.Div([
            html.Label("colour by", htmlFor=COLOUR, className="av-label"),
            dcc.RadioItems(id=COLOUR, value="role", inline=True,
                           options=[{"label": c if c != "role" else "query / key", "value": c} for c in QK_COLOUR_BY],
                           inputStyle={"marginRight": "4px", "marginLeft": "10px"}),
        ], className="av-row av-card"),
        html.Div([
            html.Div([html.H3("Selected head: queries and keys together"),
                      graph(SCATTER, filename="qk-joint-embedding"),
                      html.Div(_ABOUT, className="av-note")], className="av-card av-col"),
            html.Div([html.H3("The clicked token's attention"), graph(TOKEN, filename="qk-token-attention")],
                     className="av-card av-col-narrow"),
        ], className="av-cols"),
        html.Div([html.H3("Every head (click a panel to select its head)"),
                  graph(MULTIPLES, filename="qk-all-heads")], className="av-card"),
    ], className="av-page")


def _resolve(data: Any):
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, None, problem
    emb = embedding(rec)
    if emb is None:
        return sel, rec, None, _howto(sel.file, rec)
    sel, rec, problem = resolve(data, emb.kind)
    return sel, rec, emb, problem


@callback(Output(STATUS, "children"), Input(ids.SELECTION, "data"))
def status(data: Any):
    sel, rec, emb, problem = _resolve(data)
    if problem:
        return message(problem, "warning" if rec is not None else "error")
    s = emb.summary
    return message(f"{emb.method.upper()} of {emb.n_points} tokens from {s.get('n_samples_used', '?')} images per head "
                   f"({emb.kind} attention). Selected head L{sel.layer} H{sel.head}: its query lies nearest the key it "
                   f"attends to most for {emb.agreement[sel.layer, sel.head]:.0%} of the tokens (chance "
                   f"{emb.chance:.0%}; all heads: {s.get('mean_agreement', float('nan')):.0%}).", "info")


@callback(Output(SCATTER, "figure"), Input(ids.SELECTION, "data"), Input(COLOUR, "value"))
def scatter(data: Any, colour_by: str | None):
    """Selection (head, highlighted token) + colouring -> the joint embedding of the selected head."""
    sel, rec, emb, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    colour_by = colour_by if colour_by in QK_COLOUR_BY else "role"
    lay = rec.layout(emb.kind)
    highlight = (sel.sample, sel.query) if sel.query is not None else None
    return fig_qk_scatter(emb.query_xy[sel.layer, sel.head], emb.key_xy[sel.layer, sel.head], sample=emb.sample,
                          position=emb.position, row=emb.row, col=emb.col, in_mask=emb.in_mask, colour_by=colour_by,
                          highlight=highlight, prefix_names=lay.prefix_names,
                          title=f"L{sel.layer} H{sel.head}: {emb.n_points} queries ● and keys ◆",
                          subtitle=f"{emb.method}; nearest key = top key for {emb.agreement[sel.layer, sel.head]:.0%}")


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(SCATTER, "clickData"),
          Input(MULTIPLES, "clickData"), State(COLOUR, "value"), State(ids.SELECTION, "data"),
          prevent_initial_call=True)
def pick(token_click: Any, panel_click: Any, colour_by: str | None, data: Any):
    """Click on a point -> that token (sample, query); on a small panel -> its head."""
    trigger = user_triggered()
    if trigger not in (SCATTER, MULTIPLES):
        return no_update
    sel, rec, emb, problem = _resolve(data)
    if problem:
        return no_update
    if trigger == MULTIPLES:
        hit = clicked_panel(panel_click, emb.query_xy.shape[1])
        return no_update if hit is None else patch(layer=hit[0], head=hit[1])
    token = clicked_token(token_click, colour_by if colour_by in QK_COLOUR_BY else "role", emb.in_mask)
    return no_update if token is None else patch(sample=int(emb.sample[token]), query=int(emb.position[token]))


@callback(Output(TOKEN, "figure"), Input(ids.SELECTION, "data"))
def token(data: Any):
    """Selection -> the selected token's attention (the selected head) over its image."""
    sel, rec, emb, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    if sel.query is None:
        return fig_message("Click a point of the scatter to see that token's attention here.", height=380)
    if rec.layout(emb.kind).grid is None:
        return fig_message("This stack is not over an image patch grid.", height=380)
    return query_overlay(rec, sel.sample, sel.layer, sel.head, sel.query, emb.kind)


@callback(Output(MULTIPLES, "figure"), Input(ids.SELECTION, "data"))
def multiples(data: Any):
    """Selection -> every head's embedding, the selected one outlined."""
    sel, rec, emb, problem = _resolve(data)
    if problem:
        return fig_message(problem, height=220)
    return fig_qk_multiples(emb.query_xy, emb.key_xy, selected=(sel.layer, sel.head), agreement=emb.agreement)
