"""The attention explorer: one query's attention over the image, all heads of a layer as small
multiples, attributions side by side with the object mask, and the raw token-by-token matrix."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.figures import DIVERGING_SCALE, HEAT_SCALE, base_layout, image_data_uri

__all__ = [
    "fig_query_overlay",
    "fig_head_multiples",
    "fig_attribution_panels",
    "fig_token_matrix",
    "token_labels",
    "cell_of_point",
    "block_mean",
]


def _image_trace(image: np.ndarray, image_size: tuple[int, int], **kw) -> go.Image:
    ih, iw = image.shape[:2]
    h, w = image_size
    dx, dy = w / iw, h / ih
    # x0/y0 are the centre of the first pixel: pixel edges then fall on 0 .. w, 0 .. h
    return go.Image(source=image_data_uri(image), x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip", **kw)


def _grid_lines(grid: tuple[int, int], patch: tuple[int, int]) -> str:
    gh, gw = grid
    ph, pw = patch
    h, w = gh * ph, gw * pw
    parts = [f"M{c * pw},0 L{c * pw},{h}" for c in range(1, gw)] + [f"M0,{r * ph} L{w},{r * ph}" for r in range(1, gh)]
    return " ".join(parts)


def cell_of_point(x: float, y: float, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int] | None:
    """The (row, col) patch containing pixel (x, y), or None outside the grid."""
    gh, gw = grid
    ph, pw = patch
    r, c = int(math.floor(y / ph)), int(math.floor(x / pw))
    return (r, c) if 0 <= r < gh and 0 <= c < gw else None


def fig_query_overlay(image: np.ndarray, heat: np.ndarray, *, patch_size: tuple[int, int],
                      query_cell: tuple[int, int] | None = None, title: str | None = None,
                      zmax: float | None = None, opacity: float = 0.6, colorscale: str = HEAT_SCALE,
                      show_grid: bool = True, colorbar_title: str = "attention", height: int = 460) -> go.Figure:
    """The input image with a patch-grid heat map on top (attention of one query, CLS, ...).

    Args:
        image: uint8 ``[h, w, 3]`` (any resolution; stretched to the model input size).
        heat: float ``[grid_h, grid_w]``: value per patch (e.g. attention of the query to each patch).
        patch_size: (patch_h, patch_w) in model-input pixels.
        query_cell: (row, col) of the query patch to outline, or None.
        zmax: colour scale maximum (default: max of ``heat``).

    Returns:
        trace 0: ``go.Image``; trace 1: ``go.Heatmap`` with ``z`` = ``heat`` (row 0 at the top),
        ``x``/``y`` = patch centres in pixels (clicks give pixel coordinates; see :func:`cell_of_point`).
    """
    heat = np.asarray(heat, dtype=np.float64)
    gh, gw = heat.shape
    ph, pw = patch_size
    size = (gh * ph, gw * pw)
    fig = go.Figure(_image_trace(image, size))
    fig.add_trace(go.Heatmap(
        z=heat, x=(np.arange(gw) + 0.5) * pw, y=(np.arange(gh) + 0.5) * ph, opacity=opacity,
        colorscale=colorscale, zmin=0.0, zmax=float(zmax if zmax is not None else max(heat.max(), 1e-12)),
        colorbar=dict(title=dict(text=colorbar_title, side="right"), thickness=12),
        customdata=np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), axis=-1),
        hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>%{z:.4f}<extra></extra>",
    ))
    if show_grid and gh * gw <= 64 * 64:
        fig.add_shape(type="path", path=_grid_lines((gh, gw), (ph, pw)), line=dict(color="rgba(255,255,255,0.45)", width=1))
    if query_cell is not None:
        r, c = query_cell
        fig.add_shape(type="rect", x0=c * pw, x1=(c + 1) * pw, y0=r * ph, y1=(r + 1) * ph,
                      line=dict(color="#ff2d55", width=3))
    fig.update_xaxes(visible=False, range=[0, size[1]], constrain="domain")
    fig.update_yaxes(visible=False, range=[size[0], 0], scaleanchor="x", constrain="domain")
    base_layout(fig, title=title, height=height)
    fig.update_layout(margin=dict(l=10, r=10, b=10), dragmode=False, clickmode="event", hovermode="closest")
    return fig


def fig_head_multiples(maps: np.ndarray, *, selected_head: int | None = None, cols: int | None = None,
                       title: str | None = None, query_cell: tuple[int, int] | None = None,
                       colorscale: str = HEAT_SCALE, height: int | None = None) -> go.Figure:
    """Small multiples of every head's map for one query, as ONE heatmap trace.

    Args:
        maps: float ``[head, grid_h, grid_w]``.
        selected_head: head to outline.
        cols: heads per row (default ``ceil(sqrt(H))``, at most 8).
        query_cell: (row, col) of the query, marked in every tile.

    Returns:
        trace 0: ``go.Heatmap`` of a mosaic: head ``h`` at tile (h // cols, h % cols), tiles
        separated by one NaN row/column; ``customdata`` gives the head of each cell (-1 in gaps).
        Annotations name the heads. One shared colour scale (0 .. max).
    """
    maps = np.asarray(maps, dtype=np.float64)
    n_heads, gh, gw = maps.shape
    cols = cols or min(8, max(1, math.ceil(math.sqrt(n_heads))))
    rows = math.ceil(n_heads / cols)
    big = np.full((rows * (gh + 1) - 1, cols * (gw + 1) - 1), np.nan)
    owner = np.full(big.shape, -1, dtype=int)
    for h in range(n_heads):
        r, c = divmod(h, cols)
        y, x = r * (gh + 1), c * (gw + 1)
        big[y : y + gh, x : x + gw] = maps[h]
        owner[y : y + gh, x : x + gw] = h
    fig = go.Figure(go.Heatmap(
        z=big, customdata=owner, colorscale=colorscale, zmin=0.0, zmax=float(np.nanmax(maps)) if maps.size else 1.0,
        colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
        hovertemplate="head %{customdata}<br>%{z:.4f}<extra></extra>", hoverongaps=False,
    ))
    for h in range(n_heads):
        r, c = divmod(h, cols)
        fig.add_annotation(x=c * (gw + 1) + (gw - 1) / 2, y=r * (gh + 1) - 0.5, text=f"head {h}", showarrow=False,
                           yshift=8, font=dict(size=11, color="#e4572e" if h == selected_head else "#333"))
        if h == selected_head:
            fig.add_shape(type="rect", x0=c * (gw + 1) - 0.5, x1=c * (gw + 1) + gw - 0.5, y0=r * (gh + 1) - 0.5,
                          y1=r * (gh + 1) + gh - 0.5, line=dict(color="#e4572e", width=3))
        if query_cell is not None:
            qr, qc = query_cell
            fig.add_shape(type="rect", x0=c * (gw + 1) + qc - 0.5, x1=c * (gw + 1) + qc + 0.5,
                          y0=r * (gh + 1) + qr - 0.5, y1=r * (gh + 1) + qr + 0.5, line=dict(color="#ff2d55", width=1.5))
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    base_layout(fig, title=title, height=height or min(700, 140 + rows * 170))
    fig.update_layout(margin=dict(l=10, r=10, b=10, t=60 if title else 30), dragmode=False, clickmode="event",
                      plot_bgcolor="white")
    return fig


def fig_attribution_panels(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], *,
                           image_size: tuple[int, int], mask: np.ndarray | None = None,
                           title: str | None = None, opacity: float = 0.65, height: int = 330) -> go.Figure:
    """The image (with the object mask outlined) beside overlays of rollout and attributions.

    Args:
        image: uint8 ``[h, w, 3]``.
        panels: (name, map) with map float ``[rows, cols]`` at pixel or patch resolution; each is
            shown normalised to its own max |value| (signed maps on a diverging scale).
        image_size: (height, width) of the model input in pixels.
        mask: ``[mh, mw]`` object mask (nonzero = object) or None; outlined on every panel.

    Returns:
        One figure, ``1 + len(panels)`` subplots; per panel the heat trace's ``z`` is the map
        divided by its max |value|.
    """
    h, w = image_size
    n = 1 + len(panels)
    names = ["input" + (" + object mask" if mask is not None else "")] + [name for name, _ in panels]
    fig = make_subplots(rows=1, cols=n, subplot_titles=names, horizontal_spacing=0.02)
    for col in range(1, n + 1):
        fig.add_trace(_image_trace(image, image_size), row=1, col=col)
    for i, (name, arr) in enumerate(panels, start=2):
        a = np.asarray(arr, dtype=np.float64)
        scale = float(np.nanmax(np.abs(a))) if a.size else 0.0
        z = a / scale if scale > 0 else a
        signed = bool((a < 0).any())
        rr, cc = a.shape
        fig.add_trace(go.Heatmap(
            z=z, x=(np.arange(cc) + 0.5) * (w / cc), y=(np.arange(rr) + 0.5) * (h / rr), opacity=opacity,
            colorscale=DIVERGING_SCALE if signed else HEAT_SCALE, zmin=-1.0 if signed else 0.0, zmax=1.0,
            showscale=False, name=name, hovertemplate=f"{name}: %{{z:.3f}} (of max)<extra></extra>",
        ), row=1, col=i)
    if mask is not None:
        m = np.asarray(mask) > 0
        mh, mw = m.shape
        for col in range(1, n + 1):
            fig.add_trace(go.Contour(
                z=m.astype(float), x=(np.arange(mw) + 0.5) * (w / mw), y=(np.arange(mh) + 0.5) * (h / mh),
                contours=dict(start=0.5, end=0.5, size=1, coloring="none"), line=dict(color="#ff2d55", width=2),
                showscale=False, hoverinfo="skip", name="object mask", showlegend=False,
            ), row=1, col=col)
    fig.update_xaxes(visible=False, range=[0, w], constrain="domain")
    for col in range(1, n + 1):
        fig.update_yaxes(visible=False, range=[h, 0], scaleanchor=f"x{'' if col == 1 else col}", constrain="domain",
                         row=1, col=col)
    base_layout(fig, title=title, height=height)
    fig.update_layout(margin=dict(l=10, r=10, b=10, t=70 if title else 40), dragmode=False)
    return fig


def token_labels(n_tokens: int, n_prefix: int, prefix_names: Sequence[str], grid: tuple[int, int] | None) -> list[str]:
    """Readable names of the tokens: prefix names (``cls``), then ``r,c`` patch coordinates."""
    out = []
    for t in range(n_tokens):
        if t < n_prefix:
            out.append(prefix_names[t] if t < len(prefix_names) else f"prefix{t}")
        elif grid is not None:
            r, c = divmod(t - n_prefix, grid[1])
            out.append(f"{r},{c}")
        else:
            out.append(str(t))
    return out


def block_mean(a: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Average ``a`` over square blocks so no side exceeds ``max_side``; returns (array, block)."""
    q, k = a.shape
    b = max(1, math.ceil(max(q, k) / max_side))
    if b == 1:
        return a, 1
    qp, kp = math.ceil(q / b) * b, math.ceil(k / b) * b
    pad = np.full((qp, kp), np.nan)
    pad[:q, :k] = a
    with np.errstate(invalid="ignore"):
        return np.nanmean(pad.reshape(qp // b, b, kp // b, b), axis=(1, 3)), b


def fig_token_matrix(matrix: np.ndarray, *, labels: Sequence[str] | None = None, title: str | None = None,
                     max_side: int = 400, height: int = 640) -> go.Figure:
    """The raw query x key attention matrix of one head (block-averaged beyond ``max_side``).

    Args:
        matrix: float ``[query_pos, key_pos]``.
        labels: token names (used when not block-averaged).

    Returns:
        trace 0: ``go.Heatmap``, ``z`` = the matrix (rows = queries, top = first token).
    """
    m = np.asarray(matrix, dtype=np.float64)
    z, block = block_mean(m, max_side)
    kw: dict = {}
    if block == 1 and labels is not None:
        kw = dict(x=list(labels[: m.shape[1]]), y=list(labels[: m.shape[0]]))
    fig = go.Figure(go.Heatmap(z=z, colorscale=HEAT_SCALE, zmin=0.0,
                               colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
                               hovertemplate="query %{y}<br>key %{x}<br>%{z:.4f}<extra></extra>", **kw))
    fig.update_xaxes(title="key" + (f" (blocks of {block})" if block > 1 else ""), showgrid=False, type="category" if kw else None)
    fig.update_yaxes(title="query" + (f" (blocks of {block})" if block > 1 else ""), autorange="reversed", showgrid=False,
                     type="category" if kw else None)
    return base_layout(fig, title=title, height=height)
