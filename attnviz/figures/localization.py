"""Figures of the localization scores (see :mod:`attnviz.analysis.localization` for the definitions)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import make_figure

__all__ = ["fig_localization", "fig_localization_by_layer"]

_ENERGY = "#4e79a7"
_HIT = "#f28e2b"


def fig_localization(head_energy: np.ndarray, head_hit: np.ndarray, *, method_energy: Mapping[str, float],
                     method_hit: Mapping[str, float], baseline_energy: float, baseline_pointing: float,
                     n_images: int, selected: tuple[int, int] | None = None, title: str | None = None,
                     height: int | None = None) -> go.Figure:
    """Energy inside the mask and pointing-game hit rate, side by side, for: each attribution method, the
    best head, the median head, the selected head; with the uniform baselines as dashed lines.

    Args:
        head_energy, head_hit: float ``[layer, head]``.
        method_energy, method_hit: attribution method -> score.
        selected: (layer, head) to add as a row.
    """
    e = np.asarray(head_energy, np.float64)
    h = np.asarray(head_hit, np.float64)
    rows: list[tuple[str, float, float]] = []
    for m in sorted(method_energy):
        rows.append((m, float(method_energy[m]), float(method_hit.get(m, np.nan))))
    if np.isfinite(e).any():
        best = np.unravel_index(int(np.nanargmax(e)), e.shape)
        rows.append((f"best head L{best[0]} H{best[1]}", float(e[best]), float(h[best])))
        rows.append(("median head", float(np.nanmedian(e)), float(np.nanmedian(h))))
    if selected is not None and 0 <= selected[0] < e.shape[0] and 0 <= selected[1] < e.shape[1]:
        rows.append((f"selected L{selected[0]} H{selected[1]}", float(e[selected]), float(h[selected])))
    labels = [r[0] for r in rows][::-1]
    energy = [r[1] for r in rows][::-1]
    hit = [r[2] for r in rows][::-1]
    data = [
        dict(type="bar", orientation="h", y=labels, x=energy, name="energy inside the mask", marker=dict(color=_ENERGY),
             xaxis="x", yaxis="y", hovertemplate="%{y}: energy %{x:.3f}<extra></extra>",
             text=[f"{v:.2f}" for v in energy], textposition="outside"),
        dict(type="bar", orientation="h", y=labels, x=hit, name="pointing-game hit rate", marker=dict(color=_HIT),
             xaxis="x2", yaxis="y", hovertemplate="%{y}: hit rate %{x:.3f}<extra></extra>",
             text=[f"{v:.2f}" for v in hit], textposition="outside"),
    ]
    shapes = [dict(type="line", xref="x", yref="paper", x0=baseline_energy, x1=baseline_energy, y0=0, y1=1,
                   line=dict(color=_ENERGY, dash="dash", width=1.5)),
              dict(type="line", xref="x2", yref="paper", x0=baseline_pointing, x1=baseline_pointing, y0=0, y1=1,
                   line=dict(color=_HIT, dash="dash", width=1.5))]
    annotations = [dict(text=f"uniform {baseline_energy:.2f}", x=baseline_energy, xref="x", y=1.0, yref="paper",
                        yanchor="bottom", showarrow=False, font=dict(size=10, color=_ENERGY)),
                   dict(text=f"random point {baseline_pointing:.2f}", x=baseline_pointing, xref="x2", y=1.0,
                        yref="paper", yanchor="bottom", showarrow=False, font=dict(size=10, color=_HIT))]
    layout = dict(
        xaxis=dict(domain=[0.0, 0.47], range=[0, 1.12], title="energy inside the mask (Score-CAM)"),
        xaxis2=dict(domain=[0.53, 1.0], range=[0, 1.12], title="pointing-game hit rate (Zhang et al.)"),
        yaxis=dict(automargin=True), barmode="group", shapes=shapes, annotations=annotations,
        legend=dict(orientation="h", y=-0.25), bargap=0.35)
    return make_figure(data, layout, title=title or f"How much falls on the object ({n_images} images with masks)",
                       height=height or max(260, 60 + 34 * len(rows)))


def fig_localization_by_layer(head_energy: np.ndarray, *, baseline_energy: float,
                              selected: tuple[int, int] | None = None, title: str | None = None) -> go.Figure:
    """Each head's energy inside the mask as a dot per layer (customdata [layer, head]: a click selects it),
    with the uniform baseline dashed."""
    e = np.asarray(head_energy, np.float64)
    n_layers, n_heads = e.shape
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    jitter = (head - (n_heads - 1) / 2) * (0.5 / max(n_heads, 1))
    data = [dict(type="scatter", x=layer + jitter, y=e.ravel(), mode="markers", name="heads",
                 customdata=np.stack([layer, head], 1), marker=dict(size=9, color=_ENERGY, opacity=0.8),
                 hovertemplate="L%{customdata[0]} H%{customdata[1]}: energy %{y:.3f}<extra></extra>")]
    if selected is not None:
        data.append(dict(type="scatter", x=[selected[0] + jitter[selected[0] * n_heads + selected[1]]],
                         y=[e[selected]], mode="markers", name="selected", hoverinfo="skip",
                         marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=2, color="#d62728"))))
    layout = dict(xaxis=dict(title="layer", tickmode="array", tickvals=list(range(n_layers))),
                  yaxis=dict(title="energy inside the mask", range=[0, 1.02]),
                  shapes=[dict(type="line", xref="paper", x0=0, x1=1, y0=baseline_energy, y1=baseline_energy,
                               line=dict(dash="dash", color="#888"))],
                  annotations=[dict(text=f"uniform attention {baseline_energy:.2f}", x=1, xref="paper",
                                    y=baseline_energy, yanchor="bottom", xanchor="right", showarrow=False,
                                    font=dict(size=10, color="#666"))],
                  showlegend=False)
    return make_figure(data, layout, title=title or "CLS attention on the object, per head", height=320)
