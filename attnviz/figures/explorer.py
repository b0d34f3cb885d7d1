"""The attention explorer: one query's attention over the image, all heads of a layer as small
multiples, attributions side by side with the object mask, and the raw token-by-token matrix."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import DIVERGING_SCALE, HEAT_SCALE, image_data_uri, make_figure

__all__ = [
    "fig_query_overlay",
    "fig_head_multiples",
    "fig_attribution_panels",
    "fig_token_matrix",
    "token_labels",
    "cell_of_point",
    "block_mean",
    "mask_outline_path",
]


def _image_trace(image: np.ndarray, image_size: tuple[int, int], **kw) -> dict:
    ih, iw = image.shape[:2]
    h, w = image_size
    dx, dy = w / iw, h / ih
    # x0/y0 are the centre of the first pixel: pixel edges then fall on 0 .. w, 0 .. h
    return dict(type="image", source=image_data_uri(image, "jpeg"), x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip", **kw)


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
                      query_cell: tuple[int, int] | None = None, title: str | None = None, subtitle: str | None = None,
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
    shapes = []
    if show_grid and gh * gw <= 64 * 64:
        shapes.append(dict(type="path", path=_grid_lines((gh, gw), (ph, pw)),
                           line=dict(color="rgba(255,255,255,0.45)", width=1)))
    if query_cell is not None:
        r, c = query_cell
        shapes.append(dict(type="rect", x0=c * pw, x1=(c + 1) * pw, y0=r * ph, y1=(r + 1) * ph,
                           line=dict(color="#ff2d55", width=3)))
    hm = dict(
        type="heatmap", z=heat, x=(np.arange(gw) + 0.5) * pw, y=(np.arange(gh) + 0.5) * ph, opacity=opacity,
        colorscale=colorscale, zmin=0.0, zmax=float(zmax if zmax is not None else max(heat.max(), 1e-12)),
        colorbar=dict(title=dict(text=colorbar_title, side="right"), thickness=12),
        customdata=np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), axis=-1),
        hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>%{z:.4f}<extra></extra>",
    )
    return make_figure([_image_trace(image, size), hm], dict(
        shapes=shapes, xaxis=dict(visible=False, range=[0, size[1]], constrain="domain"),
        yaxis=dict(visible=False, range=[size[0], 0], scaleanchor="x", constrain="domain"),
        dragmode=False, clickmode="event", hovermode="closest"),
        title=title, subtitle=subtitle, height=height, margin=dict(l=10, r=10, b=10, t=70 if subtitle else 50))


def fig_head_multiples(maps: np.ndarray, *, selected_head: int | None = None, cols: int | None = None,
                       title: str | None = None, query_cell: tuple[int, int] | None = None,
                       colorscale: str = HEAT_SCALE, height: int | None = None, tile_label: str = "head",
                       colorbar_title: str = "attention", zmax: float | None = None,
                       subtitle: str | None = None) -> go.Figure:
    """Small multiples of every head's map for one query, as ONE heatmap trace.

    Args:
        maps: float ``[head, grid_h, grid_w]``.
        selected_head: head to outline.
        cols: heads per row (default ``ceil(sqrt(H))``, at most 8).
        query_cell: (row, col) of the query, marked in every tile.
        tile_label / colorbar_title / zmax: what a tile is called ("head"; "layer" for per-layer maps), the
            colour bar's title, its maximum (default: the largest value).

    Returns:
        trace 0: ``go.Heatmap`` of a mosaic: head ``h`` at tile (h // cols, h % cols), tiles
        separated by one NaN row/column; ``customdata`` gives the head of each cell (-1 in gaps).
        trace 1: the head labels (a text scatter). One shared colour scale (0 .. max).
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
    heads = np.arange(n_heads)
    tile_r, tile_c = np.divmod(heads, cols)
    labels = dict(
        type="scatter", x=tile_c * (gw + 1) + (gw - 1) / 2, y=tile_r * (gh + 1) - 0.9, mode="text",
        text=[f"{tile_label} {h}" for h in heads],
        textfont=dict(size=11, color=["#e4572e" if h == selected_head else "#333" for h in heads]),
        hoverinfo="skip", showlegend=False, cliponaxis=False,
    )
    shapes = []
    if query_cell is not None:
        qr, qc = query_cell
        corners = [(c * (gw + 1) + qc - 0.5, r * (gh + 1) + qr - 0.5) for r, c in zip(tile_r, tile_c)]
        path = " ".join(f"M{x},{y} H{x + 1} V{y + 1} H{x} Z" for x, y in corners)  # absolute commands only
        shapes.append(dict(type="path", path=path, line=dict(color="#ff2d55", width=1.5)))
    if selected_head is not None and 0 <= selected_head < n_heads:
        r, c = divmod(selected_head, cols)
        shapes.append(dict(type="rect", x0=c * (gw + 1) - 0.5, x1=c * (gw + 1) + gw - 0.5, y0=r * (gh + 1) - 0.5,
                           y1=r * (gh + 1) + gh - 0.5, line=dict(color="#e4572e", width=3)))
    hm = dict(
        type="heatmap", z=big, customdata=owner, colorscale=colorscale, zmin=0.0,
        zmax=float(zmax) if zmax is not None else (float(np.nanmax(maps)) if maps.size else 1.0),
        colorbar=dict(title=dict(text=colorbar_title, side="right"), thickness=12),
        hovertemplate=f"{tile_label} %{{customdata}}<br>%{{z:.4f}}<extra></extra>", hoverongaps=False,
    )
    return make_figure([hm, labels], dict(
        shapes=shapes, xaxis=dict(visible=False, constrain="domain"),
        yaxis=dict(visible=False, autorange="reversed", scaleanchor="x", constrain="domain"),
        dragmode=False, clickmode="event"),
        title=title, subtitle=subtitle, height=height or min(700, 140 + rows * 170),
        margin=dict(l=10, r=10, b=10, t=(90 if subtitle else 70) if title else 30))


def mask_outline_path(mask: np.ndarray, image_size: tuple[int, int], max_side: int = 128) -> str:
    """An SVG path of the boundary between object and background of ``mask`` (nonzero = object),
    scaled onto ``image_size`` (height, width) pixels; masks larger than ``max_side`` are
    subsampled first. Horizontal and vertical runs, so the path stays short."""
    m = np.asarray(mask) > 0
    step = max(1, math.ceil(max(m.shape) / max_side))
    m = m[::step, ::step]
    mh, mw = m.shape
    sy, sx = image_size[0] / mh, image_size[1] / mw
    pad = np.pad(m, 1)
    parts: list[str] = []
    horiz = pad[1:, 1:-1] != pad[:-1, 1:-1]   # [mh+1, mw]: edge above row r
    for r in np.flatnonzero(horiz.any(1)):
        for a, b in _runs(horiz[r]):
            parts.append(f"M{a * sx:.2f},{r * sy:.2f}H{b * sx:.2f}")
    vert = pad[1:-1, 1:] != pad[1:-1, :-1]    # [mh, mw+1]: edge left of column c
    for c in np.flatnonzero(vert.any(0)):
        for a, b in _runs(vert[:, c]):
            parts.append(f"M{c * sx:.2f},{a * sy:.2f}V{b * sy:.2f}")
    return "".join(parts)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in a 1-D boolean array."""
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def fig_attribution_panels(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], *,
                           image_size: tuple[int, int], mask: np.ndarray | None = None,
                           title: str | None = None, opacity: float = 0.65, height: int = 330,
                           max_side: int = 112) -> go.Figure:
    """The image (with the object mask outlined) beside overlays of rollout and attributions.

    Args:
        image: uint8 ``[h, w, 3]``.
        panels: (name, map) with map float ``[rows, cols]`` at pixel or patch resolution; each is
            shown normalised to its own max |value| (signed maps on a diverging scale); maps
            larger than ``max_side`` are block-averaged for display.
        image_size: (height, width) of the model input in pixels.
        mask: ``[mh, mw]`` object mask (nonzero = object) or None; outlined on every panel.

    Returns:
        One figure, ``1 + len(panels)`` side-by-side panels (axes x, x2, ...); per panel an image
        trace and (for each map) a heat trace whose ``z`` is the map divided by its max |value|.
        The mask outline is one path shape per panel.
    """
    h, w = image_size
    n = 1 + len(panels)
    names = ["input" + (" + object mask" if mask is not None else "")] + [name for name, _ in panels]
    gap = 0.02
    width = (1 - gap * (n - 1)) / n
    layout: dict = dict(dragmode=False, showlegend=False, annotations=[], shapes=[])
    data: list = []
    outline = mask_outline_path(mask, image_size) if mask is not None else ""
    for i in range(n):
        sfx = "" if i == 0 else str(i + 1)
        x0 = i * (width + gap)
        layout[f"xaxis{sfx}"] = dict(domain=[x0, x0 + width], visible=False, range=[0, w], constrain="domain",
                                     anchor=f"y{sfx}")
        layout[f"yaxis{sfx}"] = dict(visible=False, range=[h, 0], scaleanchor=f"x{sfx}", constrain="domain",
                                     anchor=f"x{sfx}")
        layout["annotations"].append(dict(text=names[i], x=x0 + width / 2, y=1.0, xref="paper", yref="paper",
                                          xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=13)))
        data.append(_image_trace(image, image_size, xaxis=f"x{sfx}", yaxis=f"y{sfx}"))
        if outline:
            layout["shapes"].append(dict(type="path", path=outline, xref=f"x{sfx}", yref=f"y{sfx}",
                                         line=dict(color="#ff2d55", width=2), name="object mask"))
        if i == 0:
            continue
        name, arr = panels[i - 1]
        a = np.asarray(arr, dtype=np.float64)
        if max(a.shape) > max_side:
            a, _ = block_mean(a, max_side)
        scale = float(np.nanmax(np.abs(a))) if a.size else 0.0
        z = a / scale if scale > 0 else a
        signed = bool((a < 0).any())
        rr, cc = a.shape
        data.append(dict(
            type="heatmap", z=z, x=(np.arange(cc) + 0.5) * (w / cc), y=(np.arange(rr) + 0.5) * (h / rr), opacity=opacity,
            colorscale=DIVERGING_SCALE if signed else HEAT_SCALE, zmin=-1.0 if signed else 0.0, zmax=1.0,
            showscale=False, name=name, hovertemplate=f"{name}: %{{z:.3f}} (of max)<extra></extra>",
            xaxis=f"x{sfx}", yaxis=f"y{sfx}",
        ))
    return make_figure(data, layout, title=title, height=height, margin=dict(l=10, r=10, b=10, t=70 if title else 40))


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
                     max_side: int = 400, height: int = 640, query_labels: Sequence[str] | None = None) -> go.Figure:
    """The raw query x key attention matrix of one head (block-averaged beyond ``max_side``).

    Args:
        matrix: float ``[query_pos, key_pos]``.
        labels: token names (used when not block-averaged).
        query_labels: the rows' names when they are not ``labels`` (only some query rows stored: ``--store rows``).

    Returns:
        trace 0: ``go.Heatmap``, ``z`` = the matrix (rows = queries, top = first token).
    """
    m = np.asarray(matrix, dtype=np.float64)
    z, block = block_mean(m, max_side)
    heat = dict(type="heatmap", z=z, colorscale=HEAT_SCALE, zmin=0.0,
                colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
                hovertemplate="query %{y}<br>key %{x}<br>%{z:.4f}<extra></extra>")
    labelled = block == 1 and labels is not None
    if labelled:
        heat.update(x=list(labels[: m.shape[1]]),
                    y=list(query_labels[: m.shape[0]] if query_labels is not None else labels[: m.shape[0]]))
    blocks = f" (blocks of {block})" if block > 1 else ""
    xaxis = dict(title=dict(text="key" + blocks), showgrid=False)
    yaxis = dict(title=dict(text="query" + blocks), autorange="reversed", showgrid=False)
    if labelled:
        xaxis["type"] = yaxis["type"] = "category"
    return make_figure([heat], dict(xaxis=xaxis, yaxis=yaxis), title=title, height=height)
