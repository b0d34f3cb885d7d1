"""Pure figure functions: data (numpy arrays, plain values) -> ``plotly.graph_objects.Figure``.

No Dash, no h5py: every ``fig_*`` takes arrays and returns a figure, so the dashboard, the static
report and the tests use the same functions. Import by module, e.g.
``from attnviz.figures.heads import fig_head_grid``. Shared helpers live here.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
from PIL import Image as _PILImage  # eager: lazy imports from several server threads at once can race

__all__ = ["fig_message", "base_layout", "image_data_uri", "decode_data_uri", "HEAT_SCALE", "DIVERGING_SCALE", "FONT",
           "QUALITATIVE"]

FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)
HEAT_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"
#: class colours (Tableau 10), cycled for more classes
QUALITATIVE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
               "#9c755f", "#bab0ac")


def image_data_uri(image: np.ndarray) -> str:
    """A PNG ``data:`` URI of ``image``: uint8 ``[h, w, 3]`` (RGB) or ``[h, w]`` (grey).

    Plotly ships an image given as a URI as compressed PNG instead of a JSON array of every pixel.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    _PILImage.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_uri(uri: str) -> np.ndarray:
    """The pixels of a PNG ``data:`` URI (inverse of :func:`image_data_uri`), uint8 ``[h, w, c]``."""
    raw = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(_PILImage.open(io.BytesIO(raw)))


def base_layout(fig: go.Figure, *, title: str | None = None, height: int | None = None,
                width: int | None = None) -> go.Figure:
    """Apply the house style (font, white template, tight margins) in place and return ``fig``."""
    fig.update_layout(template="plotly_white", font=FONT, margin=dict(l=50, r=20, t=50 if title else 20, b=40),
                      title=dict(text=title, x=0.01, xanchor="left") if title else None)
    if height:
        fig.update_layout(height=height)
    if width:
        fig.update_layout(width=width)
    return fig


def fig_message(text: str, *, height: int = 300) -> go.Figure:
    """An empty figure that says ``text`` in its middle (no data, no axes)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, height=height)
