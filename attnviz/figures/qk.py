"""Figures of the joint query-key embedding (see :mod:`attnviz.analysis.qk` for the method).

``fig_qk_scatter``: one head, its queries and keys in one plane (two marker styles), coloured by token
position, patch row or column, the image, or in/out of the object mask. ``fig_qk_multiples``: every head
small, the all-heads overview (a click on a panel selects its head).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import make_figure

__all__ = ["QK_COLOUR_BY", "QUERY_COLOUR", "KEY_COLOUR", "fig_qk_scatter", "fig_qk_multiples", "qk_trace_groups",
           "clicked_token", "clicked_panel"]

QK_COLOUR_BY = ("role", "position", "row", "column", "image", "mask")
QUERY_COLOUR = "#4e79a7"
KEY_COLOUR = "#f28e2b"
_MASK_COLOURS = {1: "#e15759", 0: "#bab0ac", -1: "#59a14f"}  # object, background, prefix token / no mask
_MASK_NAMES = {1: "on the object", 0: "background", -1: "prefix token or no mask"}


def fig_qk_scatter(query_xy: np.ndarray, key_xy: np.ndarray, *, sample: np.ndarray, position: np.ndarray,
                   row: np.ndarray, col: np.ndarray, in_mask: np.ndarray, colour_by: str = "role",
                   highlight: tuple[int, int] | None = None, prefix_names: Sequence[str] = (),
                   title: str | None = None, subtitle: str | None = None, height: int = 520) -> go.Figure:
    """The joint embedding of one head.

    Args:
        query_xy, key_xy: float ``[n, 2]``: token i's query and key in the plane.
        sample, position, row, col, in_mask: int ``[n]`` per token (row/col -1 for prefix tokens;
            in_mask 1 object, 0 background, -1 unknown).
        colour_by: one of :data:`QK_COLOUR_BY` ("role": queries blue, keys orange).
        highlight: (sample, position) of a token whose query and key are ringed, if present.
        prefix_names: names of the prefix positions, for the hover.

    Returns:
        Queries as circles, keys as diamonds (``customdata`` per point: sample, position, 0 = query /
        1 = key, row, col), one pair of traces per colour group for "mask" (legend toggles them), and a
        last trace with the highlight (possibly empty).
    """
    if colour_by not in QK_COLOUR_BY:
        raise ValueError(f"colour_by must be one of {QK_COLOUR_BY}, not {colour_by!r}")
    qxy = np.asarray(query_xy, np.float32)
    kxy = np.asarray(key_xy, np.float32)
    sample, position = np.asarray(sample), np.asarray(position)
    row, col, in_mask = np.asarray(row), np.asarray(col), np.asarray(in_mask)
    n = len(qxy)
    size = 7 if n < 1500 else 5
    names = [prefix_names[p] if 0 <= p < len(prefix_names) and row[i] < 0 else
             (f"patch ({row[i]}, {col[i]})" if row[i] >= 0 else f"token {p}") for i, p in enumerate(position)]
    hover = "%{text}<br>image %{customdata[0]}, position %{customdata[1]}<extra>%{meta}</extra>"

    def custom(role: int, idx: np.ndarray) -> np.ndarray:
        return np.stack([sample[idx], position[idx], np.full(len(idx), role), row[idx], col[idx]], 1).astype(np.int32)

    traces: list[dict] = []
    values = None
    if colour_by not in ("role", "mask"):
        values = {"position": position, "row": row, "column": col, "image": sample}[colour_by].astype(np.float32)
        values = np.where(values < 0, np.nan, values)  # prefix tokens have no row/column: drawn at the low end
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for role, idx, value in qk_trace_groups(colour_by, in_mask):
        xy, symbol = (qxy, "circle") if role == 0 else (kxy, "diamond")
        marker: dict = dict(size=size, symbol=symbol, opacity=0.75, line=dict(width=0.5, color="white"))
        if colour_by == "mask":
            marker["color"] = _MASK_COLOURS[value]
            name = f"{'queries' if role == 0 else 'keys'}: {_MASK_NAMES[value]} ({len(idx)})"
        elif values is None:
            marker["color"] = QUERY_COLOUR if role == 0 else KEY_COLOUR
            name = f"{'queries ●' if role == 0 else 'keys ◆'} ({len(idx)})"
        else:
            marker.update(color=np.nan_to_num(values[idx], nan=lo), colorscale="Viridis", cmin=lo, cmax=hi,
                          showscale=role == 0, colorbar=dict(title=dict(text=colour_by, side="right"), thickness=12))
            name = f"{'queries ●' if role == 0 else 'keys ◆'} ({len(idx)})"
        traces.append(dict(type="scattergl", x=xy[idx, 0], y=xy[idx, 1], mode="markers", customdata=custom(role, idx),
                           text=[names[i] for i in idx], meta="query" if role == 0 else "key", name=name,
                           marker=marker, hovertemplate=hover))
    hit = np.flatnonzero((sample == highlight[0]) & (position == highlight[1])) if highlight is not None else []
    hx = np.concatenate([qxy[hit, 0], kxy[hit, 0]]) if len(hit) else []
    hy = np.concatenate([qxy[hit, 1], kxy[hit, 1]]) if len(hit) else []
    traces.append(dict(type="scatter", x=hx, y=hy, mode="markers", name="selected token", hoverinfo="skip",
                       showlegend=bool(len(hit)),
                       marker=dict(size=size + 9, color="rgba(0,0,0,0)", line=dict(width=2, color="#d62728"))))
    axis = dict(showticklabels=False, zeroline=False, showgrid=False)
    return make_figure(traces, dict(xaxis=dict(title="joint embedding 1", **axis),
                                    yaxis=dict(title="joint embedding 2", **axis),
                                    legend=dict(itemsizing="constant", orientation="h", y=-0.08),
                                    clickmode="event", uirevision="qk-scatter"),
                       title=title, subtitle=subtitle, height=height)


def fig_qk_multiples(query_xy: np.ndarray, key_xy: np.ndarray, *, selected: tuple[int, int] | None = None,
                     agreement: np.ndarray | None = None, max_points: int = 150, seed: int = 0,
                     title: str | None = None, panel_px: int = 92) -> go.Figure:
    """Every head's joint embedding, small: a grid of layers (rows) x heads (columns).

    Args:
        query_xy, key_xy: float ``[L, H, n, 2]``.
        selected: (layer, head) outlined in red.
        agreement: float ``[L, H]`` shown in each panel's hover (the share of queries nearest their top key).
        max_points: tokens drawn per panel (the same random subset in every panel).

    Returns:
        One figure; each panel's points carry ``customdata`` [layer, head] (:func:`clicked_panel`).
    """
    qxy, kxy = np.asarray(query_xy, np.float32), np.asarray(key_xy, np.float32)
    n_layers, n_heads, n = qxy.shape[:3]
    pick = np.sort(np.random.default_rng(seed).choice(n, min(n, max_points), replace=False))
    gap = 0.012
    w = (1 - gap * (n_heads - 1)) / n_heads
    h = (1 - gap * (n_layers - 1)) / n_layers
    traces: list[dict] = []
    layout: dict = {}
    shapes = []
    for layer in range(n_layers):
        for head in range(n_heads):
            i = layer * n_heads + head + 1
            ax = "" if i == 1 else str(i)
            x0 = head * (w + gap)
            y1 = 1 - layer * (h + gap)
            layout[f"xaxis{ax}"] = dict(domain=[x0, x0 + w], visible=False, anchor=f"y{ax}")
            layout[f"yaxis{ax}"] = dict(domain=[y1 - h, y1], visible=False, anchor=f"x{ax}")
            agree = "" if agreement is None else f"<br>nearest key = top key for {agreement[layer, head]:.0%} of queries"
            cd = np.tile([layer, head], (len(pick), 1))
            for xy, colour in ((qxy, QUERY_COLOUR), (kxy, KEY_COLOUR)):
                traces.append(dict(type="scattergl", x=xy[layer, head, pick, 0], y=xy[layer, head, pick, 1],
                                   xaxis=f"x{ax}", yaxis=f"y{ax}", mode="markers", showlegend=False,
                                   customdata=cd, hovertemplate=f"L{layer} H{head}{agree}<extra></extra>",
                                   marker=dict(size=3, color=colour, opacity=0.6)))
            if selected is not None and (layer, head) == tuple(selected):
                shapes.append(dict(type="rect", xref="paper", yref="paper", x0=x0 - gap / 3, x1=x0 + w + gap / 3,
                                   y0=y1 - h - gap / 3, y1=y1 + gap / 3, line=dict(color="#d62728", width=2)))
    annotations = [dict(text=f"H{head}", x=head * (w + gap) + w / 2, y=1.0, xref="paper", yref="paper",
                        yanchor="bottom", showarrow=False, font=dict(size=10)) for head in range(n_heads)]
    annotations += [dict(text=f"L{layer}", x=-0.005, y=1 - layer * (h + gap) - h / 2, xref="paper", yref="paper",
                         xanchor="right", showarrow=False, font=dict(size=10)) for layer in range(n_layers)]
    layout.update(shapes=shapes, annotations=annotations, clickmode="event", hovermode="closest")
    return make_figure(traces, layout, title=title, height=max(220, panel_px * n_layers + 70),
                       margin=dict(l=36, r=10, t=60 if title else 24, b=10))


def qk_trace_groups(colour_by: str, in_mask: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
    """The point traces of :func:`fig_qk_scatter` in order: (role 0 = queries / 1 = keys, token indices,
    mask value or 0). A click names its trace and point; this maps it back to a token."""
    in_mask = np.asarray(in_mask)
    if colour_by != "mask":
        idx = np.arange(len(in_mask))
        return [(0, idx, 0), (1, idx, 0)]
    out = []
    for value in (1, 0, -1):
        idx = np.flatnonzero(in_mask == value)
        if len(idx):
            out += [(0, idx, value), (1, idx, value)]
    return out


def clicked_token(click: object, colour_by: str, in_mask: np.ndarray) -> int | None:
    """The token index (into the embedding's arrays) of a click on :func:`fig_qk_scatter`, or None (also
    for the highlight trace). Read from the trace and point numbers, which every plotly trace type reports."""
    try:
        p = click["points"][0]  # type: ignore[index]
        curve, i = int(p["curveNumber"]), int(p.get("pointIndex", p.get("pointNumber")))
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    groups = qk_trace_groups(colour_by, in_mask)
    if not 0 <= curve < len(groups) or not 0 <= i < len(groups[curve][1]):
        return None
    return int(groups[curve][1][i])


def clicked_panel(click: object, n_heads: int) -> tuple[int, int] | None:
    """(layer, head) of a clicked panel of :func:`fig_qk_multiples` (two traces per head, in head order)."""
    try:
        curve = int(click["points"][0]["curveNumber"])  # type: ignore[index]
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return divmod(curve // 2, n_heads) if curve >= 0 else None
