"""The top layout every page shares: header with navigation and file picker, file banner,
the selection store, and the page container."""

from __future__ import annotations

import logging
from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from attnviz.app import ids
from attnviz.app.registry import FileRegistry, UnknownFileError, file_status, get_registry
from attnviz.app.selection import Selection, initial_selection, patch

__all__ = ["shell_layout", "register_shell_callbacks", "pick_file", "banner", "callback_error", "error_banner_text"]

_log = logging.getLogger("attnviz.app")


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


def pick_file(key: Any, data: Any = None):
    """File picker -> selection: the file changes, the query is reset, and the sample, layer and head are
    brought into the new file's ranges (a recording of another model has other sizes); an unknown key is
    refused."""
    try:
        get_registry().entry(key)
    except UnknownFileError:
        return no_update
    changes: dict[str, Any] = {"file": key, "query": None}
    try:
        rec = get_registry().get(key)
        sel = Selection.from_store(data)
        n_layers = max(rec.stack_shape(k)[0] for k in rec.kinds())
        n_heads = max(rec.stack_shape(k)[1] for k in rec.kinds())
        changes.update(sample=min(max(sel.sample, 0), max(rec.n_samples - 1, 0)),
                       layer=min(max(sel.layer, 0), n_layers - 1), head=min(max(sel.head, 0), n_heads - 1))
    except Exception:  # noqa: BLE001 - a file that does not open: its banner says why
        pass
    return patch(**changes)


def error_banner_text(err: BaseException) -> str:
    """One line for the banner when a callback failed (the server keeps running and the other files too)."""
    from attnviz.errors import AttnvizError

    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if isinstance(err, AttnvizError):
        return first + " Other recordings can still be opened from the picker."
    if isinstance(err, (OSError, RuntimeError)):
        return ("The recording cannot be read right now: it is damaged, or was changed while the dashboard read it "
                f"({first}). Other recordings can still be opened from the picker.")
    return f"A view could not be drawn ({type(err).__name__}: {first}); the other views keep working."


def callback_error(err: Exception) -> None:
    """The app's ``on_error``: any callback that raises logs the traceback on the server, shows one line in
    the banner, and leaves its outputs as they were (no HTTP 500, no broken page)."""
    _log.error("callback failed: %s", err, exc_info=err)
    try:
        dash.set_props(ids.FILE_BANNER, {"children": error_banner_text(err), "className": "av-banner av-banner-error"})
    except Exception:  # noqa: BLE001 - outside a request (tests): nothing to show
        pass
    return None


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
                  State(ids.SELECTION, "data"), prevent_initial_call=True)(pick_file)
    dash.callback(Output(ids.FILE_BANNER, "children"), Output(ids.FILE_BANNER, "className"),
                  Input(ids.SELECTION, "data"))(banner)
