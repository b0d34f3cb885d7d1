"""Speech page ("/speech"): a speech-to-text recording's clips, their transcripts as clickable tokens, and how the
cross-attention of each head compares with saliency (Papi et al. 2025) — per token, per head over the recording,
and by deletion curves.

The selection's ``query`` is the token row (row ``t`` predicts token ``t`` of the transcript); ``layer``/``head``
are a decoder head (the cross-attention stack). Everything is read through :mod:`attnviz.app.speech_views`, which
keeps the last clips in memory, so a token or head switch reads nothing from the file.
"""

from __future__ import annotations

from typing import Any

import dash
import numpy as np
from dash import Input, Output, Patch, State, callback, dcc, html, no_update

from attnviz.analysis.crossattn import POOLINGS
from attnviz.app import ids
from attnviz.app.components import graph, message, user_triggered
from attnviz.app.selection import patch, resolve
from attnviz.app.speech_views import (
    CORRELATIONS,
    aggregate_table,
    analysis,
    clip_data,
    clip_figure,
    correlation_figure,
    default_token,
    deletion_figure,
    saliency_methods,
    summary_line,
    timings,
    token_figure,
    token_span,
    token_table,
)
from attnviz.figures import fig_message
from attnviz.figures.speech import highlight_shape

dash.register_page(__name__, path="/speech", name="Speech", order=6, title="attnviz - speech")

P = "speech"
STATUS = ids.page_id(P, "status")
CLIP = ids.page_id(P, "clip")
METHOD = ids.page_id(P, "method")
POOLING = ids.page_id(P, "pooling")
CORR = ids.page_id(P, "corr")
WAVE = ids.page_id(P, "wave")
#: which clip the waveform figure shows, and the index of its highlight shape ({"file", "sample", "shape"})
WAVE_DRAWN = ids.page_id(P, "wave-drawn")
TOKENS = ids.page_id(P, "tokens")
TOKEN_FIG = ids.page_id(P, "token")
GRID = ids.page_id(P, "grid")
AGGREGATES = ids.page_id(P, "aggregates")
DELETION = ids.page_id(P, "deletion")
SCOPE = ids.page_id(P, "deletion-scope")
TABLE = ids.page_id(P, "table")
ALIGNMENT = ids.page_id(P, "alignment")

_ABOUT = ("Each row of cross-attention is the decoder step that writes one token; its saliency says which input "
          "frames that token's probability depends on (summed over mel bins, pooled to the encoder's 20 ms frames). "
          "Curves are scaled to their maxima: the correlation compares shapes. Definitions: docs/speech.md.")


def _radio(id_: str, values: tuple[str, ...], value: str) -> dcc.RadioItems:
    return dcc.RadioItems(id=id_, value=value, inline=True, options=[{"label": v, "value": v} for v in values],
                          inputStyle={"marginRight": "4px", "marginLeft": "10px"})


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Speech: cross-attention vs saliency"),
        html.Div(id=STATUS),
        html.Div([
            html.Label("clip", htmlFor=CLIP, className="av-label"),
            dcc.Dropdown(id=CLIP, clearable=False, className="av-dropdown", style={"minWidth": "360px"}),
            html.Label("saliency", htmlFor=METHOD, className="av-label"),
            dcc.Dropdown(id=METHOD, clearable=False, className="av-dropdown"),
            html.Label("pooling", htmlFor=POOLING, className="av-label"), _radio(POOLING, POOLINGS, "mean"),
            html.Label("correlation", htmlFor=CORR, className="av-label"), _radio(CORR, CORRELATIONS, "pearson"),
        ], className="av-row av-card"),
        dcc.Store(id=WAVE_DRAWN, storage_type="memory"),
        html.Div([
            graph(WAVE, filename="speech-clip"),
            html.Div([html.Span("transcript (click a token):", className="av-label"),
                      dcc.RadioItems(id=TOKENS, inline=True, className="av-tokens",
                                     inputStyle={"marginRight": "3px", "marginLeft": "10px"})],
                     className="av-row"),
        ], className="av-card"),
        html.Div([
            html.Div([html.H3("Selected token: cross-attention against saliency, on one time axis"),
                      graph(TOKEN_FIG, filename="speech-token"), html.Div(_ABOUT, className="av-note")],
                     className="av-card av-col"),
            html.Div([html.H3("Every head: CA vs saliency over the recording (click a head)"),
                      graph(GRID, filename="speech-ca-saliency-heads"), html.Div(id=AGGREGATES)],
                     className="av-card av-col-narrow", style={"flexBasis": "420px"}),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Deletion curves"),
                      html.Div([html.Label("curves of", htmlFor=SCOPE, className="av-label"),
                                _radio(SCOPE, ("recording", "token"), "recording")], className="av-row"),
                      graph(DELETION, filename="speech-deletion")], className="av-card av-col"),
            html.Div([html.H3("Word timings and alignment errors"), html.Div(id=ALIGNMENT)],
                     className="av-card av-col-narrow", style={"flexBasis": "420px"}),
        ], className="av-cols"),
        html.Div([html.H3("Tokens of the clip"), html.Div(id=TABLE, style={"overflowX": "auto"})],
                 className="av-card"),
    ], className="av-page")


def _resolve(data: Any):
    """(selection clamped to the cross-attention stack, recording, problem)."""
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, problem
    if rec.family != "s2t":
        return sel, None, (f"{sel.file} is a {rec.family} recording; the Speech page shows speech-to-text recordings "
                           "(attnviz extract on a Whisper model).")
    return resolve(data, "cross")


def _token(sel: Any, rec: Any) -> int:
    """The selected token row (the selection's query), else the clip's first text token."""
    if sel.query is not None:
        return int(sel.query)
    return default_token(clip_data(rec, sel.sample).meta)


def _method(rec: Any, method: str | None) -> str | None:
    ms = saliency_methods(rec)
    return method if method in ms else (ms[0] if ms else None)


# -- controls and the selection -----------------------------------------------------------------------


@callback(Output(CLIP, "options"), Output(CLIP, "value"), Output(METHOD, "options"), Output(METHOD, "value"),
          Output(TOKENS, "options"), Output(TOKENS, "value"), Input(ids.SELECTION, "data"), State(METHOD, "value"))
def controls(data: Any, method: str | None):
    """Selection -> the clip list, the saliency methods, the transcript's tokens (and which are selected)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return [], None, [], None, [], None
    names = rec.sample_ids()
    clips = [{"label": f"#{i} {names[i]}", "value": i} for i in range(rec.n_samples)]
    ms = saliency_methods(rec)
    meta = clip_data(rec, sel.sample).meta
    special = meta.get("special", [])
    prompt = int(meta.get("prompt_rows", 0))
    tokens = [{"label": html.Span(t.strip() or repr(t),
                                  className="av-token-special" if (r < prompt or special[r]) else "av-token",
                                  style={"color": "#6b7280"} if (r < prompt or special[r]) else None),
               "value": r} for r, t in enumerate(meta.get("tokens", []))]
    return clips, sel.sample, [{"label": m, "value": m} for m in ms], _method(rec, method), tokens, _token(sel, rec)


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(CLIP, "value"), Input(TOKENS, "value"),
          Input(GRID, "clickData"), State(ids.SELECTION, "data"), prevent_initial_call=True)
def select(clip: Any, token: Any, grid_click: Any, data: Any):
    """Clip picker -> sample (token reset); a token -> the query; a click on the heads grid -> layer/head.
    No update when the control just followed the selection."""
    trigger = user_triggered()
    if trigger is None:
        return no_update
    return selection_change(trigger, clip, token, grid_click, data)


def selection_change(trigger: str, clip: Any, token: Any, grid_click: Any, data: Any):
    """The patch of the selection for a change of one control (plain function: testable without Dash)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return no_update
    if trigger == CLIP:
        if clip is None or int(clip) == sel.sample:
            return no_update
        return patch(sample=int(clip), query=None)
    if trigger == TOKENS:
        if token is None or (sel.query is not None and int(token) == sel.query):
            return no_update
        return patch(query=int(token))
    if trigger == GRID:
        try:
            pt = grid_click["points"][0]
            layer, head = int(pt["y"]), int(pt["x"])
        except (TypeError, KeyError, IndexError, ValueError):
            return no_update
        return no_update if (layer, head) == (sel.layer, sel.head) else patch(layer=layer, head=head)
    return no_update


# -- views ---------------------------------------------------------------------------------------------


@callback(Output(STATUS, "children"), Input(ids.SELECTION, "data"))
def status(data: Any):
    sel, rec, problem = _resolve(data)
    if problem:
        return message(problem, "error")
    return message(summary_line(rec) + f" Selected: clip {sel.sample}, token {_token(sel, rec)}, decoder layer "
                   f"{sel.layer} head {sel.head}.", "info" if analysis(rec) is not None else "warning")


@callback(Output(WAVE, "figure"), Output(WAVE_DRAWN, "data"), Input(ids.SELECTION, "data"), State(WAVE_DRAWN, "data"))
def wave(data: Any, drawn: Any):
    """Selection -> the clip's waveform and spectrogram with the selected token's word outlined. When the figure
    already shows this clip only the outline moves (a patch of one shape): a token switch redraws nothing."""
    sel, rec, problem = _resolve(data)
    if problem:
        return fig_message(problem), None
    token = _token(sel, rec)
    if isinstance(drawn, dict) and drawn.get("file") == sel.file and drawn.get("sample") == sel.sample \
            and isinstance(drawn.get("shape"), int):
        moved = Patch()
        moved["layout"]["shapes"][drawn["shape"]] = highlight_shape(token_span(rec, sel.sample, token))
        return moved, no_update
    fig = clip_figure(rec, sel.sample, token)
    shapes = fig.layout.shapes or ()
    shape = len(shapes) - 1 if shapes else None
    return fig, {"file": sel.file, "sample": sel.sample, "shape": shape}


@callback(Output(TOKEN_FIG, "figure"), Input(ids.SELECTION, "data"), Input(METHOD, "value"), Input(POOLING, "value"))
def token(data: Any, method: str | None, pooling: str | None):
    """Selection -> the token's cross-attention (head, layer mean, all-layer mean) against its saliency."""
    sel, rec, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return token_figure(rec, sel.sample, sel.layer, sel.head, _token(sel, rec), _method(rec, method),
                        pooling if pooling in POOLINGS else "mean")


@callback(Output(GRID, "figure"), Output(AGGREGATES, "children"), Input(ids.SELECTION, "data"),
          Input(METHOD, "value"), Input(POOLING, "value"), Input(CORR, "value"))
def grid(data: Any, method: str | None, pooling: str | None, corr: str | None):
    """Selection -> the L x H correlation heatmap (selected head outlined) and the aggregate/control table."""
    sel, rec, problem = _resolve(data)
    if problem:
        return fig_message(problem, height=240), ""
    m, p = _method(rec, method), pooling if pooling in POOLINGS else "mean"
    fig = correlation_figure(rec, sel.layer, sel.head, m, p, corr if corr in CORRELATIONS else "pearson")
    rows = aggregate_table(rec, m, p)
    if not rows:
        return fig, ""
    head = html.Tr([html.Th("explanation"), html.Th("row mean r / ρ"), html.Th("flattened r / ρ")])
    body = [html.Tr([html.Td(a), html.Td(b), html.Td(c)]) for a, b, c in rows]
    return fig, html.Table([html.Thead(head), html.Tbody(body)], className="av-table")


@callback(Output(DELETION, "figure"), Input(ids.SELECTION, "data"), Input(SCOPE, "value"))
def deletion(data: Any, scope: str | None):
    sel, rec, problem = _resolve(data)
    if problem:
        return fig_message(problem, height=300)
    if scope == "token":
        return deletion_figure(rec, sel.sample, _token(sel, rec))
    return deletion_figure(rec)


@callback(Output(ALIGNMENT, "children"), Input(ids.SELECTION, "data"))
def alignment(data: Any):
    """Selection -> the word timings (heads used, errors) and each explanation's peak alignment error."""
    sel, rec, problem = _resolve(data)
    if problem:
        return message(problem, "error")
    parts = []
    tm = timings(rec)
    if tm is None:
        parts.append(message(f"No word timings yet: run `attnviz analyze {sel.file}`.", "warning"))
    else:
        err = tm.errors_ms()
        heads = ", ".join(f"L{a}H{b}" for a, b in tm.heads)
        text = f"Words timed by DTW over {heads} ({tm.source})."
        if err.get("n_words"):
            text += (f" Against the reference timings of {err['n_words']} matched words: start error "
                     f"{err['start_ms']:.0f} ms, end error {err['end_ms']:.0f} ms, centre inside the word "
                     f"{err['centre_in_span']:.0%}.")
        parts.append(html.Div(text, className="av-note"))
    a = analysis(rec)
    if a is not None and a.alignment:
        order = sorted(a.alignment, key=lambda k: (k.startswith("ca_L"), a.alignment[k][0]))
        shown = [k for k in order if not k.startswith("ca_L")] + [k for k in order if k.startswith("ca_L")][:3]
        rows = [html.Tr([html.Td(k), html.Td(f"{a.alignment[k][0]:.0f}"), html.Td(f"{a.alignment[k][1]:.0%}")])
                for k in shown]
        parts.append(html.Table([html.Thead(html.Tr([html.Th("peak of"), html.Th("error (ms)"),
                                                     html.Th("inside the word")])), html.Tbody(rows)],
                                className="av-table"))
        parts.append(html.Div("Peak alignment: the explanation summed over a word's tokens, its peak frame's centre "
                              "against the reference span (0 ms inside it). Best three single heads listed.",
                              className="av-note"))
    return parts


TABLE_COLUMNS = ("row", "token", "role", "p", "word", "reference (s)", "DTW (s)", "CA peak, selected head (s)",
                 "saliency peak (s)", "r head", "r all-layer", "attention on padding")


@callback(Output(TABLE, "children"), Input(ids.SELECTION, "data"), Input(METHOD, "value"), Input(POOLING, "value"))
def table(data: Any, method: str | None, pooling: str | None):
    """Selection -> one row per token of the clip (the selected token highlighted)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return message(problem, "error")
    m, p = _method(rec, method), pooling if pooling in POOLINGS else "mean"
    rows = token_table(rec, sel.sample, sel.layer, sel.head, m, p)
    current = _token(sel, rec)

    def span(v: Any) -> str:
        return "—" if v is None else f"{v[0]:.2f}–{v[1]:.2f}"

    def num(v: Any, fmt: str) -> str:
        return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    def cell(v: Any) -> str:  # markdown table cells: no pipes, tokens shown literally
        return str(v).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;") or " "

    # one Markdown table: a single component (240 html cells cost 15 ms per token switch); the selected row bold
    names = [c if c != TABLE_COLUMNS[7] else f"CA peak L{sel.layer}H{sel.head} (s)" for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        values = (r["row"], r["token"], r["role"], num(r["p"], ".3f"), r["word"], span(r["reference"]), span(r["dtw"]),
                  num(r["ca_peak_s"], ".2f"), num(r.get("saliency_peak_s"), ".2f"), num(r.get("r_head"), ".2f"),
                  num(r.get("r_all"), ".2f"), num(r["padding_share"], ".1%"))
        mark = "**" if r["row"] == current else ""
        lines.append("| " + " | ".join(f"{mark}{cell(v)}{mark}" for v in values) + " |")
    return dcc.Markdown("\n".join(lines), className="av-token-table")
