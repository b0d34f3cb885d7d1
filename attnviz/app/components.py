"""Reusable components: figure graphs with PNG download, the all-heads grid, the shell parts."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from attnviz.app import ids
from attnviz.app.data import grid_metrics, grid_values
from attnviz.app.selection import patch, resolve
from attnviz.figures import fig_message
from attnviz.figures.heads import fig_head_grid

__all__ = ["GRAPH_CONFIG", "graph", "HeadGrid", "message", "triggered_id", "user_triggered"]


def triggered_id() -> Any:
    """``dash.ctx.triggered_id`` inside a callback; None when called as a plain function (tests)."""
    try:
        return dash.ctx.triggered_id
    except dash.exceptions.MissingCallbackContextException:
        return None


def user_triggered() -> Any:
    """The id of the ONE input a user changed, else None.

    When a page's layout is inserted, Dash calls its callbacks with every input "triggered" at
    once, even with ``prevent_initial_call=True``; a callback that writes the selection store must
    then do nothing, or navigating to the page would overwrite the selection with the controls'
    initial values. None as well outside a callback (tests call the logic functions directly).
    """
    try:
        trig = dash.ctx.triggered
    except dash.exceptions.MissingCallbackContextException:
        return None
    if len(trig) != 1:
        return None
    return dash.ctx.triggered_id

#: plotly toolbar: always offers "Download plot as a PNG" (camera icon), at 2x resolution.
GRAPH_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "png", "scale": 2},
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
}


def graph(id: str, *, filename: str | None = None, height: int | None = None, **kwargs: Any) -> dcc.Graph:
    """A ``dcc.Graph`` whose toolbar downloads a PNG named ``filename`` (default: the id)."""
    config = {**GRAPH_CONFIG, "toImageButtonOptions": {**GRAPH_CONFIG["toImageButtonOptions"],
                                                        "filename": filename or id}}
    config.update(kwargs.pop("config", {}))
    style = kwargs.pop("style", {})
    if height:
        style = {"height": f"{height}px", **style}
    return dcc.Graph(id=id, config=config, style=style, **kwargs)


def message(text: str, kind: str = "info") -> html.Div:
    """A message box (kind: info, warning, error) styled by assets/attnviz.css."""
    return html.Div(text, className=f"av-msg av-msg-{kind}")


class HeadGrid:
    """The all-heads grid (layers x heads, one heatmap), embeddable on any page.

    Create it ONCE at module level of a page (this registers its callbacks), then put
    ``grid.layout()`` into the page layout::

        grid = HeadGrid("heads")                 # ids derive from the page prefix
        layout = lambda **_: html.Div([grid.layout(), ...])

    It colours cells by a chosen per-head statistic (the file's head metrics plus entropy,
    confidence and CLS attention; see :func:`attnviz.app.data.grid_metrics`), outlines the
    selected head, and a click on a cell writes ``layer``/``head`` to the selection store.

    Args:
        prefix: the page prefix (unique per embedded grid).
        kind: attention kind whose heads are shown (default: the recording's main kind).
        default_metric: metric chosen first when present (else entropy, else the first one).
    """

    def __init__(self, prefix: str, *, kind: str | None = None, default_metric: str | None = None,
                 title: str | None = None) -> None:
        self.ids = ids.HeadGridIds(prefix)
        self.kind = kind
        self.default_metric = default_metric
        self.title = title
        self._register()

    def layout(self, *, height: int | None = None) -> html.Div:
        return html.Div([
            html.Div([
                html.Label("colour heads by", htmlFor=self.ids.metric, className="av-label"),
                dcc.Dropdown(id=self.ids.metric, clearable=False, className="av-dropdown av-metric-dropdown"),
            ], className="av-row"),
            graph(self.ids.graph, filename=f"{self.ids.prefix}-all-heads", height=height),
            html.Div(id=self.ids.note, className="av-note"),
        ], className="av-headgrid")

    # -- callbacks (plain methods, testable without a browser) ---------------------------------

    def options(self, data: Any, current: str | None) -> tuple[list[dict[str, str]], str | None]:
        """Metric dropdown options for the selected file, and the value to keep/choose."""
        _, rec, problem = resolve(data, self.kind)
        if problem:
            return [], None
        metrics = grid_metrics(rec, self.kind)
        names = [m.name for m in metrics]
        opts = [{"label": m.name + ("" if m.stored else " (estimated)"), "value": m.name} for m in metrics]
        if current in names:
            return opts, current
        for want in (self.default_metric, "entropy"):
            if want in names:
                return opts, want
        return opts, names[0] if names else None

    def figure(self, data: Any, metric: str | None):
        """The grid figure and its note for the selection and metric."""
        sel, rec, problem = resolve(data, self.kind)
        if problem:
            return fig_message(problem, height=220), ""
        if not metric:
            return fig_message("This file has no per-head statistics.", height=220), ""
        try:
            values, note = grid_values(rec, metric, self.kind)
        except KeyError as e:
            return fig_message(str(e.args[0]), height=220), ""
        info = {m.name: m for m in grid_metrics(rec, self.kind)}[metric]
        fig = fig_head_grid(values, metric=metric, selected=(sel.layer, sel.head), units=info.units, title=self.title)
        return fig, (note or info.definition)

    @staticmethod
    def clicked(click: Any):
        """Selection patch for a click on a cell (``x`` = head, ``y`` = layer)."""
        try:
            pt = click["points"][0]
            return patch(layer=int(pt["y"]), head=int(pt["x"]))
        except (TypeError, KeyError, IndexError, ValueError):
            return no_update

    def _register(self) -> None:
        i = self.ids
        dash.callback(Output(i.metric, "options"), Output(i.metric, "value"),
                      Input(ids.SELECTION, "data"), State(i.metric, "value"))(self.options)
        dash.callback(Output(i.graph, "figure"), Output(i.note, "children"),
                      Input(ids.SELECTION, "data"), Input(i.metric, "value"))(self.figure)
        dash.callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(i.graph, "clickData"),
                      prevent_initial_call=True)(self.clicked)
