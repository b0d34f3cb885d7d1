"""Small cached look-ups the pages share (per open recording, in memory).

Values are cached on the :class:`Recording` object itself, so a file that is reopened (changed on
disk) starts with an empty cache, and nothing outlives the recording.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from attnviz.analysis.head_stats import METRIC_INFO, compute_head_stats
from attnviz.store.reader import Recording

__all__ = ["memo", "GridMetric", "grid_metrics", "grid_values", "LIVE_STATS_SAMPLES"]

#: Samples used when a file has no stored entropy/confidence/cls_attention (incomplete file, or
#: `attnviz analyze` not run): estimated from the first N written samples, in memory only.
LIVE_STATS_SAMPLES = 8


def memo(rec: Recording, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()`` once per open recording and ``key``."""
    cache = rec.__dict__.setdefault("_attnviz_app_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


@dataclass(frozen=True)
class GridMetric:
    name: str
    stored: bool
    units: str = ""
    definition: str = ""


def grid_metrics(rec: Recording, kind: str | None = None) -> list[GridMetric]:
    """Per-head statistics the all-heads grid can colour ``kind`` by: the file's head metrics of
    that stack, plus entropy / confidence / cls_attention estimated live when not stored."""
    kind = kind or rec.main_kind

    def make() -> list[GridMetric]:
        shape = rec.stack_shape(kind)
        out: list[GridMetric] = []
        for name in rec.head_metrics():
            info = rec.head_metric_info(name)
            if info.kind == kind and rec.h5[f"head_metrics/{name}"].shape == shape:
                out.append(GridMetric(name, True, info.units, info.definition))
        have = {m.name for m in out}
        n_prefix = rec.layout(kind).n_prefix
        for name, info in METRIC_INFO.items():
            if name not in have and (name != "cls_attention" or n_prefix):
                out.append(GridMetric(name, False, info.units, info.definition))
        first = [m for m in out if m.name == "entropy"]
        return first + [m for m in out if m.name != "entropy"]

    return memo(rec, ("grid_metrics", kind), make)


def grid_values(rec: Recording, metric: str, kind: str | None = None) -> tuple[np.ndarray, str]:
    """float ``[n_layers, n_heads]`` of ``metric`` for ``kind`` and a note for the page ('' if none).

    Raises:
        KeyError: the metric is neither stored nor one of the live statistics.
    """
    kind = kind or rec.main_kind
    known = {m.name: m for m in grid_metrics(rec, kind)}
    if metric not in known:
        raise KeyError(f"no head metric {metric!r}; available: {', '.join(known) or 'none'}")
    if known[metric].stored:
        return memo(rec, ("metric", kind, metric), lambda: rec.head_metric(metric)), ""
    stats = memo(rec, ("live_stats", kind), lambda: compute_head_stats(rec, kind, max_samples=LIVE_STATS_SAMPLES))
    why = "the file is incomplete" if not rec.complete else "not stored in the file; run `attnviz analyze FILE`"
    note = f"{metric} estimated from the first {stats.n_samples} sample(s) ({why})."
    return stats.as_dict()[metric], note


def lru(rec: Recording, namespace: str, key: Any, make: Callable[[], Any], maxsize: int = 32) -> Any:
    """Like :func:`memo` but keeps only the ``maxsize`` most recent keys of ``namespace``
    (per-sample values: memory stays bounded however large the file)."""
    cache = rec.__dict__.setdefault("_attnviz_app_cache", {})
    store: OrderedDict = cache.setdefault(("lru", namespace), OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = make()
    store[key] = value
    while len(store) > maxsize:
        store.popitem(last=False)
    return value
