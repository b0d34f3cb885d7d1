"""The registry of exportable views: what ``attnviz report`` writes, one entry per view.

A view is a function ``(rec, sample) -> figures`` returning a ``go.Figure``, a list of
``(suffix, go.Figure)``, or None when the recording lacks its data (the view is then skipped).
Global views get ``sample=None``; per-sample views run once per chosen sample. Views read the
recording and hand the slices to the same pure :mod:`attnviz.figures` functions the dashboard uses.

Each dashboard page's views live in one module of this package, named after the page
(``overview``, ``spatial``, ``importance``, ``patterns``, ...); adding one is a module here with
``@register_view`` functions and its name in :data:`VIEW_MODULES`::

    from attnviz.app.exports import register_view

    @register_view("spatial_trend", "Mean attention distance across layers", order=40)
    def _spatial_trend(rec, sample):
        if "mean_attention_distance" not in rec.head_metrics():
            return None
        return fig_distance_trend(rec.head_metric("mean_attention_distance"))

Imports run downward only: :mod:`attnviz.report` (the command) imports this registry, the view
modules import figures and analyses; nothing here imports Dash or torch.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from attnviz.store.reader import Recording

__all__ = ["ReportView", "VIEWS", "VIEW_MODULES", "register_view", "load_views", "ViewResult"]

#: Modules (in this package) whose import registers views, in page order.
VIEW_MODULES: tuple[str, ...] = ("overview", "importance", "spatial", "patterns", "qk", "speech", "vlm")

ViewResult = Any  # go.Figure | list[tuple[str, go.Figure]] | None


@dataclass(frozen=True)
class ReportView:
    """One exportable view. ``make(rec, sample)``; ``per_sample`` views get each chosen sample."""

    name: str
    title: str
    make: Callable[[Recording, int | None], ViewResult]
    per_sample: bool = False
    order: int = 100


VIEWS: dict[str, ReportView] = {}


def register_view(name: str, title: str, *, per_sample: bool = False, order: int = 100):
    """Decorator: add ``fn(rec, sample)`` to :data:`VIEWS` under ``name`` (replacing one of that name)."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"view names are lowercase [a-z0-9_]+, got {name!r}")

    def deco(fn: Callable[[Recording, int | None], ViewResult]):
        VIEWS[name] = ReportView(name, title, fn, per_sample, order)
        return fn

    return deco


def load_views() -> list[ReportView]:
    """Every registered view (importing :data:`VIEW_MODULES` first), sorted by order then name."""
    for mod in VIEW_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return sorted(VIEWS.values(), key=lambda v: (v.order, v.name))
