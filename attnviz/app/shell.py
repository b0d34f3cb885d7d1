"""The top layout every page shares: header with navigation and file picker, file banner,
the selection store, and the page container."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, dcc, html, no_update

from attnviz.app import ids
from attnviz.app.registry import FileRegistry, UnknownFileError, file_status, get_registry
from attnviz.app.selection import Selection, initial_selection, patch

__all__ = ["shell_layout", "register_shell_callbacks", "pick_file", "banner"]


def shell_layout(registry: FileRegistry) -> html.Div:
    default = registry.default_key()
    pages = sorted(dash.page_registry.values(), key=lambda p: (p.get("order") or 0, p["name"]))
    nav = [dcc.Link(p["name"], href=p["relative_path"], className="av-nav-link") for p in pages]
    return html.Div([
        dcc.Location(id=ids.URL),
        dcc.Store(id=ids.SELECTION, data=initial_selection(default), storage_type="memory"),
        html.Header([
            html.Div([html.Span("attn", className="av-brand-a"), html.Span("viz", className="av-brand-b")],
                     className="av-brand"),
            html.Nav(nav, id=ids.NAV, className="av-nav"),
            html.Div([
                html.Label("recording", htmlFor=ids.FILE_PICKER, className="av-label"),
                dcc.Dropdown(id=ids.FILE_PICKER, clearable=False, value=default, className="av-file-picker",
                             options=[{"label": e.label, "value": e.key} for e in registry.entries]),
            ], className="av-file"),
        ], className="av-header"),
        html.Div(id=ids.FILE_BANNER, className="av-banner"),
        html.Main(dash.page_container, className="av-main"),
    ], className="av-app")


def pick_file(key: Any):
    """File picker -> selection (file changes, query reset); an unknown key is refused."""
    try:
        get_registry().entry(key)
    except UnknownFileError:
        return no_update
    return patch(file=key, query=None)


def banner(data: Any) -> tuple[Any, str]:
    """Selection -> banner text and class (hidden when there is nothing to say)."""
    sel = Selection.from_store(data)
    if sel.file is None:
        return "No recording selected.", "av-banner av-banner-error"
    try:
        st = file_status(sel.file)
    except UnknownFileError as e:
        return str(e), "av-banner av-banner-error"
    if not st.ok:
        return st.message + " Other recordings can still be opened from the picker.", "av-banner av-banner-error"
    if st.banner:
        return st.banner, "av-banner av-banner-warning"
    return "", "av-banner av-banner-hidden"


def register_shell_callbacks() -> None:
    dash.callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(ids.FILE_PICKER, "value"),
                  prevent_initial_call=True)(pick_file)
    dash.callback(Output(ids.FILE_BANNER, "children"), Output(ids.FILE_BANNER, "className"),
                  Input(ids.SELECTION, "data"))(banner)
