"""Figures of the Vision-language page: an answer token's attention over the image with the visual sink
tokens marked, per-token image attention across the answer, and how often each patch is a sink."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import make_figure
from attnviz.figures.explorer import fig_head_multiples, fig_query_overlay

__all__ = ["SINK_COLOUR", "fig_image_attention", "fig_token_ratios", "fig_sink_frequency", "sink_cells",
           "image_heat", "plain_text"]

SINK_COLOUR = "#ff2d55"


def plain_text(token: str) -> str:
    """A token as plotly text shows it literally: plotly reads text as HTML, so ``</s>`` would vanish."""
    return str(token).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
    tokens = [plain_text(t) for t in tokens]
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
    """How often each patch's image token is a visual sink, one tile per layer (ONE heatmap trace).

    Args:
        frequency: float ``[layer, n_image_tokens]`` in [0, 1] (share of the questions).
        grid: (grid_h, grid_w) of the patches; ``offset`` image tokens precede them.

    Returns:
        :func:`attnviz.figures.explorer.fig_head_multiples` of the per-layer grids: trace 0 the mosaic
        (``customdata`` = the layer of each cell), trace 1 the "layer l" labels.
    """
    freq = np.asarray(frequency, np.float64)
    gh, gw = grid
    maps = freq[:, offset : offset + gh * gw].reshape(len(freq), gh, gw)
    sub = None if tau is None else f"image tokens with phi > {tau:g} (Kang et al. 2025)"
    return fig_head_multiples(maps, cols=min(6, max(1, math.ceil(math.sqrt(len(freq))))),
                              title=title or "Visual sink tokens per layer",
                              subtitle=sub, tile_label="layer", colorbar_title="sink share", zmax=1.0, height=height)
