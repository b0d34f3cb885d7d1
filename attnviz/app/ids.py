"""Component ids of the dashboard, in one place.

Ids of the shell (present on every page) are constants. Ids of a page's own components are made
with :func:`page_id` from the page's prefix, so two pages never collide and a reusable component
(the all-heads grid) can be embedded on several pages at once (:class:`HeadGridIds`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "URL",
    "SELECTION",
    "FILE_PICKER",
    "FILE_BANNER",
    "NAV",
    "page_id",
    "HeadGridIds",
]

# --- the shell (top layout, outside the page container) -------------------------------------
URL = "attnviz-url"
#: dcc.Store with the shared selection ``{"file", "sample", "layer", "head", "query"}``
#: (see :mod:`attnviz.app.selection`).
SELECTION = "attnviz-selection"
FILE_PICKER = "attnviz-file-picker"
FILE_BANNER = "attnviz-file-banner"
NAV = "attnviz-nav"


def page_id(prefix: str, name: str) -> str:
    """The id of component ``name`` on the page with ``prefix``, e.g. ``page_id("explorer", "image")``."""
    return f"{prefix}-{name}"


@dataclass(frozen=True)
class HeadGridIds:
    """Ids of one embedded all-heads grid (:class:`attnviz.app.components.HeadGrid`)."""

    prefix: str

    @property
    def graph(self) -> str:
        return page_id(self.prefix, "headgrid")

    @property
    def metric(self) -> str:
        return page_id(self.prefix, "headgrid-metric")

    @property
    def note(self) -> str:
        return page_id(self.prefix, "headgrid-note")
