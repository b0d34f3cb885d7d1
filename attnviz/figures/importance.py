"""Figures of head importance: metric-vs-metric scatter, Spearman table, pruning curves, partial pruning.

Pure functions: arrays in, ``go.Figure`` out. Points that stand for a head carry
``customdata = [layer, head]`` (nested lists: plotly.js leaves typed arrays out of click events),
so a click selects the head (:func:`attnviz.figures.spatial.clicked_head` reads it back).

The report views of head importance are registered at the bottom (a recording without the stored
analysis is skipped).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.figures import DIVERGING_SCALE, QUALITATIVE, base_layout

__all__ = [
    "fig_metric_scatter",
    "fig_spearman_table",
    "fig_pruning_curves",
    "fig_partial_pruning",
    "RANDOM_COLOUR",
    "SELECTED_COLOUR",
]

SELECTED_COLOUR = "#e4572e"
RANDOM_COLOUR = "#7f7f7f"


def _layer_colours(n_layers: int) -> list[str]:
    import plotly.colors as pc

    if n_layers <= 1:
        return [pc.sample_colorscale("Viridis", [0.0])[0]]
    return pc.sample_colorscale("Viridis", [i / (n_layers - 1) for i in range(n_layers)])


def fig_metric_scatter(x: np.ndarray, y: np.ndarray, *, x_name: str, y_name: str,
                       selected: tuple[int, int] | None = None, rho: float | None = None,
                       title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """One dot per head: metric ``x`` against metric ``y``, coloured by layer.

    Args:
        x, y: float ``[n_layers, n_heads]``.
        x_name, y_name: axis titles.
        selected: (layer, head) drawn as an open red marker on top.
        rho: Spearman rank correlation to show in the title (None: not shown).

    Returns:
        One ``go.Scatter`` per layer (``customdata`` = [layer, head] per point) and, with
        ``selected``, a last trace marking it.
    """
    xv, yv = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if xv.shape != yv.shape or xv.ndim != 2:
        raise ValueError(f"x and y must both be [n_layers, n_heads], got {xv.shape} and {yv.shape}")
    n_layers, n_heads = xv.shape
    colours = _layer_colours(n_layers)
    fig = go.Figure()
    for layer in range(n_layers):
        fig.add_trace(go.Scatter(
            x=xv[layer].tolist(), y=yv[layer].tolist(), mode="markers", name=f"layer {layer}",
            customdata=[[layer, h] for h in range(n_heads)],
            marker=dict(color=colours[layer], size=9, line=dict(width=0.5, color="white")),
            hovertemplate=(f"layer %{{customdata[0]}}, head %{{customdata[1]}}<br>{x_name}: %{{x:.4g}}"
                           f"<br>{y_name}: %{{y:.4g}}<extra></extra>"),
        ))
    if selected is not None:
        layer, head = selected
        fig.add_trace(go.Scatter(
            x=[float(xv[layer, head])], y=[float(yv[layer, head])], mode="markers", name="selected",
            customdata=[[layer, head]], showlegend=False, hoverinfo="skip",
            marker=dict(symbol="circle-open", size=18, color=SELECTED_COLOUR, line=dict(width=3)),
        ))
    fig.update_xaxes(title=x_name)
    fig.update_yaxes(title=y_name)
    if title is None and rho is not None:
        title = f"Spearman rho = {rho:.2f}" if np.isfinite(rho) else "Spearman rho undefined (a constant metric)"
    base_layout(fig, title=title, height=height or 380, width=width)
    fig.update_layout(legend=dict(title="", itemsizing="constant"), clickmode="event")
    return fig


def fig_spearman_table(names: Sequence[str], rho: np.ndarray, *, highlight: tuple[str, str] | None = None,
                       title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Spearman rank correlations between head metrics as an annotated heatmap (-1 .. 1).

    Args:
        names: metric names, ``[metric]``.
        rho: float ``[metric, metric]`` (NaN cells show "n/a").
        highlight: (x metric, y metric) whose cell is outlined (the pair in the scatter).

    Returns:
        Trace 0 is the ``go.Heatmap`` (z = rho, x = y = names, cell text = rho to 2 decimals);
        clicking a cell gives ``x``/``y`` = the two metric names.
    """
    r = np.asarray(rho, np.float64)
    names = list(names)
    if r.shape != (len(names), len(names)):
        raise ValueError(f"rho must be [{len(names)}, {len(names)}], got {r.shape}")
    text = [["n/a" if not np.isfinite(v) else f"{v:.2f}" for v in row] for row in r]
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isfinite(r), r, np.nan).tolist(), x=names, y=names, zmin=-1, zmax=1,
        colorscale=DIVERGING_SCALE, text=text, texttemplate="%{text}", xgap=1, ygap=1,
        colorbar=dict(title=dict(text="rho", side="right"), thickness=12),
        hovertemplate="%{y} vs %{x}<br>Spearman rho = %{text}<extra></extra>",
    ))
    if highlight is not None and highlight[0] in names and highlight[1] in names:
        fig.add_trace(go.Scatter(x=[highlight[0]], y=[highlight[1]], mode="markers", hoverinfo="skip",
                                 showlegend=False, marker=dict(symbol="square-open", size=34, color=SELECTED_COLOUR,
                                                               line=dict(width=3))))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, tickangle=-30)
    base_layout(fig, title=title, height=height or max(260, 90 + 42 * len(names)), width=width)
    fig.update_layout(clickmode="event")
    return fig


def fig_pruning_curves(fractions: np.ndarray, curves: Mapping[str, np.ndarray], *, random_mean: np.ndarray,
                       random_std: np.ndarray, random_low: np.ndarray | None = None,
                       random_high: np.ndarray | None = None, auc: Mapping[str, float] | None = None,
                       random_auc: tuple[float, float] | None = None, n_heads_total: int | None = None,
                       y_title: str = "accuracy", highlight: str | None = None, title: str | None = None,
                       height: int | None = None, width: int | None = None) -> go.Figure:
    """Iterative pruning curves per metric with the random-order band.

    Args:
        fractions: float ``[step]`` fraction of all heads pruned (x axis, 0 .. 1).
        curves: metric name -> float ``[step]`` accuracy after pruning the least important heads.
        random_mean / random_std: float ``[step]`` over random orders; the band is mean +- std.
        random_low / random_high: float ``[step]`` min / max over the random orders (dotted), optional.
        auc: metric name -> area under its curve (shown in the legend).
        random_auc: (mean, std) of the random curves' AUCs.
        n_heads_total: heads in the stack (hover shows how many were pruned).
        highlight: a metric drawn thicker (e.g. the one the grid shows).

    Returns:
        Traces: [random band upper edge, random band (fill to previous), random mean,
        (random min, random max), one line per metric in ``curves`` order].
    """
    f = np.asarray(fractions, np.float64)
    mean, std = np.asarray(random_mean, np.float64), np.asarray(random_std, np.float64)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=f.tolist(), y=(mean + std).tolist(), mode="lines", line=dict(width=0),
                             hoverinfo="skip", showlegend=False, name="random +1 sd"))
    fig.add_trace(go.Scatter(x=f.tolist(), y=(mean - std).tolist(), mode="lines", line=dict(width=0),
                             fill="tonexty", fillcolor="rgba(127,127,127,0.25)", hoverinfo="skip",
                             name="random mean +- 1 sd", showlegend=True))
    label = "random order (mean)"
    if random_auc is not None:
        label += f", AUC {random_auc[0]:.3f} +- {random_auc[1]:.3f}"
    fig.add_trace(go.Scatter(x=f.tolist(), y=mean.tolist(), mode="lines", name=label,
                             line=dict(color=RANDOM_COLOUR, dash="dash", width=2),
                             hovertemplate="random: %{y:.3f}<extra></extra>"))
    if random_low is not None and random_high is not None:
        for arr, name in ((random_low, "random min"), (random_high, "random max")):
            fig.add_trace(go.Scatter(x=f.tolist(), y=np.asarray(arr, np.float64).tolist(), mode="lines", name=name,
                                     line=dict(color=RANDOM_COLOUR, dash="dot", width=1), showlegend=False,
                                     hovertemplate=f"{name}: %{{y:.3f}}<extra></extra>"))
    pruned = "" if n_heads_total is None else " (%{customdata} heads)"
    for i, (name, values) in enumerate(curves.items()):
        label = name if not auc or name not in auc else f"{name}, AUC {auc[name]:.3f}"
        fig.add_trace(go.Scatter(
            x=f.tolist(), y=np.asarray(values, np.float64).tolist(), mode="lines+markers", name=label,
            line=dict(color=QUALITATIVE[i % len(QUALITATIVE)], width=4 if name == highlight else 2),
            marker=dict(size=5),
            customdata=None if n_heads_total is None else np.rint(f * n_heads_total).astype(int).tolist(),
            hovertemplate=f"{name}<br>pruned %{{x:.0%}}{pruned}<br>{y_title}: %{{y:.3f}}<extra></extra>",
        ))
    fig.update_xaxes(title="fraction of heads pruned (least important first)", tickformat=".0%", range=[-0.02, 1.02])
    fig.update_yaxes(title=y_title)
    base_layout(fig, title=title, height=height or 420, width=width)
    # traceorder normal: with a filled band plotly would list the legend bottom-up
    fig.update_layout(legend=dict(orientation="v", x=1.02, y=1, xanchor="left", traceorder="normal"),
                      hovermode="x unified")
    return fig


def fig_partial_pruning(fractions: np.ndarray, accuracy: np.ndarray, *, layer: int, head: int,
                        base_accuracy: float | None = None, kl: np.ndarray | None = None,
                        y_title: str = "accuracy", title: str | None = None, height: int | None = None,
                        width: int | None = None) -> go.Figure:
    """Partial pruning of one head: accuracy (and KL) against the kept fraction p of each attention row.

    Args:
        fractions: float ``[p]`` keep fractions (1.0 = intact, down to 0.1); the x axis runs from
            1.0 (left) to the smallest p (right).
        accuracy: float ``[p]``.
        base_accuracy: the unablated model (a horizontal line).
        kl: float ``[p]`` KL divergence from the unablated output (right axis), optional.

    Returns:
        Trace 0 = accuracy; then KL (``yaxis="y2"``) when given.
    """
    p = np.asarray(fractions, np.float64)
    fig = go.Figure(go.Scatter(x=p.tolist(), y=np.asarray(accuracy, np.float64).tolist(), mode="lines+markers",
                               name=y_title, line=dict(color="#3b6fb6", width=3),
                               hovertemplate=f"keep %{{x:.0%}}<br>{y_title}: %{{y:.3f}}<extra></extra>"))
    if kl is not None:
        fig.add_trace(go.Scatter(x=p.tolist(), y=np.asarray(kl, np.float64).tolist(), mode="lines+markers",
                                 name="KL (nats)", yaxis="y2", line=dict(color="#f28e2b", width=2, dash="dot"),
                                 hovertemplate="keep %{x:.0%}<br>KL: %{y:.4g} nats<extra></extra>"))
        fig.update_layout(yaxis2=dict(title="KL divergence (nats)", overlaying="y", side="right", showgrid=False,
                                      rangemode="tozero"))
    if base_accuracy is not None:
        fig.add_hline(y=base_accuracy, line=dict(color=RANDOM_COLOUR, dash="dash", width=1),
                      annotation_text="unablated", annotation_position="bottom left")
    fig.update_xaxes(title="kept fraction p of each attention row", tickformat=".0%", autorange="reversed",
                     dtick=0.1 if len(p) <= 12 else None)
    fig.update_layout(yaxis_title=y_title)  # not update_yaxes: that would rename the KL axis too
    base_layout(fig, title=title if title is not None else f"Layer {layer}, head {head}: partial pruning",
                height=height or 340, width=width)
    fig.update_layout(legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))
    return fig
