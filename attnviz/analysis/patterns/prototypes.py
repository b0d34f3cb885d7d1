"""Step 6: what a cluster looks like: readable facts about its decoded prototype."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["describe_prototype"]

def describe_prototype(proto: np.ndarray, prefix: float, mode: str) -> dict[str, Any]:
    """Readable facts about a prototype map ``[H, W]``: where it peaks (offset (dy, dx) from the query
    for centred maps, grid position for absolute ones), its peak value and prefix mass, its flatness
    (mean / peak: 1 for a flat map, about 1/(H*W) for a single spot); centred mode only: its spread
    (the mean Chebyshev offset in patches, weighted by the map) and the shares of its mass in the
    peak cell, the query's row and its column (``peak_share``, ``row_share``, ``column_share``)."""
    h, w = proto.shape
    py, px = np.unravel_index(int(np.argmax(proto)), proto.shape)
    peak = float(proto[py, px])
    out: dict[str, Any] = {"peak_value": peak, "prefix": float(prefix),
                           "flatness": float(proto.mean() / peak) if peak > 0 else 1.0}
    if mode == "centred":
        cy, cx = h // 2, w // 2
        out["peak_offset"] = (int(py - cy), int(px - cx))
        yy, xx = np.mgrid[:h, :w]
        cheb = np.maximum(abs(yy - cy), abs(xx - cx))
        tot = float(proto.sum())
        out["spread"] = float((proto * cheb).sum() / tot) if tot > 0 else 0.0
        out["peak_share"] = float(peak / tot) if tot > 0 else 0.0
        out["row_share"] = float(proto[cy].sum() / tot) if tot > 0 else 0.0
        out["column_share"] = float(proto[:, cx].sum() / tot) if tot > 0 else 0.0
    else:
        out["peak_position"] = (int(py), int(px))
    return out
