"""The Dash dashboard: ``create_app(files) -> dash.Dash``; ``attnviz serve`` runs it on waitress.

Layers: the lazy reader (:mod:`attnviz.store`) -> pure analyses (:mod:`attnviz.analysis`) -> pure
figures (:mod:`attnviz.figures`) -> thin callbacks here. Serving never imports torch.

Modules:
    factory.py     create_app(files): Dash pages app, top layout, shell callbacks
    registry.py    the files the app may open (by key, never by path); get_recording(file_key)
    selection.py   the shared selection store {file, sample, layer, head, query}: resolve(), patch()
    ids.py         component ids (shell constants; page_id(prefix, name) for page components)
    components.py  graph() with PNG download, HeadGrid (the all-heads grid), message()
    data.py        per-recording memo()/lru(), head-grid metrics (stored or estimated live)
    views.py       recording -> figure builders shared by pages and `attnviz report` (no Dash)
    exports/       the registry of report views, one module per page (`attnviz report` reads it)
    shell.py       header, navigation, file picker, file banner
    server.py      serve() on waitress, sample_data_files()
    pages/         one file per page (overview.py = "/", explorer.py, ...)

How to add a page (e.g. ``attnviz/app/pages/heads.py``)
-------------------------------------------------------
1. One file under ``attnviz/app/pages/``; it MUST call ``dash.register_page`` (Dash imports every
   file there that does) and define ``layout`` (a function of ``**kwargs`` is best). Use absolute
   imports (``from attnviz.app import ids``). Page prefix = the file name, e.g. ``"heads"``::

       import dash
       from dash import Input, Output, callback, html
       from attnviz.app import ids
       from attnviz.app.components import HeadGrid, graph
       from attnviz.app.selection import patch, resolve
       from attnviz.figures import fig_message

       dash.register_page(__name__, path="/heads", name="Heads", order=2)
       P = "heads"
       grid = HeadGrid(P, default_metric="accuracy_drop")   # once, at module level

       def layout(**_):
           return html.Div([grid.layout(), graph(ids.page_id(P, "scatter"))], className="av-page")

       @callback(Output(ids.page_id(P, "scatter"), "figure"), Input(ids.SELECTION, "data"))
       def scatter(data):                      # thin: store -> analysis -> figure
           sel, rec, problem = resolve(data)   # validated, clamped; problem = one line or None
           if problem:
               return fig_message(problem)
           return fig_something(rec.head_metric("x"), selected=(sel.layer, sel.head))

2. Read the selection with ``Input(ids.SELECTION, "data")`` and :func:`selection.resolve`.
   Write it with ``Output(ids.SELECTION, "data", allow_duplicate=True)``,
   ``prevent_initial_call=True``, returning ``patch(layer=.., head=..)`` (only those keys change).
3. Get the open recording with ``resolve(data)`` or ``registry.get_recording(file_key)``
   (cached; refuses keys that are not files given to the app). Read only the slices you show
   (``rec.attention_query``, ``rec.attention_heads``, ``rec.head_metric``, cached analyses), never
   whole datasets; cache per-recording derived values with ``data.memo(rec, key, make)``.
4. Every figure goes in ``components.graph(id)`` (toolbar PNG download). Pure figure functions
   live in ``attnviz/figures/<page>.py``; test them on their trace data, and call the callbacks as
   plain functions in tests (after ``create_app([...])``, the page module is importable as
   ``attnviz.app.pages.<name>``).
5. Static export: register the page's views in its module of :mod:`attnviz.app.exports` (see its docstring).

Pitfalls (found with browser tests; details in docs/dashboard.md's developer section):

* A callback that OUTPUTS to ``ids.SELECTION`` must have only page-local Inputs (use
  ``State(ids.SELECTION, "data")``), otherwise Dash fires it on other pages and logs
  "A nonexistent object was used in an Input".
* When Dash pages insert a page, its callbacks fire once with ALL inputs triggered, even with
  ``prevent_initial_call=True``: guard store writers with ``components.user_triggered()``.
* Import at module top: first-time imports from several server threads at once can race.
* Build figures in one ``go.Figure(data=[...dicts], layout={...})`` call
  (``attnviz.figures.make_figure``): ``add_shape``/``update_layout`` loops and named templates
  cost 5-10x more.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from attnviz.app.factory import create_app

        return create_app
    raise AttributeError(name)
