"""Step 1: query-centred maps, their validity masks, and the peak scaling (numpy).

A query patch's attention over the patch grid ``[gh, gw]`` becomes a ``(2gh-1, 2gw-1)`` map centred on the
query (:func:`query_centre`), so "attends to its left neighbour" looks the same wherever the query sits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["query_centre", "query_uncentre", "centred_masks", "mask_table", "normalise"]

def query_centre(maps: np.ndarray, query: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Re-centre attention maps on their query patch.

    Args:
        maps: float ``[n, gh, gw]``: each row's attention over the patch keys, on the grid.
        query: int ``[n]``: the query patch, row-major index ``qy * gw + qx`` (prefix tokens not counted).
        grid: (gh, gw).

    Returns:
        float ``[n, 2*gh - 1, 2*gw - 1]`` with ``out[i, gh-1+dy, gw-1+dx] = maps[i, qy+dy, qx+dx]``;
        0 where ``(qy+dy, qx+dx)`` lies outside the grid (see :func:`centred_masks`).
    """
    gh, gw = grid
    maps = np.asarray(maps)
    n = len(maps)
    qy, qx = np.divmod(np.asarray(query, np.int64), gw)
    out = np.zeros((n, 2 * gh - 1, 2 * gw - 1), maps.dtype)
    rows = (gh - 1 - qy)[:, None] + np.arange(gh)[None, :]
    cols = (gw - 1 - qx)[:, None] + np.arange(gw)[None, :]
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = maps
    return out


def query_uncentre(centred: np.ndarray, query: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`query_centre`: ``[n, 2gh-1, 2gw-1]`` -> ``[n, gh, gw]`` (valid part only)."""
    gh, gw = grid
    centred = np.asarray(centred)
    n = len(centred)
    qy, qx = np.divmod(np.asarray(query, np.int64), gw)
    rows = (gh - 1 - qy)[:, None] + np.arange(gh)[None, :]
    cols = (gw - 1 - qx)[:, None] + np.arange(gw)[None, :]
    return centred[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def centred_masks(grid: tuple[int, int]) -> np.ndarray:
    """Validity masks of query-centred maps: float32 ``[gh*gw, 2gh-1, 2gw-1]``, row q for query patch q."""
    gh, gw = grid
    q = np.arange(gh * gw)
    return query_centre(np.ones((gh * gw, gh, gw), np.float32), q, grid)


def mask_table(grid: tuple[int, int], mode: str) -> np.ndarray:
    """``[gh*gw, H, W]`` validity masks of the model inputs of ``mode`` (all ones for absolute maps)."""
    if mode == "centred":
        return centred_masks(grid)
    return np.ones((grid[0] * grid[1], *grid), np.float32)


def normalise(values: np.ndarray, prefix: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale maps ``[n, ...]`` and prefix masses ``[n]`` (in place for float32 input).

    ``"peak"``: divide both by ``max(max(map), prefix)`` (maps that are all zero stay zero);
    ``"none"``: unchanged.
    """
    if scale == "none":
        return values, prefix
    peak = np.maximum(values.reshape(len(values), -1).max(1, initial=0.0), prefix)
    peak = np.where(peak > 0, peak, 1.0).astype(values.dtype)
    values /= peak.reshape(-1, *([1] * (values.ndim - 1)))
    prefix /= peak
    return values, prefix
