"""The image overview: every input as a thumbnail tile, its border coloured by label, prediction
or correctness; and the model card as a table (for the static report)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import QUALITATIVE, image_data_uri, make_figure

__all__ = ["fig_thumbnail_grid", "fig_thumbnail_mosaic", "tile_mosaic", "fig_model_card", "class_colour", "CORRECT", "WRONG", "UNKNOWN",
           "hex_rgb"]

CORRECT = "#2f9e44"
WRONG = "#e03131"
UNKNOWN = "#adb5bd"


def class_colour(c: int) -> str:
    """The colour of class index ``c`` (grey for -1 = unknown)."""
    return UNKNOWN if c < 0 else QUALITATIVE[c % len(QUALITATIVE)]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def tile_mosaic(thumbs: np.ndarray, colours: Sequence[str], *, cols: int, tile: int = 48,
                border: int = 3) -> np.ndarray:
    """Tiles of ``tile`` x ``tile`` pixels in rows of ``cols``: each thumbnail resized into the tile,
    framed by ``border`` pixels of its colour; empty slots white.

    Args:
        thumbs: uint8 ``[n, h, w, 3]``.
        colours: n hex colours.

    Returns:
        uint8 ``[rows * tile, cols * tile, 3]``; tile ``i`` is at row ``i // cols``, column ``i % cols``.
    """
    from PIL import Image

    n = len(thumbs)
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    inner = tile - 2 * border
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * tile, c * tile
        out[y : y + tile, x : x + tile] = hex_rgb(colours[i])
        small = np.asarray(Image.fromarray(np.asarray(thumbs[i], np.uint8)).resize((inner, inner), Image.BILINEAR))
        out[y + border : y + border + inner, x + border : x + border + inner] = small[..., :3]
    return out


def fig_thumbnail_grid(thumbs: np.ndarray, samples: Sequence[int], colours: Sequence[str], *,
                       hover: Sequence[str] | None = None, cols: int = 16, tile: int = 48, border: int = 3,
                       selected: int | None = None, legend: Sequence[tuple[str, str]] = (),
                       title: str | None = None) -> go.Figure:
    """The thumbnail grid as ONE figure: a mosaic image plus one invisible marker per tile.

    Args:
        thumbs: uint8 ``[n, h, w, 3]`` of the samples shown (one page).
        samples: their sample indices (n), in display order.
        colours: border colour per tile (n hex strings).
        hover: hover text per tile.
        cols: tiles per row; tile: tile size in pixels; border: frame width.
        selected: sample index to outline, if shown.
        legend: (name, colour) entries explaining the colours.

    Returns:
        trace 0: ``go.Image`` of the mosaic (``source`` = PNG URI, not hoverable);
        trace 1: ``go.Scatter`` with one point per tile at its centre, ``customdata`` = sample index
        (clicks give ``points[0]["customdata"]``); further traces: legend entries.
    """
    cols = max(1, min(cols, len(samples))) if len(samples) else cols
    mosaic = tile_mosaic(thumbs, colours, cols=cols, tile=tile, border=border)
    return fig_thumbnail_mosaic(mosaic, samples, cols=cols, tile=tile, hover=hover, selected=selected,
                                legend=legend, title=title)


def fig_thumbnail_mosaic(mosaic: np.ndarray, samples: Sequence[int], *, cols: int, tile: int,
                         hover: Sequence[str] | None = None, selected: int | None = None,
                         legend: Sequence[tuple[str, str]] = (), title: str | None = None) -> go.Figure:
    """:func:`fig_thumbnail_grid` from a ready :func:`tile_mosaic` (uint8 ``[rows*tile, cols*tile, 3]``),
    so a cached mosaic can be redrawn with another selection cheaply."""
    n = len(samples)
    rows = mosaic.shape[0] // tile
    idx = np.arange(n)
    xs = (idx % cols) * tile + tile / 2
    ys = (idx // cols) * tile + tile / 2
    data = [
        dict(type="image", source=image_data_uri(mosaic), x0=0.5, y0=0.5, dx=1, dy=1, hoverinfo="skip"),
        dict(type="scatter", x=xs, y=ys, mode="markers", customdata=np.asarray(samples, dtype=int),
                   marker=dict(size=tile * 0.8, symbol="square", color="rgba(0,0,0,0)"),
                   hovertext=list(hover) if hover is not None else [f"sample {s}" for s in samples],
                   hoverinfo="text", showlegend=False, name="samples"),
    ]
    for name, colour in legend:
        data.append(dict(type="scatter", x=[None], y=[None], mode="markers", name=name,
                               marker=dict(size=11, symbol="square", color=colour)))
    shapes = []
    if selected is not None and selected in list(samples):
        r, c = divmod(list(samples).index(selected), cols)
        shapes.append(dict(type="rect", x0=c * tile - 1, x1=(c + 1) * tile + 1, y0=r * tile - 1, y1=(r + 1) * tile + 1,
                           line=dict(color="#111", width=3)))
    width_px = cols * tile
    return make_figure(data, dict(
        shapes=shapes, xaxis=dict(visible=False, range=[-2, width_px + 2], constrain="domain"),
        yaxis=dict(visible=False, range=[rows * tile + 2, -2], scaleanchor="x", constrain="domain"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), hovermode="closest", dragmode=False,
        clickmode="event"),
        title=title, height=min(900, max(160, rows * tile + (110 if title else 50))),
        margin=dict(l=10, r=10, b=10, t=80 if title else 20))


def fig_model_card(items: Sequence[tuple[str, str]], *, title: str | None = "Model") -> go.Figure:
    """The model card as a two-column table (key, value) for the static report."""
    keys = [k for k, _ in items]
    vals = [v for _, v in items]
    table = dict(
        type="table", header=dict(values=["", ""], height=4, fill=dict(color="white"), line=dict(color="white")),
        cells=dict(values=[keys, vals], align="left", height=26,
                   fill=dict(color=[["#f1f3f5"] * len(keys), ["white"] * len(keys)]), font=dict(size=13)),
        columnwidth=[1, 3],
    )
    return make_figure([table], {}, title=title, height=80 + 28 * len(items))
