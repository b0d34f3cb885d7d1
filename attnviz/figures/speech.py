"""Speech-to-text figures: a clip's waveform and spectrogram with its words, one token's cross-attention against
its saliency on a shared time axis, the heads' CA-vs-saliency correlation, deletion curves.

Time is in seconds on every x axis. A frame ``j`` of width ``dt`` covers ``[j dt, (j+1) dt)`` and is drawn at
its centre; spectrograms are drawn as images (one PNG, not a JSON array per cell), which keeps a 30-second
Whisper window (80 x 3000 cells) as cheap to redraw as a short clip.

The figures are built from plain dicts without plotly's property validation (``_validate=False``): validating a
clip's figure (two 1,000-point lines, dozens of word shapes and labels) cost 30-50 ms per token switch, most of
the Speech page's budget. ``tests/figures/test_speech.py`` validates every figure these functions make.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import FONT, QUALITATIVE, house_layout, image_data_uri
from attnviz.figures.heads import fig_head_grid

__all__ = ["colourise", "fig_clip", "fig_token_alignment", "fig_correlation_grid", "fig_deletion", "highlight_shape",
           "CURVE_COLOURS", "HIGHLIGHT"]

#: line colours of the explanations (cross-attention of the head, its layer, all layers; saliency)
CURVE_COLOURS = {"head": "#e4572e", "layer mean": "#f2a541", "all-layer mean": "#3b5bdb", "saliency": "#2a9d8f",
                 "saliency (max)": "#2a9d8f", "saliency (mean)": "#2a9d8f"}
WordSpan = tuple[str, float, float]
#: name of the clip figure's shape that outlines the selected token's word (always its last shape)
HIGHLIGHT = "selected"


def _figure(data: list, layout: dict, *, title: str | None = None, subtitle: str | None = None,
            height: int | None = None, margin: dict | None = None) -> go.Figure:
    """A figure in the house layout, from plain dicts, unvalidated (see the module docstring)."""
    spec = house_layout(title=title, subtitle=subtitle, height=height, margin=margin)
    spec.update(layout)
    return go.Figure(data=data, layout=spec, _validate=False)


def highlight_shape(span: tuple[float, float] | None) -> dict:
    """The outline of the selected token's word over both panels of :func:`fig_clip` (hidden without a span)."""
    a, b = span if span is not None else (0.0, 0.0)
    return dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0, y1=1, line=dict(color="#e4572e", width=2),
                fillcolor="rgba(0,0,0,0)", name=HIGHLIGHT, visible=span is not None)


@lru_cache(maxsize=8)
def _lut(name: str) -> np.ndarray:
    """uint8 ``[256, 3]`` lookup table of a plotly colour scale."""
    from plotly.colors import get_colorscale, hex_to_rgb, unlabel_rgb

    stops = get_colorscale(name)
    pos = np.array([float(p) for p, _ in stops])
    cols = np.array([hex_to_rgb(c) if c.startswith("#") else unlabel_rgb(c) for _, c in stops], np.float64)
    x = np.linspace(0, 1, 256)
    return np.stack([np.interp(x, pos, cols[:, k]) for k in range(3)], 1).round().astype(np.uint8)


def colourise(values: np.ndarray, colorscale: str = "Viridis", vmin: float | None = None,
              vmax: float | None = None) -> np.ndarray:
    """float ``[h, w]`` -> uint8 ``[h, w, 3]`` through a plotly colour scale (NaN -> the lowest colour)."""
    v = np.asarray(values, np.float64)
    lo = np.nanmin(v) if vmin is None else vmin
    hi = np.nanmax(v) if vmax is None else vmax
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        idx = np.zeros(v.shape, np.int64)
    else:
        idx = np.clip(np.nan_to_num((v - lo) / (hi - lo) * 255, nan=0.0), 0, 255).astype(np.int64)
    return _lut(colorscale)[idx]


def _spectrogram_trace(values: np.ndarray, frame_s: float, *, xaxis: str, yaxis: str,
                       colorscale: str = "Viridis") -> dict:
    """``values [mel, frame]`` as an image trace: frame ``j`` spans ``[j dt, (j+1) dt)``, mel bin 0 at the bottom."""
    img = colourise(np.asarray(values)[::-1], colorscale)  # row 0 of an image is its top: highest mel first
    n_mel = values.shape[0]
    return dict(type="image", source=image_data_uri(img), x0=frame_s / 2, dx=frame_s, y0=n_mel - 0.5, dy=-1.0,
                xaxis=xaxis, yaxis=yaxis, hoverinfo="skip")


def _word_shapes(words: Sequence[WordSpan], *, yref: str, colour: str, dash: str | None = None,
                 fill: str | None = None) -> list[dict]:
    return [dict(type="rect", xref="x", yref=yref, x0=a, x1=b, y0=0, y1=1, layer="below",
                 line=dict(color=colour, width=1, dash=dash), fillcolor=fill or "rgba(0,0,0,0)") for _, a, b in words]


def _word_labels(words: Sequence[WordSpan], *, yref: str, y: float, colour: str) -> list[dict]:
    return [dict(x=(a + b) / 2, y=y, xref="x", yref=yref, text=w, showarrow=False, font=dict(size=11, color=colour))
            for w, a, b in words]


def fig_clip(envelope: np.ndarray, envelope_s: float, log_mel: np.ndarray, frame_s: float, *, duration: float,
             reference: Sequence[WordSpan] = (), aligned: Sequence[WordSpan] = (),
             highlight: tuple[float, float] | None = None, title: str | None = None, height: int = 360) -> go.Figure:
    """Waveform (top) and log-mel spectrogram (bottom) of one clip on one time axis.

    Args:
        envelope: float ``[2, bins]``: min (row 0) and max (row 1) of the waveform per bin of ``envelope_s`` seconds.
        log_mel: float ``[mel, frame]``: the model's input features of the frames that hold audio.
        frame_s: seconds per feature frame.
        duration: the clip's length (s): the x range.
        reference: (word, start, end) reference timings, shaded grey with their words above the waveform.
        aligned: (word, start, end) timings from attention (DTW), outlined in the spectrogram with their words.
        highlight: (start, end) of the selected token's word, outlined in red over both panels.

    Returns:
        traces: 0 = waveform max, 1 = waveform min (filled to trace 0), 2 = the spectrogram image; the last
        shape is the highlight (:func:`highlight_shape`), so that a page can move it with a patch.
    """
    env = np.asarray(envelope, np.float64)
    t = (np.arange(env.shape[1]) + 0.5) * envelope_s
    wave = [dict(type="scatter", x=t, y=env[1], mode="lines", line=dict(width=0.6, color="#3b5bdb"), name="max",
                 hoverinfo="skip", showlegend=False, xaxis="x", yaxis="y"),
            dict(type="scatter", x=t, y=env[0], mode="lines", line=dict(width=0.6, color="#3b5bdb"), fill="tonexty",
                 fillcolor="rgba(59,91,219,0.35)", name="min", hoverinfo="skip", showlegend=False, xaxis="x", yaxis="y")]
    spec = _spectrogram_trace(log_mel, frame_s, xaxis="x", yaxis="y2")
    shapes = _word_shapes(reference, yref="y domain", colour="#9ca3af", fill="rgba(156,163,175,0.18)")
    shapes += _word_shapes(aligned, yref="y2 domain", colour="#ffffff", dash="dot")
    shapes.append(highlight_shape(highlight))
    annotations = _word_labels(reference, yref="y domain", y=1.08, colour="#374151")
    annotations += _word_labels(aligned, yref="y2 domain", y=0.93, colour="#ffffff")
    peak = float(np.nanmax(np.abs(env))) if env.size else 1.0
    layout = dict(
        xaxis=dict(title=dict(text="time (s)"), range=[0, duration], anchor="y2", showgrid=False),
        yaxis=dict(domain=[0.68, 1.0], range=[-1.05 * peak, 1.05 * peak], title=dict(text="wave"),
                   showticklabels=False, zeroline=False, showgrid=False),
        # an image trace makes plotly keep its pixels square unless the axis says otherwise
        yaxis2=dict(domain=[0.0, 0.6], range=[-0.5, log_mel.shape[0] - 0.5], title=dict(text="mel bin"),
                    showgrid=False, zeroline=False, scaleanchor=False),
        shapes=shapes, annotations=annotations, hovermode=False,
    )
    return _figure(wave + [spec], layout, title=title, height=height, margin=dict(l=50, r=20, t=60 if title else 30, b=40))


def fig_token_alignment(saliency_map: np.ndarray | None, frame_s: float, curves: Mapping[str, np.ndarray],
                        encoder_frame_s: float, *, duration: float, span: tuple[float, float] | None = None,
                        aligned_span: tuple[float, float] | None = None, title: str | None = None,
                        subtitle: str | None = None, height: int = 420) -> go.Figure:
    """One token: its saliency over the spectrogram (top) and its cross-attention vs saliency over time (bottom).

    Args:
        saliency_map: float ``[mel, frame]`` of the token (None: encoder-frame saliency only, no top panel image).
        curves: name -> float ``[E]`` over the encoder frames (cross-attention of the head, its layer mean,
            the all-layer mean, the pooled saliency); each is scaled to its own maximum (shapes, not magnitudes,
            are compared: the correlation is scale-free).
        encoder_frame_s: seconds per encoder frame (frame ``e`` drawn at ``(e + 0.5) * encoder_frame_s``).
        span: (start, end) of the token's reference word, shaded; aligned_span: its DTW word, outlined.

    Returns:
        traces: the saliency image first (if any), then one line per curve in the order given.
    """
    data = []
    if saliency_map is not None:
        data.append(_spectrogram_trace(saliency_map, frame_s, xaxis="x", yaxis="y2", colorscale="Magma"))
    palette = iter(QUALITATIVE)
    for name, values in curves.items():
        v = np.asarray(values, np.float64)
        top = np.nanmax(v) if v.size and np.isfinite(v).any() else 0.0
        y = v / top if top > 0 else v
        t = (np.arange(v.size) + 0.5) * encoder_frame_s
        colour = CURVE_COLOURS.get(name, next(palette))
        data.append(dict(type="scatter", x=t, y=y, mode="lines", name=name, xaxis="x", yaxis="y",
                         line=dict(color=colour, width=2.4 if name == "head" else 1.6,
                                   dash="dot" if name.startswith("saliency") else None),
                         customdata=v, hovertemplate=f"{name}<br>%{{x:.3f}} s: %{{customdata:.4g}}<extra></extra>"))
    shapes = []
    if span is not None:
        shapes.append(dict(type="rect", xref="x", yref="paper", x0=span[0], x1=span[1], y0=0, y1=1, layer="below",
                           line=dict(width=0), fillcolor="rgba(156,163,175,0.25)"))
    if aligned_span is not None:
        shapes.append(dict(type="rect", xref="x", yref="paper", x0=aligned_span[0], x1=aligned_span[1], y0=0, y1=1,
                           line=dict(color="#6b7280", width=1, dash="dot"), fillcolor="rgba(0,0,0,0)"))
    has_map = saliency_map is not None
    layout = dict(
        xaxis=dict(title=dict(text="time (s)"), range=[0, duration], anchor="y", showgrid=False),
        yaxis=dict(domain=[0.0, 0.55 if has_map else 1.0], title=dict(text="scaled to max"), range=[-0.03, 1.08]),
        legend=dict(orientation="h", y=-0.18, x=0), shapes=shapes,
    )
    if has_map:
        layout["yaxis2"] = dict(domain=[0.63, 1.0], range=[-0.5, saliency_map.shape[0] - 0.5],
                                title=dict(text="mel bin"), showgrid=False, zeroline=False, scaleanchor=False)
    return _figure(data, layout, title=title, subtitle=subtitle, height=height)


def fig_correlation_grid(values: np.ndarray, *, selected: tuple[int, int] | None, label: str,
                         title: str | None = None) -> go.Figure:
    """The L x H heatmap of one CA-vs-saliency correlation (click a cell: ``x`` = head, ``y`` = layer), on a
    diverging scale from -1 to 1."""
    fig = fig_head_grid(values, metric=label, selected=selected, title=title, colorscale="RdBu")
    fig.data[0].update(zmin=-1, zmax=1, zmid=0)
    return fig


def fig_deletion(fractions: np.ndarray, curves: Mapping[str, np.ndarray], auc: Mapping[str, float], *,
                 title: str | None = None, subtitle: str | None = None, ylabel: str = "p(token)",
                 height: int = 360) -> go.Figure:
    """Deletion curves: the token probability as the top fraction of frames by each explanation is removed.

    Args:
        fractions: float ``[S + 1]`` from 0 to 1.
        curves: explanation name -> float ``[S + 1]``.
        auc: explanation name -> area under its curve (shown in the legend; lower = more faithful).

    Returns:
        one line trace per explanation, in the order of ``curves``.
    """
    palette = iter(QUALITATIVE * 3)
    data = []
    for name, values in curves.items():
        colour = next(palette)
        dash = "dot" if name == "random" else None
        data.append(dict(type="scatter", x=np.asarray(fractions) * 100, y=np.asarray(values, np.float64), mode="lines+markers",
                         name=f"{name} (AUC {auc.get(name, float('nan')):.3f})", marker=dict(size=5),
                         line=dict(color="#6b7280" if name == "random" else colour, dash=dash, width=1.8),
                         hovertemplate=f"{name}<br>%{{x:.0f}}% removed: %{{y:.4f}}<extra></extra>"))
    layout = dict(xaxis=dict(title=dict(text="encoder frames removed (%)"), range=[0, 100]),
                  yaxis=dict(title=dict(text=ylabel), rangemode="tozero"), legend=dict(font=dict(size=11)),
                  font=FONT)
    return _figure(data, layout, title=title, subtitle=subtitle, height=height)
