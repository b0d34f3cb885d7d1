"""Figures of spatial attention profiles (see :mod:`attnviz.analysis.spatial` for the definitions).

Pure functions: arrays in, ``go.Figure`` out, each built in one constructor call from plain
dicts (:func:`attnviz.figures.make_figure`: plotly validates every later ``update_*`` call,
which would cost more than the data). Figures that show heads as points carry
``customdata = [layer, head]`` on every point so that a click (``clickData["points"][0]["customdata"]``)
selects the head; :func:`clicked_head` reads it back. customdata is given as nested lists, not a
numpy array: plotly serialises numpy arrays as typed arrays, and plotly.js leaves those out of
click events.

The report views of the spatial analysis are registered at the bottom (they read the cached
analysis; a recording without it is skipped).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import HEAT_SCALE, make_figure

__all__ = [
    "SHARE_COLOURS",
    "fig_layer_trend",
    "fig_distance_trend",
    "fig_local_share_trend",
    "fig_offset_profile",
    "fig_query_distance_map",
    "fig_radial_profiles",
    "fig_shares",
    "fig_image_vs_mean",
    "clicked_head",
]

SELECTED_COLOUR = "#e4572e"
SHARE_NAMES = ("prefix", "self", "local", "rest")
SHARE_COLOURS = {"prefix": "#8c8c8c", "self": "#e4572e", "local": "#f3a712", "rest": "#3b6fb6"}
_SHARE_LABELS = {"prefix": "prefix (CLS/registers)", "self": "self", "local": "3x3 neighbours",
                 "rest": "farther patches"}


def _head_jitter(n_heads: int, width: float = 0.5) -> np.ndarray:
    """Horizontal offsets that spread the heads of one layer side by side (deterministic)."""
    if n_heads == 1:
        return np.zeros(1)
    return np.linspace(-width / 2, width / 2, n_heads)


def fig_layer_trend(values: np.ndarray, *, metric: str, units: str = "", selected: tuple[int, int] | None = None,
                    reference: float | None = None, reference_label: str = "", title: str | None = None,
                    y_range: tuple[float, float] | None = None, height: int | None = None,
                    width: int | None = None) -> go.Figure:
    """The ViT-paper trend view: every head a dot at (layer, value) (Dosovitskiy et al. 2021, Fig. 7).

    Args:
        values: float ``[n_layers, n_heads]``; NaN heads are left out.
        metric: axis title, e.g. "mean attention distance".
        units: appended to the axis title and hover ("px").
        selected: (layer, head) drawn highlighted, or None.
        reference: a horizontal reference line (e.g. the distance of uniform attention), or None.
        y_range: fixed y-axis range, or None (from 0).

    Returns:
        Trace 0: the heads (x = layer plus a small per-head offset, y = value, ``customdata`` =
        [layer, head], marker colour = head index); trace 1: the per-layer mean (line); trace 2 (when
        ``selected``): the selected head. The reference line is ``layout.shapes[0]``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {v.shape}")
    n_layers, n_heads = v.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    keep = np.isfinite(v).ravel()
    jitter = _head_jitter(n_heads)
    suffix = f" {units}" if units else ""
    data: list[dict] = [dict(
        type="scatter", x=(layer + jitter[None, :]).ravel()[keep].tolist(), y=v.ravel()[keep].tolist(),
        mode="markers", customdata=np.stack([layer.ravel(), head.ravel()], -1)[keep].tolist(), name="heads",
        marker=dict(size=8, color=head.ravel()[keep].tolist(), colorscale="Turbo", cmin=0, cmax=max(n_heads - 1, 1),
                    line=dict(width=0.5, color="#333"),
                    colorbar=dict(title=dict(text="head", side="right"), thickness=10,
                                  dtick=1 if n_heads <= 16 else None)),
        hovertemplate=(f"layer %{{customdata[0]}}, head %{{customdata[1]}}<br>{metric}: %{{y:.4g}}{suffix}"
                       "<extra></extra>"),
    )]
    with np.errstate(all="ignore"):
        layer_mean = [float(np.nanmean(r)) if np.isfinite(r).any() else None for r in v]
    data.append(dict(type="scatter", x=list(range(n_layers)), y=layer_mean, mode="lines", name="layer mean",
                     line=dict(color="#555", width=1.5, dash="dot"), hoverinfo="skip"))
    if selected is not None and 0 <= selected[0] < n_layers and 0 <= selected[1] < n_heads \
            and np.isfinite(v[selected]):
        sl, sh = int(selected[0]), int(selected[1])
        data.append(dict(
            type="scatter", x=[sl + float(jitter[sh])], y=[float(v[sl, sh])], mode="markers", customdata=[[sl, sh]],
            name=f"layer {sl}, head {sh}", showlegend=False,
            marker=dict(size=16, symbol="circle-open", color=SELECTED_COLOUR, line=dict(width=3)),
            hovertemplate=f"selected: layer {sl}, head {sh}<br>{metric}: %{{y:.4g}}{suffix}<extra></extra>",
        ))
    shapes, notes = [], []
    if reference is not None and np.isfinite(reference):
        shapes.append(dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=float(reference), y1=float(reference),
                           line=dict(color="#999", dash="dash", width=1)))
        if reference_label:
            notes.append(dict(text=reference_label, xref="paper", x=0, xanchor="left", yref="y", y=float(reference),
                              yanchor="bottom", showarrow=False, font=dict(size=11, color="#777")))
    layout = dict(
        xaxis=dict(title=dict(text="layer"), tickmode="linear" if n_layers <= 32 else "auto",
                   dtick=1 if n_layers <= 32 else None, range=[-0.6, n_layers - 0.4], zeroline=False),
        yaxis=dict(title=dict(text=metric + (f" ({units})" if units else "")),
                   **(dict(range=list(y_range)) if y_range is not None else dict(rangemode="tozero"))),
        shapes=shapes, annotations=notes, showlegend=False, clickmode="event", hovermode="closest",
    )
    return make_figure(data, layout, title=title, height=height or 360, width=width)


def fig_distance_trend(mean_distance: np.ndarray, *, uniform: float | None = None,
                       selected: tuple[int, int] | None = None, renormalised: bool = False,
                       title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Layer vs mean attention distance (px), each head a dot; ``uniform`` draws the distance of
    attention spread uniformly over the patches. ``mean_distance``: float ``[n_layers, n_heads]``."""
    metric = "mean attention distance" + (" (patches only)" if renormalised else "")
    return fig_layer_trend(mean_distance, metric=metric, units="px", selected=selected, reference=uniform,
                           reference_label="uniform attention" if uniform is not None else "",
                           title=title, height=height, width=width)


def fig_local_share_trend(local_share: np.ndarray, *, selected: tuple[int, int] | None = None,
                          title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Layer vs local share (attention to the 3x3 neighbourhood without self), each head a dot.
    ``local_share``: float ``[n_layers, n_heads]``."""
    v = np.asarray(local_share, dtype=np.float64)
    top = float(np.nanmax(v)) if np.isfinite(v).any() else 1.0
    return fig_layer_trend(v, metric="local share (3x3 neighbours)", selected=selected, title=title,
                           y_range=(0.0, max(1e-6, top) * 1.08), height=height, width=width)


def fig_offset_profile(profile: np.ndarray, *, title: str | None = None, hide_self: bool = False,
                       colorscale: str = HEAT_SCALE, height: int | None = None, width: int | None = None) -> go.Figure:
    """Heatmap of a head's relative-offset profile, centred on the query, axes in patches.

    Args:
        profile: float ``[2*gh-1, 2*gw-1]``; cell (dy + gh - 1, dx + gw - 1) = mean attention from a
            query to the key at offset (dy, dx) (dy down, dx right, as in the image).
        hide_self: draw the centre (the query itself) empty, so that a strong self weight does not
            wash out the colours of the neighbours.

    Returns:
        Trace 0 is the heatmap (x = dx, y = dy, z = ``profile``, centre NaN when hidden); trace 1
        marks the query (0, 0).
    """
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0:
        raise ValueError(f"an offset profile is [2*gh-1, 2*gw-1] (odd sides), got shape {p.shape}")
    ch, cw = p.shape[0] // 2, p.shape[1] // 2
    z = p.copy()
    if hide_self:
        z[ch, cw] = np.nan
    data = [
        dict(type="heatmap", z=_nan_to_none(z), x=list(range(-cw, cw + 1)), y=list(range(-ch, ch + 1)),
             colorscale=colorscale, zmin=0, colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
             hovertemplate="offset dy=%{y}, dx=%{x} patches<br>mean attention: %{z:.4g}<extra></extra>"),
        dict(type="scatter", x=[0], y=[0], mode="markers", hoverinfo="skip", showlegend=False,
             marker=dict(symbol="x-thin-open", size=10, color="white", line=dict(width=2))),
    ]
    layout = dict(
        xaxis=dict(title=dict(text="key offset dx (patches)"), zeroline=False, showgrid=False, constrain="domain"),
        yaxis=dict(title=dict(text="key offset dy (patches)"), autorange="reversed", zeroline=False, showgrid=False,
                   scaleanchor="x", scaleratio=1, constrain="domain"),
    )
    return make_figure(data, layout, title=title, height=height or 380, width=width)


def fig_query_distance_map(distance: np.ndarray, *, title: str | None = None, units: str = "px",
                           height: int | None = None, width: int | None = None) -> go.Figure:
    """Mean attention distance per query position (``gh x gw`` heatmap over the patch grid).

    Args:
        distance: float ``[gh, gw]``; cell (y, x) = mean attention distance of the query patch at (y, x).

    Returns:
        Trace 0: heatmap with x = patch column, y = patch row (row 0 at the top).
    """
    d = np.asarray(distance, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"distance must be [gh, gw], got shape {d.shape}")
    data = [dict(type="heatmap", z=_nan_to_none(d), x=list(range(d.shape[1])), y=list(range(d.shape[0])),
                 colorscale=HEAT_SCALE, colorbar=dict(title=dict(text=units, side="right"), thickness=12),
                 hovertemplate=(f"query patch row %{{y}}, column %{{x}}<br>mean distance: %{{z:.4g}} {units}"
                                "<extra></extra>"))]
    layout = dict(
        xaxis=dict(title=dict(text="query patch column"), showgrid=False, zeroline=False, constrain="domain"),
        yaxis=dict(title=dict(text="query patch row"), autorange="reversed", showgrid=False, zeroline=False,
                   scaleanchor="x", scaleratio=1, constrain="domain"),
    )
    return make_figure(data, layout, title=title, height=height or 380, width=width)


def fig_radial_profiles(radius: np.ndarray, values: np.ndarray, *, layer: int, metric: str = "chebyshev",
                        quantity: str = "strength", selected_head: int | None = None, log_y: bool = False,
                        title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Radial profile lines, one per head of one layer.

    Args:
        radius: int ``[R]`` ring radius in patches.
        values: float ``[n_heads, R]``: per ring, the mean weight per query-key pair ("strength") or
            the share of a query's attention in the ring ("mass").
        layer: the layer shown (``customdata`` and title).
        metric: "chebyshev" or "euclidean" (axis title).
        selected_head: drawn thicker, or None.

    Returns:
        Trace h = head h (x = radius, y = values[h], ``customdata`` = [layer, h] on every point).
    """
    r = [int(x) for x in np.asarray(radius)]
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(r):
        raise ValueError(f"values must be [n_heads, {len(r)}], got shape {v.shape}")
    n_heads = v.shape[0]
    palette = _palette(n_heads)
    data = []
    for h in range(n_heads):
        sel = selected_head == h
        data.append(dict(
            type="scatter", x=r, y=_nan_to_none(v[h]), mode="lines+markers", name=f"head {h}",
            customdata=[[int(layer), h]] * len(r),
            line=dict(width=4 if sel else 1.5, color=SELECTED_COLOUR if sel else palette[h]),
            marker=dict(size=7 if sel else 4), opacity=1.0 if (selected_head is None or sel) else 0.75,
            hovertemplate=f"layer {layer}, head {h}<br>ring %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    ring = "Chebyshev" if metric == "chebyshev" else "Euclidean"
    ytitle = "mean attention per query-key pair" if quantity == "strength" else "share of attention in ring"
    layout = dict(
        xaxis=dict(title=dict(text=f"{ring} distance ring (patches)"), tickmode="linear",
                   dtick=1 if len(r) <= 30 else None),
        yaxis=dict(title=dict(text=ytitle), type="log" if log_y else "linear"),
        clickmode="event", hovermode="closest",
    )
    return make_figure(data, layout, title=title if title is not None else f"Layer {layer}: attention by distance",
                       height=height or 360, width=width)


def fig_shares(shares: np.ndarray, *, layer: int, selected_head: int | None = None, title: str | None = None,
               height: int | None = None, width: int | None = None) -> go.Figure:
    """Stacked bars per head: shares of attention to prefix tokens, self, 3x3 neighbours, the rest.

    Args:
        shares: float ``[n_heads, 4]`` in the order (prefix, self, local, rest).
        layer: the layer shown; selected_head: outlined.

    Returns:
        Four bar traces in that order (x = head, y = share, ``customdata`` = [layer, head]),
        ``barmode="stack"``.
    """
    s = np.asarray(shares, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 4:
        raise ValueError(f"shares must be [n_heads, 4], got shape {s.shape}")
    n_heads = s.shape[0]
    heads = list(range(n_heads))
    custom = [[int(layer), h] for h in heads]
    data = [dict(type="bar", x=heads, y=s[:, i].tolist(), name=_SHARE_LABELS[name], marker_color=SHARE_COLOURS[name],
                 customdata=custom,
                 hovertemplate=(f"layer {layer}, head %{{x}}<br>{_SHARE_LABELS[name]}: %{{y:.3f}}"
                                "<extra></extra>"))
            for i, name in enumerate(SHARE_NAMES)]
    shapes = []
    if selected_head is not None and 0 <= selected_head < n_heads:
        shapes.append(dict(type="rect", xref="x", x0=selected_head - 0.5, x1=selected_head + 0.5, yref="paper",
                           y0=0, y1=1, line=dict(color=SELECTED_COLOUR, width=2), fillcolor="rgba(0,0,0,0)",
                           layer="above"))
    layout = dict(
        xaxis=dict(title=dict(text="head"), tickmode="array", tickvals=heads,
                   ticktext=[f"<b>{h}</b>" if h == selected_head else str(h) for h in heads]),
        yaxis=dict(title=dict(text="share of a patch query's attention"), range=[0, 1.02]),
        barmode="stack", bargap=0.15, clickmode="event", shapes=shapes,
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
    )
    return make_figure(data, layout, title=title if title is not None else f"Layer {layer}: where the attention goes",
                       height=height or 360, width=width)


def fig_image_vs_mean(image_values: np.ndarray, mean_values: np.ndarray, *, metric: str, units: str = "",
                      image_label: str = "this image", selected: tuple[int, int] | None = None,
                      title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """One image against the average over images, every head a dot (on the diagonal = typical).

    Args:
        image_values: float ``[n_layers, n_heads]`` for one image.
        mean_values: float ``[n_layers, n_heads]`` averaged over images.
        image_label: y-axis title (e.g. "image 3").

    Returns:
        Trace 0: heads (x = mean, y = image, colour = layer, ``customdata`` = [layer, head]); trace 1:
        the diagonal y = x; trace 2 (when ``selected``): the selected head.
    """
    a = np.asarray(image_values, dtype=np.float64)
    m = np.asarray(mean_values, dtype=np.float64)
    if a.shape != m.shape or a.ndim != 2:
        raise ValueError(f"image and mean values must both be [n_layers, n_heads], got {a.shape} and {m.shape}")
    n_layers, n_heads = a.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    keep = (np.isfinite(a) & np.isfinite(m)).ravel()
    suffix = f" {units}" if units else ""
    data: list[dict] = [dict(
        type="scatter", x=m.ravel()[keep].tolist(), y=a.ravel()[keep].tolist(), mode="markers", name="heads",
        customdata=np.stack([layer.ravel(), head.ravel()], -1)[keep].tolist(),
        marker=dict(size=7, color=layer.ravel()[keep].tolist(), colorscale="Viridis", cmin=0,
                    cmax=max(n_layers - 1, 1), line=dict(width=0.5, color="#333"),
                    colorbar=dict(title=dict(text="layer", side="right"), thickness=10,
                                  dtick=1 if n_layers <= 16 else None)),
        hovertemplate=(f"layer %{{customdata[0]}}, head %{{customdata[1]}}<br>mean over images: %{{x:.4g}}{suffix}"
                       f"<br>{image_label}: %{{y:.4g}}{suffix}<extra></extra>"),
    )]
    both = np.concatenate([a.ravel()[keep], m.ravel()[keep]])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    data.append(dict(type="scatter", x=[lo, hi], y=[lo, hi], mode="lines", hoverinfo="skip", showlegend=False,
                     line=dict(color="#999", dash="dash", width=1)))
    if selected is not None and 0 <= selected[0] < n_layers and 0 <= selected[1] < n_heads \
            and np.isfinite(a[selected]) and np.isfinite(m[selected]):
        data.append(dict(type="scatter", x=[float(m[selected])], y=[float(a[selected])], mode="markers",
                         customdata=[[int(selected[0]), int(selected[1])]], showlegend=False, hoverinfo="skip",
                         marker=dict(size=16, symbol="circle-open", color=SELECTED_COLOUR, line=dict(width=3))))
    layout = dict(
        xaxis=dict(title=dict(text=f"{metric}, mean over images" + (f" ({units})" if units else ""))),
        yaxis=dict(title=dict(text=f"{metric}, {image_label}" + (f" ({units})" if units else ""))),
        showlegend=False, clickmode="event", hovermode="closest",
    )
    return make_figure(data, layout, title=title, height=height or 360, width=width)


def clicked_head(click: Any) -> tuple[int, int] | None:
    """(layer, head) from the ``clickData`` of any figure here, or None when it carries none."""
    try:
        layer, head = click["points"][0]["customdata"][:2]
        return int(layer), int(head)
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def _nan_to_none(a: np.ndarray) -> list:
    """Nested lists with NaN as None (a gap in plotly), so the figure is built from plain values."""
    a = np.asarray(a, dtype=np.float64)
    if np.isfinite(a).all():
        return a.tolist()
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3 + pc.qualitative.Set2
    if n <= len(base):
        return list(base[:n])
    return pc.sample_colorscale("Turbo", [i / max(n - 1, 1) for i in range(n)])
