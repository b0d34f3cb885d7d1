"""Pure figure functions: data (numpy arrays, plain values) -> ``plotly.graph_objects.Figure``.

No Dash, no h5py: every ``fig_*`` takes arrays and returns a figure, so the dashboard, the static
report and the tests use the same functions. Import by module, e.g.
``from attnviz.figures.heads import fig_head_grid``. Shared helpers live here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections import OrderedDict

import numpy as np
import plotly.graph_objects as go
from PIL import Image as _PILImage  # eager: lazy imports from several server threads at once can race

__all__ = ["fig_message", "base_layout", "house_layout", "make_figure", "use_house_template", "image_data_uri", "decode_data_uri", "HEAT_SCALE", "DIVERGING_SCALE", "FONT",
           "QUALITATIVE"]

FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)
HEAT_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"
#: class colours (Tableau 10), cycled for more classes
QUALITATIVE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
               "#9c755f", "#bab0ac")


_URI_CACHE: "OrderedDict[tuple, str]" = OrderedDict()
_URI_CACHE_SIZE = 32
_URI_LOCK = threading.Lock()


def image_data_uri(image: np.ndarray, fmt: str = "png") -> str:
    """A ``data:`` URI of ``image``: uint8 ``[h, w, 3]`` (RGB) or ``[h, w]`` (grey).

    Plotly ships an image given as a URI compressed instead of as a JSON array of every pixel.
    ``fmt``: "png" (lossless: mosaics, exact pixels) or "jpeg" (quality 92: photographic inputs
    under a heat overlay; several times faster to encode). The last few encodings are remembered
    (keyed by a hash of the pixels): the dashboard draws the same input in several figures and on
    every selection change.
    """
    arr = np.ascontiguousarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    key = (fmt, arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
    with _URI_LOCK:
        hit = _URI_CACHE.get(key)
        if hit is not None:
            _URI_CACHE.move_to_end(key)
            return hit
    buf = io.BytesIO()
    if fmt == "jpeg":
        _PILImage.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=92)
    else:
        _PILImage.fromarray(arr).save(buf, format="PNG", compress_level=1)
    uri = f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    with _URI_LOCK:
        _URI_CACHE[key] = uri
        while len(_URI_CACHE) > _URI_CACHE_SIZE:
            _URI_CACHE.popitem(last=False)
    return uri


def decode_data_uri(uri: str) -> np.ndarray:
    """The pixels of a PNG ``data:`` URI (inverse of :func:`image_data_uri`), uint8 ``[h, w, c]``."""
    raw = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(_PILImage.open(io.BytesIO(raw)))


def house_layout(*, title: str | None = None, subtitle: str | None = None, height: int | None = None,
                 width: int | None = None, margin: dict | None = None) -> dict:
    """The house layout as a plain dict: font, white background, tight margins, left title."""
    spec: dict = dict(font=FONT, plot_bgcolor="white", paper_bgcolor="white",
                      margin=margin or dict(l=50, r=20, t=(70 if subtitle else 50) if title else 20, b=40))
    if title:
        spec["title"] = dict(text=title, x=0.01, xanchor="left")
        if subtitle:
            spec["title"]["subtitle"] = dict(text=subtitle)
    if height:
        spec["height"] = height
    if width:
        spec["width"] = width
    return spec


def make_figure(data: list, layout: dict, *, title: str | None = None, subtitle: str | None = None,
                height: int | None = None, width: int | None = None, margin: dict | None = None) -> go.Figure:
    """A ``go.Figure`` from plain trace dicts and a layout dict, in the house style.

    Built in ONE constructor call: plotly validates every property assignment, and a figure
    grown with ``add_shape``/``add_annotation``/``update_*`` calls and a named template costs
    10x more (hundreds of ms for the explorer) than the same figure given whole.
    """
    spec = house_layout(title=title, subtitle=subtitle, height=height, width=width, margin=margin)
    spec.update(layout)
    return go.Figure(data=data, layout=spec)


def base_layout(fig: go.Figure, *, title: str | None = None, height: int | None = None,
                width: int | None = None, **layout) -> go.Figure:
    """Apply the house style (font, white background, tight margins) in place and return ``fig``.

    One ``update_layout`` call and no named template: assigning a template deep-copies and
    validates it (~40 ms per figure). The dashboard and the report set
    ``plotly.io.templates.default = "plotly_white"`` once instead (:func:`use_house_template`).
    """
    spec = house_layout(title=title, height=height, width=width)
    spec.update(layout)
    fig.update_layout(**spec)
    return fig


def use_house_template() -> None:
    """Make ``plotly_white`` the default template of this process (dashboard, report)."""
    import plotly.io as pio

    pio.templates.default = "plotly_white"


def fig_message(text: str, *, height: int = 300, width_chars: int = 60) -> go.Figure:
    """An empty figure that says ``text`` in its middle (no data, no axes), wrapped at
    ``width_chars`` characters so a long message stays readable in a narrow column."""
    import textwrap

    wrapped = "<br>".join(textwrap.wrap(text, width_chars, break_long_words=False, break_on_hyphens=False)) or text
    return make_figure([], dict(
        annotations=[dict(text=wrapped, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                          font=dict(size=14, color="#555"))],
        xaxis=dict(visible=False), yaxis=dict(visible=False)), height=height)
