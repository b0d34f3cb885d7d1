"""Heads page ("/heads"): which heads matter, by several pruning-based metrics side by side.

Reads what ``attnviz importance`` (or ``attnviz extract --importance``) stored: the head metrics
``accuracy_drop``, ``loss_increase``, ``kl_divergence``, ``gradient_importance`` (plus ``entropy``
and ``confidence`` of the maps) and the curves at ``analyses/importance``. Nothing here touches the
model or loops over samples.

Views: the all-heads grid with a metric selector (a click selects the head everywhere) and the
definition of every metric beside it; a metric-vs-metric scatter with the Spearman rank correlation
table (a click on a cell picks that pair); the iterative pruning curves of every metric with the
random-order band; the partial-pruning curve of the selected head.
"""

from __future__ import annotations

from typing import Any

import dash
import numpy as np
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.analysis import importance as A
from attnviz.analysis.head_stats import METRIC_INFO as STAT_INFO
from attnviz.app import ids
from attnviz.app.components import HeadGrid, graph, message, triggered_id
from attnviz.app.data import grid_metrics, grid_values, memo
from attnviz.app.selection import patch, resolve
from attnviz.figures import fig_message
from attnviz.figures.importance import fig_metric_scatter, fig_partial_pruning, fig_pruning_curves, fig_spearman_table
from attnviz.figures.spatial import clicked_head
from attnviz.store.reader import Recording

dash.register_page(__name__, path="/heads", name="Heads", order=2, title="attnviz - heads")

P = "heads"
STATUS = ids.page_id(P, "status")
DEFINITIONS = ids.page_id(P, "definitions")
X_METRIC = ids.page_id(P, "x-metric")
Y_METRIC = ids.page_id(P, "y-metric")
SCATTER = ids.page_id(P, "scatter")
SPEARMAN = ids.page_id(P, "spearman")
PRUNING = ids.page_id(P, "pruning")
PARTIAL = ids.page_id(P, "partial")

grid = HeadGrid(P, default_metric="accuracy_drop")

#: metrics compared on this page, in this order, when the file has them
PAGE_METRICS = (*A.METRIC_DEFINITIONS, "entropy", "confidence")
DEFAULT_PAIR = ("accuracy_drop", "gradient_importance")


def _howto(file: str, family: str = "vit") -> str:
    if family == "s2t":
        return (f"Head importance by pruning is not measured for speech recordings ({file}); there, heads are ranked by "
                "how well their cross-attention agrees with saliency (ca_saliency_pearson, after `attnviz analyze`) "
                "and by deletion curves, on the Speech page.")
    return (f"No head importance stored in {file} yet: run `attnviz importance --model MODEL --input IMAGES "
            f"--into {file}` (or record with `attnviz extract ... --importance`).")


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Head importance"),
        html.Div(id=STATUS),
        html.Div([
            html.Div([html.H3("All heads (click selects a head everywhere)"), grid.layout()],
                     className="av-card av-col"),
            html.Div([html.H3("Definitions"), html.Div(id=DEFINITIONS)], className="av-card av-col-narrow"),
        ], className="av-cols"),
        html.Div([
            html.Div([
                html.H3("Metric against metric: each head a dot"),
                html.Div([
                    html.Label("x", htmlFor=X_METRIC, className="av-label"),
                    dcc.Dropdown(id=X_METRIC, clearable=False, className="av-dropdown"),
                    html.Label("y", htmlFor=Y_METRIC, className="av-label"),
                    dcc.Dropdown(id=Y_METRIC, clearable=False, className="av-dropdown"),
                ], className="av-row"),
                graph(SCATTER, filename="heads-metric-scatter"),
            ], className="av-card av-col"),
            html.Div([html.H3("Spearman rank correlation (click a cell to plot that pair)"),
                      graph(SPEARMAN, filename="heads-spearman")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Iterative pruning: least important heads first, 10% per step"),
                      graph(PRUNING, filename="heads-pruning-curves")], className="av-card av-col"),
            html.Div([html.H3("Selected head: partial pruning"),
                      graph(PARTIAL, filename="heads-partial-pruning")], className="av-card av-col-narrow"),
        ], className="av-cols"),
    ], className="av-page")


# -- data access (memoised per open recording) ---------------------------------------------------------


def curves(rec: Recording) -> A.ImportanceCurves | None:
    """The stored importance curves (read once per open recording), or None."""
    return memo(rec, ("importance_curves",), lambda: A.read_importance(rec))


def page_metrics(rec: Recording) -> list[str]:
    """Metrics this page compares: the importance metrics stored, then entropy/confidence (stored or estimated)."""
    available = {m.name for m in grid_metrics(rec)}
    return [m for m in PAGE_METRICS if m in available]


def definition(rec: Recording, name: str) -> tuple[str, str, str]:
    """(definition, citation, units) of a metric: as stored with it, else the built-in text."""
    if name in rec.head_metrics():
        info = rec.head_metric_info(name)
        if info.definition:
            return info.definition, info.citation, info.units
    if name in A.METRIC_DEFINITIONS:
        d = A.METRIC_DEFINITIONS[name]
        return d.definition, d.citation, d.units
    if name in STAT_INFO:
        i = STAT_INFO[name]
        return i.definition, i.citation, i.units
    return "", "", ""


def _values(rec: Recording, name: str) -> np.ndarray:
    return np.asarray(grid_values(rec, name)[0], np.float64)


def spearman(rec: Recording, names: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    return memo(rec, ("importance_spearman", names),
                lambda: A.spearman_table({m: _values(rec, m) for m in names}))


def _target_note(c: A.ImportanceCurves) -> str:
    return A.target_note(c.target_source)


# -- callbacks -----------------------------------------------------------------------------------------


@callback(Output(STATUS, "children"), Input(ids.SELECTION, "data"))
def status(data: Any):
    """Selection -> what the page shows (or how to compute it)."""
    sel, rec, problem = resolve(data)
    if problem:
        return message(problem, "error")
    c = curves(rec)
    if c is None:
        return message(_howto(sel.file, rec.family), "warning")
    text = (f"Measured on {c.n_samples} input(s), {c.ablation} ablation (a head's output at the input of the "
            f"output projection set to {'zero' if c.ablation == 'zero' else 'its mean over the inputs'}); "
            f"unablated {A.accuracy_name(c.target_source)} {c.base_accuracy:.1%}, loss {c.base_loss:.3f} nats. "
            f"{_target_note(c)} "
            f"Selected: layer {sel.layer}, head {sel.head}.")
    return message(text, "warning" if c.target_source == "prediction" else "info")


@callback(Output(DEFINITIONS, "children"), Input(ids.SELECTION, "data"), Input(grid.ids.metric, "value"))
def definitions(data: Any, metric: str | None):
    """The definition (formula, citation) of every metric on the page; the one the grid shows first."""
    _, rec, problem = resolve(data)
    if problem:
        return ""
    names = page_metrics(rec)
    if metric in names:
        names = [metric] + [m for m in names if m != metric]
    items = []
    for name in names:
        text, citation, units = definition(rec, name)
        items.append(html.Div([
            html.B(name + (f" [{units}]" if units else "")), html.Br(), html.Span(text), html.Br(),
            html.Small(citation, style={"color": "#666"}),
        ], className="av-definition" + (" av-definition-selected" if name == metric else ""),
            style={"marginBottom": "10px", **({"borderLeft": "3px solid #e4572e", "paddingLeft": "6px"}
                                               if name == metric else {})}))
    items.append(html.Div("Partial pruning keeps only the top-p fraction of each attention row of one head "
                          "and renormalises it (p = 100% .. 10%); iterative pruning removes heads cumulatively "
                          "from least to most important by a metric; a higher area under the curve means the "
                          "metric better predicts what can be removed. docs/importance.md has the formulas.",
                          className="av-note"))
    return items


@callback(Output(X_METRIC, "options"), Output(X_METRIC, "value"), Output(Y_METRIC, "options"),
          Output(Y_METRIC, "value"), Input(ids.SELECTION, "data"), Input(SPEARMAN, "clickData"),
          State(X_METRIC, "value"), State(Y_METRIC, "value"))
def axes(data: Any, cell: Any, x: str | None, y: str | None):
    """Metric choices for the scatter; a click on a Spearman cell sets (x, y) to that pair."""
    _, rec, problem = resolve(data)
    if problem:
        return [], None, [], None
    names = page_metrics(rec)
    opts = [{"label": m, "value": m} for m in names]
    if triggered_id() == SPEARMAN and cell:
        try:
            pt = cell["points"][0]
            if pt["x"] in names and pt["y"] in names:
                x, y = pt["x"], pt["y"]
        except (TypeError, KeyError, IndexError):
            pass
    defaults = [m for m in DEFAULT_PAIR if m in names] + [m for m in names if m not in DEFAULT_PAIR]
    if x not in names:
        x = defaults[0] if defaults else None
    if y not in names:
        y = next((m for m in defaults if m != x), x)
    return opts, x, opts, y


@callback(Output(SCATTER, "figure"), Output(SPEARMAN, "figure"),
          Input(ids.SELECTION, "data"), Input(X_METRIC, "value"), Input(Y_METRIC, "value"))
def comparison(data: Any, x: str | None, y: str | None):
    """Selection and metric pair -> scatter of the two metrics over heads and the Spearman table."""
    sel, rec, problem = resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem)
    names = page_metrics(rec)
    if not any(m in A.METRIC_DEFINITIONS for m in names):
        msg = _howto(sel.file, rec.family)
        return fig_message(msg), fig_message(msg)
    if x not in names or y not in names:
        return fig_message("Choose two metrics."), no_update
    table_names, rho = spearman(rec, tuple(names))
    r = float(rho[table_names.index(x), table_names.index(y)])
    scatter = fig_metric_scatter(_values(rec, x), _values(rec, y), x_name=x, y_name=y,
                                 selected=(sel.layer, sel.head), rho=r)
    return scatter, fig_spearman_table(table_names, rho, highlight=(x, y))


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(SCATTER, "clickData"),
          prevent_initial_call=True)
def pick(click: Any):
    """A click on a dot of the scatter selects that head everywhere."""
    head = clicked_head(click)
    return no_update if head is None else patch(layer=head[0], head=head[1])


@callback(Output(PRUNING, "figure"), Input(ids.SELECTION, "data"), Input(grid.ids.metric, "value"))
def pruning(data: Any, metric: str | None):
    """Pruning curves of every metric with the random-order band (the grid's metric drawn thicker)."""
    sel, rec, problem = resolve(data)
    if problem:
        return fig_message(problem)
    c = curves(rec)
    if c is None:
        return fig_message(_howto(sel.file, rec.family))
    rb = c.random
    n_layers, n_heads = c.partial_accuracy.shape[:2]
    y = A.accuracy_name(c.target_source)
    return fig_pruning_curves(
        c.pruning_fractions, {m: c.curve(m) for m in c.pruning_metrics}, random_mean=rb.mean, random_std=rb.std,
        random_low=rb.low, random_high=rb.high, auc=c.auc, random_auc=(rb.auc_mean, rb.auc_std),
        n_heads_total=n_layers * n_heads, y_title=y, highlight=metric,
        title=f"{c.ablation} ablation, {c.n_samples} inputs, {len(c.random_accuracy)} random orders")


@callback(Output(PARTIAL, "figure"), Input(ids.SELECTION, "data"))
def partial(data: Any):
    """Partial-pruning curve (accuracy and KL against the kept fraction) of the selected head."""
    sel, rec, problem = resolve(data)
    if problem:
        return fig_message(problem)
    c = curves(rec)
    if c is None:
        return fig_message(_howto(sel.file, rec.family))
    if c.partial_accuracy.shape[:2] != rec.stack_shape():
        return fig_message("The stored partial-pruning results do not match this recording's heads.")
    l, h = sel.layer, sel.head
    y = A.accuracy_name(c.target_source).replace(" with the unablated model", "")
    return fig_partial_pruning(c.partial_fractions, c.partial_accuracy[l, h], layer=l, head=h,
                               base_accuracy=c.base_accuracy, kl=c.partial_kl[l, h], y_title=y,
                               title=f"Layer {l}, head {h}")
