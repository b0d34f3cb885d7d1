"""Figures of spatial attention profiles (see :mod:`attnviz.analysis.spatial` for the definitions).

Pure functions: arrays in, ``go.Figure`` out. Figures that show heads as points carry
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

from attnviz.figures import HEAT_SCALE, base_layout

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
                    height: int | None = None, width: int | None = None) -> go.Figure:
    """The ViT-paper trend view: every head a dot at (layer, value) (Dosovitskiy et al. 2021, Fig. 7).

    Args:
        values: float ``[n_layers, n_heads]``; NaN heads are left out.
        metric: axis title, e.g. "mean attention distance".
        units: appended to the axis title and hover ("px").
        selected: (layer, head) drawn highlighted, or None.
        reference: a horizontal reference line (e.g. the distance of uniform attention), or None.

    Returns:
        Trace 0: the heads (x = layer plus a small per-head offset, y = value, ``customdata`` =
        [layer, head], marker colour = head index); trace 1: the per-layer mean (line); trace 2 (when
        ``selected``): the selected head.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {v.shape}")
    n_layers, n_heads = v.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    keep = np.isfinite(v).ravel()
    x = (layer + _head_jitter(n_heads)[None, :]).ravel()[keep]
    custom = np.stack([layer.ravel(), head.ravel()], -1)[keep]
    suffix = f" {units}" if units else ""
    fig = go.Figure(go.Scatter(
        x=x, y=v.ravel()[keep], mode="markers", customdata=custom.tolist(), name="heads",
        marker=dict(size=8, color=head.ravel()[keep], colorscale="Turbo", cmin=0, cmax=max(n_heads - 1, 1),
                    line=dict(width=0.5, color="#333"),
                    colorbar=dict(title=dict(text="head", side="right"), thickness=10,
                                  dtick=1 if n_heads <= 16 else None)),
        hovertemplate=(f"layer %{{customdata[0]}}, head %{{customdata[1]}}<br>{metric}: %{{y:.4g}}{suffix}"
                       "<extra></extra>"),
    ))
    with np.errstate(all="ignore"):
        layer_mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in v])
    fig.add_trace(go.Scatter(x=np.arange(n_layers), y=layer_mean, mode="lines", name="layer mean",
                             line=dict(color="#555", width=1.5, dash="dot"), hoverinfo="skip"))
    if selected is not None and 0 <= selected[0] < n_layers and 0 <= selected[1] < n_heads \
            and np.isfinite(v[selected]):
        sl, sh = selected
        fig.add_trace(go.Scatter(
            x=[sl + _head_jitter(n_heads)[sh]], y=[v[sl, sh]], mode="markers", customdata=[[int(sl), int(sh)]],
            name=f"layer {sl}, head {sh}", showlegend=False,
            marker=dict(size=16, symbol="circle-open", color=SELECTED_COLOUR, line=dict(width=3)),
            hovertemplate=f"selected: layer {sl}, head {sh}<br>{metric}: %{{y:.4g}}{suffix}<extra></extra>",
        ))
    if reference is not None and np.isfinite(reference):
        fig.add_hline(y=reference, line=dict(color="#999", dash="dash", width=1),
                      annotation_text=reference_label, annotation_position="top left")
    fig.update_xaxes(title="layer", tickmode="linear" if n_layers <= 32 else "auto",
                     dtick=1 if n_layers <= 32 else None,
                     range=[-0.6, n_layers - 0.4], zeroline=False)
    fig.update_yaxes(title=metric + (f" ({units})" if units else ""), rangemode="tozero")
    base_layout(fig, title=title, height=height or 360, width=width)
    fig.update_layout(showlegend=False, clickmode="event", hovermode="closest")
    return fig


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
    fig = fig_layer_trend(local_share, metric="local share (3x3 neighbours)", selected=selected, title=title,
                          height=height, width=width)
    top = float(np.nanmax(local_share)) if np.isfinite(local_share).any() else 1.0
    fig.update_yaxes(range=[0, max(1e-6, top) * 1.08])
    return fig


def fig_offset_profile(profile: np.ndarray, *, title: str | None = None, hide_self: bool = False,
                       colorscale: str = HEAT_SCALE, height: int | None = None, width: int | None = None) -> go.Figure:
    """Heatmap of a head's relative-offset profile, centred on the query, axes in patches.

    Args:
        profile: float ``[2*gh-1, 2*gw-1]``; cell (dy + gh - 1, dx + gw - 1) = mean attention from a
            query to the key at offset (dy, dx) (dy down, dx right, as in the image).
        hide_self: draw the centre (the query itself) empty, so that a strong self weight does not
            wash out the colours of the neighbours.

    Returns:
        Trace 0 is the ``go.Heatmap`` (x = dx, y = dy, z = ``profile``, centre NaN when hidden);
        trace 1 marks the query (0, 0).
    """
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0:
        raise ValueError(f"an offset profile is [2*gh-1, 2*gw-1] (odd sides), got shape {p.shape}")
    ch, cw = p.shape[0] // 2, p.shape[1] // 2
    z = p.copy()
    if hide_self:
        z[ch, cw] = np.nan
    dx = np.arange(-cw, cw + 1)
    dy = np.arange(-ch, ch + 1)
    fig = go.Figure(go.Heatmap(
        z=z, x=dx, y=dy, colorscale=colorscale, zmin=0,
        colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
        hovertemplate="offset dy=%{y}, dx=%{x} patches<br>mean attention: %{z:.4g}<extra></extra>",
    ))
    fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", hoverinfo="skip", showlegend=False,
                             marker=dict(symbol="x-thin-open", size=10, color="white", line=dict(width=2))))
    fig.update_xaxes(title="key offset dx (patches)", zeroline=False, showgrid=False, constrain="domain")
    fig.update_yaxes(title="key offset dy (patches)", autorange="reversed", zeroline=False, showgrid=False,
                     scaleanchor="x", scaleratio=1, constrain="domain")
    return base_layout(fig, title=title, height=height or 380, width=width)


def fig_query_distance_map(distance: np.ndarray, *, title: str | None = None, units: str = "px",
                           height: int | None = None, width: int | None = None) -> go.Figure:
    """Mean attention distance per query position (``gh x gw`` heatmap over the patch grid).

    Args:
        distance: float ``[gh, gw]``; cell (y, x) = mean attention distance of the query patch at (y, x).

    Returns:
        Trace 0: ``go.Heatmap`` with x = patch column, y = patch row (row 0 at the top).
    """
    d = np.asarray(distance, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"distance must be [gh, gw], got shape {d.shape}")
    fig = go.Figure(go.Heatmap(
        z=d, x=np.arange(d.shape[1]), y=np.arange(d.shape[0]), colorscale=HEAT_SCALE,
        colorbar=dict(title=dict(text=units, side="right"), thickness=12),
        hovertemplate=f"query patch row %{{y}}, column %{{x}}<br>mean distance: %{{z:.4g}} {units}<extra></extra>",
    ))
    fig.update_xaxes(title="query patch column", showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(title="query patch row", autorange="reversed", showgrid=False, zeroline=False,
                     scaleanchor="x", scaleratio=1, constrain="domain")
    return base_layout(fig, title=title, height=height or 380, width=width)


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
    r = np.asarray(radius)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(r):
        raise ValueError(f"values must be [n_heads, {len(r)}], got shape {v.shape}")
    n_heads = v.shape[0]
    palette = _palette(n_heads)
    fig = go.Figure()
    for h in range(n_heads):
        sel = selected_head == h
        fig.add_trace(go.Scatter(
            x=r, y=v[h], mode="lines+markers", name=f"head {h}", customdata=[[int(layer), h]] * len(r),
            line=dict(width=4 if sel else 1.5, color=SELECTED_COLOUR if sel else palette[h]),
            marker=dict(size=7 if sel else 4), opacity=1.0 if (selected_head is None or sel) else 0.75,
            hovertemplate=f"layer {layer}, head {h}<br>ring %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    ring = "Chebyshev" if metric == "chebyshev" else "Euclidean"
    fig.update_xaxes(title=f"{ring} distance ring (patches)", tickmode="linear", dtick=1 if len(r) <= 30 else None)
    ytitle = "mean attention per query-key pair" if quantity == "strength" else "share of attention in ring"
    fig.update_yaxes(title=ytitle, type="log" if log_y else "linear")
    base_layout(fig, title=title if title is not None else f"Layer {layer}: attention by distance",
                height=height or 360, width=width)
    fig.update_layout(clickmode="event", hovermode="closest")
    return fig


def fig_shares(shares: np.ndarray, *, layer: int, selected_head: int | None = None, title: str | None = None,
               height: int | None = None, width: int | None = None) -> go.Figure:
    """Stacked bars per head: shares of attention to prefix tokens, self, 3x3 neighbours, the rest.

    Args:
        shares: float ``[n_heads, 4]`` in the order (prefix, self, local, rest).
        layer: the layer shown; selected_head: its tick is marked.

    Returns:
        Four ``go.Bar`` traces in that order (x = head, y = share, ``customdata`` = [layer, head]),
        ``barmode="stack"``.
    """
    s = np.asarray(shares, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 4:
        raise ValueError(f"shares must be [n_heads, 4], got shape {s.shape}")
    n_heads = s.shape[0]
    heads = np.arange(n_heads)
    custom = np.stack([np.full(n_heads, layer), heads], -1)
    fig = go.Figure()
    for i, name in enumerate(SHARE_NAMES):
        fig.add_trace(go.Bar(x=heads, y=s[:, i], name=_SHARE_LABELS[name], marker_color=SHARE_COLOURS[name],
                             customdata=custom.tolist(),
                             hovertemplate=(f"layer {layer}, head %{{x}}<br>{_SHARE_LABELS[name]}: %{{y:.3f}}"
                                            "<extra></extra>")))
    ticks = [f"<b>{h}</b>" if h == selected_head else str(h) for h in heads]
    fig.update_xaxes(title="head", tickmode="array", tickvals=heads, ticktext=ticks)
    fig.update_yaxes(title="share of a patch query's attention", range=[0, 1.02])
    base_layout(fig, title=title if title is not None else f"Layer {layer}: where the attention goes",
                height=height or 360, width=width)
    fig.update_layout(barmode="stack", bargap=0.15, clickmode="event",
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    if selected_head is not None and 0 <= selected_head < n_heads:
        fig.add_vrect(x0=selected_head - 0.5, x1=selected_head + 0.5, line=dict(color=SELECTED_COLOUR, width=2),
                      fillcolor="rgba(0,0,0,0)", layer="above")
    return fig


def fig_image_vs_mean(image_values: np.ndarray, mean_values: np.ndarray, *, metric: str, units: str = "",
                      image_label: str = "this image", selected: tuple[int, int] | None = None,
                      title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """One image against the average over images, every head a dot (on the diagonal = typical).

    Args:
        image_values: float ``[n_layers, n_heads]`` for one image.
        mean_values: float ``[n_layers, n_heads]`` averaged over images.
        image_label: y-axis title (e.g. "image 3 (cat_01.png)").

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
    fig = go.Figure(go.Scatter(
        x=m.ravel()[keep], y=a.ravel()[keep], mode="markers", name="heads",
        customdata=np.stack([layer.ravel(), head.ravel()], -1)[keep].tolist(),
        marker=dict(size=7, color=layer.ravel()[keep], colorscale="Viridis", cmin=0, cmax=max(n_layers - 1, 1),
                    colorbar=dict(title=dict(text="layer", side="right"), thickness=10,
                                  dtick=1 if n_layers <= 16 else None), line=dict(width=0.5, color="#333")),
        hovertemplate=(f"layer %{{customdata[0]}}, head %{{customdata[1]}}<br>mean over images: %{{x:.4g}}{suffix}"
                       f"<br>{image_label}: %{{y:.4g}}{suffix}<extra></extra>"),
    ))
    both = np.concatenate([a.ravel()[keep], m.ravel()[keep]])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", hoverinfo="skip", showlegend=False,
                             line=dict(color="#999", dash="dash", width=1)))
    if selected is not None and 0 <= selected[0] < n_layers and 0 <= selected[1] < n_heads \
            and np.isfinite(a[selected]) and np.isfinite(m[selected]):
        fig.add_trace(go.Scatter(x=[m[selected]], y=[a[selected]], mode="markers",
                                 customdata=[[int(selected[0]), int(selected[1])]],
                                 showlegend=False, hoverinfo="skip",
                                 marker=dict(size=16, symbol="circle-open", color=SELECTED_COLOUR, line=dict(width=3))))
    fig.update_xaxes(title=f"{metric}, mean over images" + (f" ({units})" if units else ""))
    fig.update_yaxes(title=f"{metric}, {image_label}" + (f" ({units})" if units else ""))
    base_layout(fig, title=title, height=height or 360, width=width)
    fig.update_layout(showlegend=False, clickmode="event", hovermode="closest")
    return fig


def clicked_head(click: Any) -> tuple[int, int] | None:
    """(layer, head) from the ``clickData`` of any figure here, or None when it carries none."""
    try:
        layer, head = click["points"][0]["customdata"][:2]
        return int(layer), int(head)
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3 + pc.qualitative.Set2
    if n <= len(base):
        return list(base[:n])
    return pc.sample_colorscale("Turbo", [i / max(n - 1, 1) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# report views (`attnviz report`): read the cached analysis; skipped when it is absent


def _register_report_views() -> None:
    from attnviz.report import register_view

    def cached(rec):  # noqa: ANN001, ANN202
        from attnviz.analysis.spatial import load_spatial

        return load_spatial(rec)

    @register_view("spatial_trend", "Spatial profiles: mean attention distance and local share across layers",
                   order=40)
    def _trend(rec, sample):  # noqa: ANN001, ANN202
        prof = cached(rec)
        if prof is None:
            return None
        kind = "" if prof.kind == rec.main_kind else f" ({prof.kind})"
        return [("distance", fig_distance_trend(prof.mean_distance, uniform=prof.uniform_mean_distance,
                                                title=f"Mean attention distance{kind}")),
                ("distance_patches", fig_distance_trend(prof.mean_distance_patches, renormalised=True,
                                                        uniform=prof.uniform_mean_distance,
                                                        title=f"Mean attention distance, patches only{kind}")),
                ("local_share", fig_local_share_trend(prof.local_share, title=f"Local share{kind}"))]

    @register_view("spatial_layers", "Spatial profiles per layer: radial profiles and shares", order=41)
    def _layers(rec, sample):  # noqa: ANN001, ANN202
        prof = cached(rec)
        if prof is None:
            return None
        rad = prof.radial("chebyshev")
        out: list[tuple[str, go.Figure]] = []
        for layer in range(prof.n_layers):
            out.append((f"radial_layer{layer}", fig_radial_profiles(rad.radius, rad.strength[layer], layer=layer)))
            out.append((f"shares_layer{layer}", fig_shares(prof.shares[layer], layer=layer)))
        return out

    @register_view("spatial_image", "Spatial profiles: this image against the mean over images", per_sample=True,
                   order=42)
    def _image(rec, sample):  # noqa: ANN001, ANN202
        prof = cached(rec)
        if prof is None or sample is None:
            return None
        rows = np.flatnonzero(np.asarray(prof.samples) == sample)
        if rows.size == 0:
            return None
        label = f"image {sample}"
        return fig_image_vs_mean(prof.image_mean_distance[rows[0]], prof.mean_distance,
                                 metric="mean attention distance", units="px", image_label=label,
                                 title=f"Mean attention distance: {label} vs mean over images")


try:  # the report module is light (no Dash); registering must never break the figures
    _register_report_views()
except ImportError:  # pragma: no cover - a build without attnviz.report
    pass
