"""Vision-language page ("/vlm"): for one question of an lvlm recording, the selected head's attention
over the image from a chosen answer token (visual sink tokens marked), the answer as clickable tokens,
layers x heads heatmaps of image attention ratio and VHD (click selects a head everywhere), the
image-centric heads, and, with an intervention, the original and the reinforced answer side by side.

Reads one question's generation-step rows and per-sample arrays (:func:`attnviz.analysis.lvlm.sample_view`,
cached per sample) and the stored summary ``analyses/lvlm`` (``attnviz extract`` writes it; ``attnviz
analyze`` redoes it). Definitions: docs/vlm.md.
"""

from __future__ import annotations

from typing import Any

import dash
import numpy as np
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.analysis.lvlm import image_grid, load_summary, sample_view
from attnviz.app import ids
from attnviz.app.components import graph, message, user_triggered
from attnviz.app.data import lru, memo
from attnviz.app.selection import Selection, patch, resolve
from attnviz.figures import fig_message
from attnviz.figures.heads import fig_head_grid
from attnviz.figures.vlm import (
    fig_image_attention,
    fig_sink_frequency,
    fig_token_ratios,
    image_heat,
    plain_text,
    sink_cells,
)
from attnviz.store.reader import Recording

dash.register_page(__name__, path="/vlm", name="Vision-language", order=6, title="attnviz - vision-language")

P = "vlm"
STATUS = ids.page_id(P, "status")
QUESTION = ids.page_id(P, "question")
TOKENS = ids.page_id(P, "tokens")
ANSWERS = ids.page_id(P, "answers")
IMAGE = ids.page_id(P, "image")
MODE = ids.page_id(P, "mode")
RATIO = ids.page_id(P, "ratio")
VHD = ids.page_id(P, "vhd")
BARS = ids.page_id(P, "bars")
CENTRIC = ids.page_id(P, "centric")
SINKS = ids.page_id(P, "sinks")

MODES = ("token", "mean")
_CHIP = {"display": "inline-block", "padding": "3px 10px", "margin": "2px 4px 2px 0", "border": "1px solid #c7cde0",
         "borderRadius": "12px", "cursor": "pointer", "fontFamily": "monospace", "background": "#fff"}
_ABOUT = ("Image attention ratio: the share of a head's attention from an answer token's generation step that goes "
          "to the image tokens. VHD (He et al. 2025, Eq. 4): how far the head's output moves when the image tokens "
          "are removed. Sinks (Kang et al. 2025): image tokens with a massive activation, phi > tau; image-centric "
          "heads look at the image (ratio >= 0.2) and mostly not at its sinks. Formulas: docs/vlm.md.")


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Vision-language"),
        html.Div(id=STATUS),
        html.Div([
            html.Label("question", htmlFor=QUESTION, className="av-label"),
            dcc.Dropdown(id=QUESTION, clearable=False, className="av-dropdown", style={"minWidth": "520px"}),
        ], className="av-row av-card"),
        html.Div([
            html.H3("The answer (click a token)"),
            dcc.RadioItems(id=TOKENS, inline=True, labelStyle=_CHIP, inputStyle={"marginRight": "6px"}),
            html.Div(id=ANSWERS),
        ], className="av-card"),
        html.Div([
            html.Div([graph(IMAGE, filename="vlm-image-attention"),
                      html.Div("Dotted squares: visual sink tokens of the selected layer.", className="av-note")],
                     className="av-card av-col-narrow"),
            html.Div([
                html.Div([html.Label("heatmaps of", htmlFor=MODE, className="av-label"),
                          dcc.RadioItems(id=MODE, value="token", inline=True,
                                         options=[{"label": " the selected answer token", "value": "token"},
                                                  {"label": " the mean over every question", "value": "mean"}],
                                         inputStyle={"marginLeft": "10px"})], className="av-row"),
                html.Div([html.Div(graph(RATIO, filename="vlm-image-attention-ratio"), className="av-col"),
                          html.Div(graph(VHD, filename="vlm-vhd"), className="av-col")], className="av-cols"),
                html.Div(_ABOUT, className="av-note"),
            ], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("The selected head across the answer"), graph(BARS, filename="vlm-answer-tokens")],
                     className="av-card av-col"),
            html.Div([html.H3("Image-centric heads"), html.Div(id=CENTRIC)], className="av-card av-col-narrow"),
        ], className="av-cols"),
        html.Div([html.H3("Where the visual sinks are"), graph(SINKS, filename="vlm-sinks")], className="av-card"),
    ], className="av-page")


# -- shared look-ups --------------------------------------------------------------------------------


def _resolve(data: Any) -> tuple[Selection, Recording | None, str | None]:
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, problem
    if rec.family != "lvlm":
        return sel, None, (f"{sel.file} is a {rec.family} recording; this page shows vision-language recordings "
                           "(attnviz extract on a LLaVA model with a manifest of questions).")
    return sel, rec, None


def view(rec: Recording, sample: int):
    """The measured question (cached per sample)."""
    return lru(rec, "vlm_view", sample, lambda: sample_view(rec, sample), maxsize=32)


def summary(rec: Recording) -> dict[str, Any] | None:
    return memo(rec, ("vlm_summary",), lambda: load_summary(rec))


def _question(data: Any, token: Any) -> tuple[Selection, Recording | None, Any, list[str], int, str | None]:
    """(selection, recording, the measured question, its answer tokens, the chosen token, problem)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return sel, None, None, [], 0, problem
    v = view(rec, sel.sample)
    return sel, rec, v, _tokens(rec.meta(sel.sample))[: v.n_steps], _token(token, v.n_steps), None


def _token(value: Any, n: int) -> int:
    try:
        j = int(value)
    except (TypeError, ValueError):
        return 0
    return j if 0 <= j < n else 0


def _tokens(meta: dict[str, Any]) -> list[str]:
    return [str(t) for t in meta.get("generated_tokens", [])]


# -- callbacks (plain functions; tests call them directly) -------------------------------------------


@callback(Output(STATUS, "children"), Input(ids.SELECTION, "data"))
def status(data: Any):
    sel, rec, problem = _resolve(data)
    if problem:
        return message(problem, "warning" if rec is None and "recording;" in problem else "error")
    s = summary(rec)
    facts = rec.extraction_params.get("family") or {}
    parts = [f"{rec.n_samples} questions"]
    if s is not None and s["summary"].get("accuracy") is not None:
        parts.append(f"answer accuracy {s['summary']['accuracy']:.1%}")
        if s["summary"].get("reinforced_accuracy") is not None:
            parts.append(f"reinforced (alpha {facts.get('reinforce')}) {s['summary']['reinforced_accuracy']:.1%}")
    if facts.get("sink_dims") is not None:
        dims = facts["sink_dims"]
        parts.append(f"massive dimensions {dims if len(dims) <= 6 else str(dims[:6])[:-1] + ', ...]'} "
                     f"(tau {facts.get('sink_tau')})" if dims else f"no massive dimension at tau {facts.get('sink_tau')}")
    if s is None:
        parts.append(f"no stored summary: run `attnviz analyze {sel.file}`")
    return message("; ".join(parts) + f". Selected head: L{sel.layer} H{sel.head} of the language model.", "info")


@callback(Output(QUESTION, "options"), Output(QUESTION, "value"), Input(ids.SELECTION, "data"))
def question_options(data: Any):
    """Selection -> one option per question ("#i: prompt -> answer"), the selected one chosen."""
    sel, rec, problem = _resolve(data)
    if problem:
        return [], None

    def make() -> list[dict[str, Any]]:
        out = []
        for s in range(rec.n_samples):
            m = rec.meta(s)
            mark = "" if m.get("correct") is None else (" ✓" if m["correct"] else " ✗")
            out.append({"label": f"#{s}: {m.get('prompt', '')} → {m.get('generated', '')}{mark}", "value": s})
        return out

    return memo(rec, ("vlm_questions",), make), sel.sample


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(QUESTION, "value"), State(ids.SELECTION, "data"),
          prevent_initial_call=True)
def choose_question(value: Any, data: Any):
    """Question dropdown -> selection sample (only page-local inputs; nothing on page insertion)."""
    if user_triggered() is None or value is None:
        return no_update
    sel = Selection.from_store(data)
    return no_update if int(value) == sel.sample else patch(sample=int(value))


@callback(Output(TOKENS, "options"), Output(TOKENS, "value"), Input(ids.SELECTION, "data"), State(TOKENS, "value"))
def token_options(data: Any, current: Any):
    """Selection -> the answer tokens as choices (the current one kept when the answer has it)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return [], None
    toks = _tokens(rec.meta(sel.sample))
    return [{"label": t, "value": j} for j, t in enumerate(toks)], _token(current, len(toks))


@callback(Output(ANSWERS, "children"), Input(ids.SELECTION, "data"))
def answers(data: Any):
    """The question, the reference, and the answer (with an intervention, both answers side by side)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return ""
    m = rec.meta(sel.sample)

    def verdict(ok: Any) -> str:
        return "" if ok is None else (" ✓" if ok else " ✗")

    rows = [html.Dt("question"), html.Dd(m.get("prompt", "")),
            html.Dt("reference"), html.Dd(m.get("answer") or "—"),
            html.Dt("answer"), html.Dd(f"{m.get('generated', '')}{verdict(m.get('correct'))}", id=ids.page_id(P, "answer"))]
    r = m.get("reinforced")
    if r:
        heads = ", ".join(f"L{l}H{h}" for l, h in r.get("heads", [])[:12]) + (" …" if len(r.get("heads", [])) > 12 else "")
        rows += [html.Dt(f"reinforced (×{r.get('alpha')})"),
                 html.Dd(f"{r.get('generated', '')}{verdict(r.get('correct'))}"
                         + (" (changed)" if r.get("changed") else " (unchanged)"), id=ids.page_id(P, "reinforced")),
                 html.Dt("heads scaled"), html.Dd(heads or "none")]
    return html.Dl(rows, className="av-kv")


@callback(Output(IMAGE, "figure"), Input(ids.SELECTION, "data"), Input(TOKENS, "value"))
def image(data: Any, token: Any):
    """The selected head's attention from the chosen answer token's generation step over the image."""
    sel, rec, v, toks, j, problem = _question(data, token)
    if problem:
        return fig_message(problem, height=430)
    grid, patch_size, offset = image_grid(rec)
    heat = image_heat(v.rows[sel.layer, sel.head, j], v.image_span, grid, offset)
    sinks = sink_cells(v.sinks[sel.layer], grid, offset) if v.sinks is not None else []
    tok = toks[j] if j < len(toks) else str(j)
    sub = f"{v.image_ratio[sel.layer, sel.head, j]:.0%} of its attention on the image"
    if v.sinks is not None:
        sub += f"; {len(sinks)} sink token(s) in layer {sel.layer}"
    return fig_image_attention(rec.thumbnail(sel.sample), heat, patch_size=patch_size, sinks=sinks,
                               title=f"L{sel.layer} H{sel.head}: answer token '{plain_text(tok)}' → image", subtitle=sub)


@callback(Output(RATIO, "figure"), Output(VHD, "figure"), Input(ids.SELECTION, "data"), Input(TOKENS, "value"),
          Input(MODE, "value"))
def heatmaps(data: Any, token: Any, mode: Any):
    """Layers x heads: image attention ratio and VHD, of the chosen token or the means over the recording."""
    sel, rec, v, _, j, problem = _question(data, token)
    if problem:
        return fig_message(problem, height=260), fig_message(problem, height=260)
    selected = (sel.layer, sel.head)
    if mode == "mean":
        have = set(rec.head_metrics())
        ratio = rec.head_metric("image_attention_ratio") if "image_attention_ratio" in have else None
        vhd = rec.head_metric("vhd") if "vhd" in have else None
        what = "mean over every question"
    else:
        ratio = v.image_ratio[:, :, j]
        vhd = v.vhd[:, :, j] if v.vhd is not None else None
        what = f"answer token {j}"
    none = f"not in this file: run `attnviz analyze {sel.file}`" if mode == "mean" else "recorded with --no-vhd"
    f_ratio = (fig_head_grid(ratio, metric="image ratio", selected=selected, title=f"Image attention ratio ({what})")
               if ratio is not None else fig_message(f"Image attention ratio {none}.", height=260))
    f_vhd = (fig_head_grid(vhd, metric="VHD", selected=selected, title=f"VHD ({what})")
             if vhd is not None else fig_message(f"VHD {none}.", height=260))
    return f_ratio, f_vhd


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(RATIO, "clickData"), Input(VHD, "clickData"),
          prevent_initial_call=True)
def pick_head(ratio_click: Any, vhd_click: Any):
    """A click on a heatmap cell selects that head everywhere (``x`` = head, ``y`` = layer)."""
    trigger = user_triggered()
    if trigger not in (RATIO, VHD):
        return no_update
    click = ratio_click if trigger == RATIO else vhd_click
    try:
        pt = click["points"][0]
        return patch(layer=int(pt["y"]), head=int(pt["x"]))
    except (TypeError, KeyError, IndexError, ValueError):
        return no_update


@callback(Output(BARS, "figure"), Input(ids.SELECTION, "data"), Input(TOKENS, "value"))
def bars(data: Any, token: Any):
    """The selected head's image attention ratio and VHD at every answer token."""
    sel, rec, v, toks, j, problem = _question(data, token)
    if problem:
        return fig_message(problem, height=260)
    return fig_token_ratios(toks, v.image_ratio[sel.layer, sel.head], selected=j,
                            vhd=v.vhd[sel.layer, sel.head] if v.vhd is not None else None,
                            title=f"L{sel.layer} H{sel.head} at each answer token")


@callback(Output(CENTRIC, "children"), Input(ids.SELECTION, "data"))
def centric(data: Any):
    """The image-centric heads of the recording (Kang et al. 2025), best first."""
    sel, rec, problem = _resolve(data)
    if problem:
        return ""
    s = summary(rec)
    if s is None or "image_centric" not in s:
        why = ("recorded with --no-sinks" if "sink_phi" not in rec.per_sample_arrays()
               else f"not computed: run `attnviz analyze {sel.file}`")
        return message(f"Image-centric heads need the sink statistic: {why}.", "warning")
    mask = np.asarray(s["image_centric"], bool)
    ratio, share = np.asarray(s["image_ratio"]), np.asarray(s["non_sink"])
    p = s["params"]
    note = html.Div(f"image attention ratio >= {p['min_image_ratio']:g} and visual non-sink ratio >= {p['rho']:g} "
                    f"(sinks: phi > {p['tau']:g}), means over {s['summary'].get('n_steps', '?')} answer tokens",
                    className="av-note")
    heads = sorted(zip(*np.nonzero(mask)), key=lambda lh: -ratio[lh])
    if not heads:
        return html.Div([html.P("No head meets both thresholds."), note])
    header = html.Tr([html.Th("head"), html.Th("image ratio"), html.Th("non-sink share")])
    body = [html.Tr([html.Td(f"L{l} H{h}" + (" (selected)" if (l, h) == (sel.layer, sel.head) else "")),
                     html.Td(f"{ratio[l, h]:.3f}"), html.Td(f"{share[l, h]:.3f}")]) for l, h in heads]
    return html.Div([html.Table([header, *body], id=ids.page_id(P, "centric-table")), note])


@callback(Output(SINKS, "figure"), Input(ids.SELECTION, "data"))
def sinks(data: Any):
    """How often each patch's image token is a sink, per layer (from the stored summary)."""
    sel, rec, problem = _resolve(data)
    if problem:
        return fig_message(problem, height=240)
    s = summary(rec)
    if s is None or "sink_frequency" not in s:
        return fig_message("No sink statistics in this file (recorded with --no-sinks, or run `attnviz analyze`).",
                           height=240)
    grid, _, offset = image_grid(rec)
    per = s.get("sinks_per_image")
    if per is not None and not np.any(per):
        facts = rec.extraction_params.get("family") or {}
        dims = facts.get("sink_dims")
        why = ("no massive-activation dimension was found" if not dims else
               f"no image token exceeds it in the massive dimensions {dims}")
        return fig_message(f"No visual sink token in any layer at tau {s['params'].get('tau'):g}: {why} "
                           f"({s['summary'].get('n_samples', '?')} questions).", height=160)
    title = "Visual sink tokens per layer" + (f" (at most {float(np.max(per)):.2f} per image)" if per is not None else "")
    return fig_sink_frequency(s["sink_frequency"], grid, offset=offset, tau=s["params"].get("tau"), title=title)
