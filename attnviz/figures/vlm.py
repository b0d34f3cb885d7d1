"""Figures of the Vision-language page: an answer token's attention over the image with the visual sink
tokens marked, per-token image attention across the answer, and how often each patch is a sink."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import HEAT_SCALE, make_figure
from attnviz.figures.explorer import fig_query_overlay

__all__ = ["SINK_COLOUR", "fig_image_attention", "fig_token_ratios", "fig_sink_frequency", "sink_cells",
           "image_heat"]

SINK_COLOUR = "#ff2d55"


def image_heat(row: np.ndarray, span: tuple[int, int], grid: tuple[int, int], offset: int = 0) -> np.ndarray:
    """One attention row's mass on the image tokens, on the patch grid.

    Args:
        row: float ``[key_pos]``.
        span: [start, stop) of the image tokens.
        grid: (grid_h, grid_w) patches; image token ``start + offset + r * grid_w + c`` is patch (r, c).
        offset: image tokens before the patches (1 when the projector keeps CLS).

    Returns:
        float64 ``[grid_h, grid_w]``.
    """
    gh, gw = grid
    start = span[0] + offset
    return np.asarray(row, np.float64)[start : start + gh * gw].reshape(gh, gw)


def sink_cells(sinks: np.ndarray, grid: tuple[int, int], offset: int = 0) -> list[tuple[int, int]]:
    """(row, col) of the patches whose image token is a sink; ``sinks`` bool ``[n_image_tokens]``."""
    idx = np.flatnonzero(np.asarray(sinks, bool)) - offset
    return [divmod(int(i), grid[1]) for i in idx if 0 <= i < grid[0] * grid[1]]


def fig_image_attention(image: np.ndarray, heat: np.ndarray, *, patch_size: tuple[int, int],
                        sinks: Sequence[tuple[int, int]] = (), title: str | None = None,
                        subtitle: str | None = None, height: int = 430) -> go.Figure:
    """The image with one answer token's attention over its patches, and the visual sinks marked.

    Args:
        image: uint8 ``[h, w, 3]``.
        heat: float ``[grid_h, grid_w]``: the attention from the token's generation step to each image token.
        patch_size: (patch_h, patch_w) in model-input pixels.
        sinks: (row, col) of the patches whose image token is a visual sink (drawn as dashed squares).

    Returns:
        trace 0 the image, trace 1 the heat map (as :func:`attnviz.figures.explorer.fig_query_overlay`);
        one dashed rectangle shape named ``"sink"`` per sink patch (after the grid lines).
    """
    fig = fig_query_overlay(image, heat, patch_size=patch_size, title=title, subtitle=subtitle,
                            colorbar_title="attention", height=height)
    ph, pw = patch_size
    marks = [dict(type="rect", x0=c * pw + 1, x1=(c + 1) * pw - 1, y0=r * ph + 1, y1=(r + 1) * ph - 1,
                  line=dict(color=SINK_COLOUR, width=2, dash="dot"), name="sink") for r, c in sinks]
    if marks:  # one layout update for all of them
        fig.update_layout(shapes=list(fig.layout.shapes) + marks)
    return fig


def fig_token_ratios(tokens: Sequence[str], image_ratio: np.ndarray, *, selected: int | None = None,
                     vhd: np.ndarray | None = None, title: str | None = None, height: int = 260) -> go.Figure:
    """Per answer token of one head: the image attention ratio (bars) and the VHD (line, right axis).

    Args:
        tokens: the answer tokens.
        image_ratio: float ``[n_tokens]`` in [0, 1].
        selected: the token to highlight.
        vhd: float ``[n_tokens]`` or None.

    Returns:
        trace 0 the bars (x = token index, customdata = the token), trace 1 the VHD line (if given).
    """
    n = len(tokens)
    colours = ["#e4572e" if i == selected else "#4e79a7" for i in range(n)]
    data = [dict(type="bar", x=list(range(n)), y=np.asarray(image_ratio, np.float64), marker=dict(color=colours),
                 customdata=list(tokens), name="image attention ratio",
                 hovertemplate="%{customdata}: image attention %{y:.3f}<extra></extra>")]
    layout: dict = dict(xaxis=dict(tickmode="array", tickvals=list(range(n)), ticktext=list(tokens), title=None),
                        yaxis=dict(title=dict(text="image attention"), range=[0, 1]), bargap=0.3,
                        legend=dict(orientation="h", y=1.12, x=0), clickmode="event")
    if vhd is not None:
        data.append(dict(type="scatter", mode="lines+markers", x=list(range(n)), y=np.asarray(vhd, np.float64),
                         yaxis="y2", name="VHD", line=dict(color="#59a14f"),
                         hovertemplate="VHD %{y:.3f}<extra></extra>"))
        layout["yaxis2"] = dict(title=dict(text="VHD"), overlaying="y", side="right", showgrid=False, rangemode="tozero")
    return make_figure(data, layout, title=title, height=height)


def fig_sink_frequency(frequency: np.ndarray, grid: tuple[int, int], *, offset: int = 0, tau: float | None = None,
                       title: str | None = None, height: int | None = None) -> go.Figure:
    """How often each patch's image token is a visual sink, one panel per layer (ONE heatmap trace).

    Args:
        frequency: float ``[layer, n_image_tokens]`` in [0, 1] (share of the questions).
        grid: (grid_h, grid_w) of the patches; ``offset`` image tokens precede them.

    Returns:
        trace 0: ``go.Heatmap`` of a mosaic, layer ``l`` at tile ``l`` (columns of ``ceil(sqrt(L))``),
        tiles separated by a NaN row/column; ``customdata`` the layer of each cell (-1 in gaps).
        trace 1: the layer labels.
    """
    freq = np.asarray(frequency, np.float64)
    n_layers = freq.shape[0]
    gh, gw = grid
    cols = min(6, max(1, math.ceil(math.sqrt(n_layers))))
    rows = math.ceil(n_layers / cols)
    big = np.full((rows * (gh + 1) - 1, cols * (gw + 1) - 1), np.nan)
    owner = np.full(big.shape, -1, dtype=int)
    for layer in range(n_layers):
        r, c = divmod(layer, cols)
        y, x = r * (gh + 1), c * (gw + 1)
        big[y : y + gh, x : x + gw] = freq[layer, offset : offset + gh * gw].reshape(gh, gw)
        owner[y : y + gh, x : x + gw] = layer
    tile_r, tile_c = np.divmod(np.arange(n_layers), cols)
    labels = dict(type="scatter", x=tile_c * (gw + 1) + (gw - 1) / 2, y=tile_r * (gh + 1) - 0.9, mode="text",
                  text=[f"layer {l}" for l in range(n_layers)], hoverinfo="skip", showlegend=False, cliponaxis=False)
    hm = dict(type="heatmap", z=big, customdata=owner, colorscale=HEAT_SCALE, zmin=0.0, zmax=1.0, hoverongaps=False,
              colorbar=dict(title=dict(text="sink share", side="right"), thickness=12),
              hovertemplate="layer %{customdata}<br>sink in %{z:.0%} of the questions<extra></extra>")
    sub = None if tau is None else f"image tokens with phi > {tau:g} (Kang et al. 2025)"
    return make_figure([hm, labels], dict(xaxis=dict(visible=False, constrain="domain"),
                                          yaxis=dict(visible=False, autorange="reversed", scaleanchor="x",
                                                     constrain="domain"), dragmode=False),
                       title=title, subtitle=sub, height=height or min(600, 140 + rows * 170),
                       margin=dict(l=10, r=10, b=10, t=80 if title else 30))
