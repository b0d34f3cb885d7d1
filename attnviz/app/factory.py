"""The app factory: ``create_app(files) -> dash.Dash``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import dash

from attnviz.app.registry import FileRegistry, set_active_registry

__all__ = ["create_app", "PAGES_DIR", "ASSETS_DIR"]

PAGES_DIR = Path(__file__).with_name("pages")
#: repository-level assets/ (CSS, favicon); Dash serves it at /assets/.
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"


def _reset_dash_globals() -> None:
    """Forget pages and callbacks left by an earlier app in this process (tests create several).

    Dash pages execute every page module again for each new app, which registers its callbacks
    again (dash.callback); leftovers of an app that never served a request would duplicate them.
    """
    from dash import _callback, _pages

    _callback.GLOBAL_CALLBACK_LIST.clear()
    _callback.GLOBAL_CALLBACK_MAP.clear()
    _pages.PAGE_REGISTRY.clear()


def create_app(files: Sequence[str | os.PathLike], *, title: str = "attnviz") -> dash.Dash:
    """Build the dashboard over ``files`` (recordings; folders give their ``*.h5``).

    Only these files can be opened by the app. Does not import torch.

    Raises:
        InputError: no files, or a path that does not exist.
    """
    from attnviz.figures import use_house_template

    registry = FileRegistry(files)
    set_active_registry(registry)
    use_house_template()
    _reset_dash_globals()
    from attnviz.app.shell import callback_error, register_shell_callbacks, shell_layout

    app = dash.Dash(
        "attnviz.app",
        on_error=callback_error,
        use_pages=True,
        pages_folder=str(PAGES_DIR),
        assets_folder=str(ASSETS_DIR),
        suppress_callback_exceptions=True,
        title=title,
        update_title=None,
    )
    app.server.config["ATTNVIZ_REGISTRY"] = registry

    app.layout = shell_layout(registry)
    register_shell_callbacks()
    return app
