"""Figures of the attention pattern atlas (see :mod:`attnviz.analysis.patterns` for the method).

Pure functions: arrays in, ``go.Figure`` out (no Dash, no h5py). Conventions:

- Clusters have fixed colours (:func:`cluster_colours`, noise grey) shared by every figure.
- Maps are drawn as heatmaps with row 0 at the top (image convention); positions that do not exist for
  a query (outside the image) are NaN, drawn blank. The query is marked with a white-edged cross.
- Figures whose points stand for heads carry ``customdata = [layer, head]`` as nested lists (plotly.js
  leaves numpy typed arrays out of click events); :func:`clicked_head` reads it back. Dash's click
  events leave out the ``customdata`` of heatmap cells, so clicks on heatmaps are read from ``x``/``y``:
  :func:`grid_head` (the dominant-cluster grid) and :func:`gallery_tile` (the prototype gallery).
- The UMAP scatter has one ``Scattergl`` trace per colour group; :func:`scatter_groups` gives the atlas
  indices of each trace so that click/lasso events (``curveNumber``, ``pointIndex``) map back to maps
  (:func:`selected_maps`).

The report views of the atlas are registered at the bottom (skipped when the recording has no cached atlas).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnviz.figures import HEAT_SCALE, base_layout, fig_message

__all__ = [
    "NOISE_COLOUR",
    "COLOR_BY",
    "cluster_colours",
    "cluster_label",
    "scatter_groups",
    "selected_maps",
    "clicked_head",
    "gallery_tile",
    "grid_head",
    "fig_pattern_scatter",
    "highlight_trace",
    "fig_map_pairs",
    "fig_prototype_gallery",
    "fig_dominant_grid",
    "fig_head_mix",
    "fig_head_dendrogram",
    "fig_training",
]

NOISE_COLOUR = "#b5b5b5"
SELECTED_COLOUR = "#e4572e"
#: what the scatter can be coloured by
COLOR_BY = ("cluster", "layer", "head", "image", "error")
_QUERY_MARKER = dict(symbol="x-thin", size=11, color="white", line=dict(width=3, color="white"))


def cluster_colours(n_clusters: int) -> list[str]:
    """One colour per cluster 0..K-1 (qualitative palettes, then samples of Turbo beyond 30)."""
    import plotly.colors as pc

    base = list(pc.qualitative.Plotly) + list(pc.qualitative.D3) + list(pc.qualitative.Set2)
    if n_clusters <= len(base):
        return base[:n_clusters]
    return pc.sample_colorscale("Turbo", [i / max(n_clusters - 1, 1) for i in range(n_clusters)])


def cluster_label(cluster: int, facts: dict[str, Any] | None = None) -> str:
    """Short name of a cluster, e.g. ``"C2 local"``; a guess from the prototype's facts
    (:func:`attnviz.analysis.patterns.describe_prototype`), "noise" for -1."""
    if cluster < 0:
        return "noise"
    name = f"C{cluster}"
    if not facts:
        return name
    return f"{name} {_describe(facts)}"


def _describe(f: dict[str, Any]) -> str:
    """Heuristic words for a prototype: prefix, broad, local, or where it peaks."""
    if f.get("prefix", 0) >= 0.5 and f.get("prefix", 0) >= f.get("peak_value", 0):
        return "prefix/CLS"
    if "peak_offset" in f:
        if f.get("spread", 0) > 0 and f.get("flatness", 0) >= 0.5:
            return "broad"
        spread_out = f.get("peak_share", 1) < 0.3 and f.get("spread", 0) > 1.5
        if spread_out and f.get("row_share", 0) >= 0.6:
            return "row band"
        if spread_out and f.get("column_share", 0) >= 0.6:
            return "column band"
        dy, dx = f["peak_offset"]
        if (dy, dx) == (0, 0):
            return "self/local" if f.get("spread", 99) <= 1.5 else "centred, wide"
        return f"offset ({dy:+d},{dx:+d})"
    if f.get("flatness", 0) >= 0.5:
        return "broad"
    py, px = f.get("peak_position", (0, 0))
    return f"peak at ({py},{px})"


# -- the UMAP scatter ------------------------------------------------------------------------


def scatter_groups(color_by: str, cluster: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The traces of :func:`fig_pattern_scatter`, in order, as (name, atlas indices ``[m]``).

    By cluster: one trace per cluster 0..K-1, then noise (-1) when present. Otherwise one trace of all maps.
    """
    cluster = np.asarray(cluster)
    if color_by != "cluster":
        return [("maps", np.arange(len(cluster)))]
    groups = [(f"C{c}", np.flatnonzero(cluster == c)) for c in range(int(cluster.max(initial=-1)) + 1)]
    if (cluster < 0).any():
        groups.append(("noise", np.flatnonzero(cluster < 0)))
    return groups


def selected_maps(event: Any, color_by: str, cluster: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Atlas indices of the points in a click/selection event of :func:`fig_pattern_scatter`
    (``clickData`` or ``selectedData``); points of the highlight trace are ignored."""
    try:
        points = event["points"]
    except (TypeError, KeyError):
        return np.zeros(0, np.int64)
    groups = scatter_groups(color_by, cluster)
    out: list[int] = []
    for p in points or []:
        try:
            curve, i = int(p["curveNumber"]), int(p.get("pointIndex", p.get("pointNumber")))
        except (TypeError, KeyError, ValueError):
            continue
        if 0 <= curve < len(groups) and 0 <= i < len(groups[curve][1]):
            out.append(int(groups[curve][1][i]))
    idx = np.asarray(out, np.int64)
    return idx if limit is None else idx[:limit]


def fig_pattern_scatter(embedding: np.ndarray, *, cluster: np.ndarray, layer: np.ndarray, head: np.ndarray,
                        sample: np.ndarray, query: np.ndarray, grid: tuple[int, int], color_by: str = "cluster",
                        error: np.ndarray | None = None, cluster_names: Sequence[str] | None = None,
                        highlight: Sequence[int] | None = None, title: str | None = None,
                        height: int | None = None, width: int | None = None) -> go.Figure:
    """UMAP of the latent codes: one WebGL point per map (fast at tens of thousands of points).

    Args:
        embedding: float ``[N, 2]``.
        cluster, layer, head, sample, query: int ``[N]`` (query: patch index on ``grid``).
        grid: (gh, gw), to show the query as (row, column) in the hover.
        color_by: "cluster" (one trace per cluster, legend toggles them), "layer", "head", "image" or
            "error" (one trace, a colour scale; "error" needs ``error`` ``[N]``).
        cluster_names: legend names per cluster (default "C0", "C1", ...).
        highlight: atlas indices drawn as open red circles on top (e.g. the selected head's maps);
            when not None the highlight trace is always there (possibly empty), as the last trace.

    Returns:
        Traces in the order of :func:`scatter_groups`, then the highlight trace when given.
        Each point's hover shows layer, head, image, query and cluster (``customdata`` ``[m, 6]`` per
        trace: layer, head, image, query row, query column, cluster); map a point back to the atlas
        with :func:`selected_maps`. Drag mode is lasso.
    """
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, not {color_by!r}")
    emb = np.asarray(embedding, np.float32)
    cluster = np.asarray(cluster)
    qy, qx = np.divmod(np.asarray(query), grid[1])
    custom = np.stack([layer, head, sample, qy, qx, cluster], 1)
    # int16 where it fits: tens of thousands of points, and this is most of the figure's bytes
    custom = custom.astype(np.int16 if np.abs(custom).max(initial=0) < 2**15 else np.int32)
    hover = ("layer %{customdata[0]}, head %{customdata[1]}<br>image %{customdata[2]}, "
             "query (%{customdata[3]}, %{customdata[4]})<br>cluster %{customdata[5]}")
    n = len(emb)
    size = 6 if n < 2000 else 4 if n < 20000 else 3
    fig = go.Figure()
    groups = scatter_groups(color_by, cluster)
    if color_by == "cluster":
        colours = cluster_colours(int(cluster.max(initial=-1)) + 1)
        for name, idx in groups:
            c = int(cluster[idx[0]]) if len(idx) else -1
            label = (cluster_names[c] if cluster_names is not None and c >= 0 else name) + f" ({len(idx)})"
            fig.add_trace(go.Scattergl(
                x=emb[idx, 0], y=emb[idx, 1], mode="markers", name=label, customdata=custom[idx],
                marker=dict(size=size, color=colours[c] if c >= 0 else NOISE_COLOUR, opacity=0.75),
                hovertemplate=hover + "<extra></extra>"))
    else:
        values = {"layer": layer, "head": head, "image": sample, "error": error}[color_by]
        if values is None:
            raise ValueError("color_by='error' needs error")
        fig.add_trace(go.Scattergl(
            x=emb[:, 0], y=emb[:, 1], mode="markers", name="maps", customdata=custom, showlegend=False,
            marker=dict(size=size, color=np.asarray(values, np.float32), opacity=0.75,
                        colorscale="Viridis" if color_by != "error" else "Magma_r",
                        colorbar=dict(title=dict(text="reconstruction error" if color_by == "error" else color_by,
                                                 side="right"), thickness=12)),
            hovertemplate=hover + f"<br>{color_by}: %{{marker.color:.4g}}<extra></extra>"))
    if highlight is not None:
        fig.add_trace(highlight_trace(emb, highlight, n))
    fig.update_xaxes(title="UMAP 1", showticklabels=False, zeroline=False)
    fig.update_yaxes(title="UMAP 2", showticklabels=False, zeroline=False)
    base_layout(fig, title=title, height=height or 520, width=width)
    fig.update_layout(dragmode="lasso", clickmode="event+select", legend=dict(itemsizing="constant"),
                      uirevision="patterns-scatter")
    return fig


def highlight_trace(embedding: np.ndarray, highlight: Sequence[int], n_points: int | None = None,
                    name: str = "selected") -> go.Scattergl:
    """The open red circles :func:`fig_pattern_scatter` draws on top of ``highlight`` (atlas indices;
    may be empty). A page can replace just this last trace (a ``dash.Patch``) when only it changes."""
    emb = np.asarray(embedding, np.float32)
    h = np.asarray(highlight, np.int64).reshape(-1)
    n = len(emb) if n_points is None else n_points
    size = 6 if n < 2000 else 4 if n < 20000 else 3
    return go.Scattergl(x=emb[h, 0], y=emb[h, 1], mode="markers", name=name, hoverinfo="skip", showlegend=False,
                        marker=dict(size=size + 7, color="rgba(0,0,0,0)", line=dict(width=1.5, color=SELECTED_COLOUR)))


# -- maps ------------------------------------------------------------------------------------


def _blank_invalid(maps: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    m = np.asarray(maps, np.float64)
    return m if masks is None else np.where(np.asarray(masks) > 0, m, np.nan)


def fig_map_pairs(raw: np.ndarray, query: np.ndarray, grid: tuple[int, int], inputs: np.ndarray,
                  recon: np.ndarray, masks: np.ndarray | None = None, *, mode: str = "centred",
                  raw_prefix: np.ndarray | None = None, input_prefix: np.ndarray | None = None,
                  recon_prefix: np.ndarray | None = None, titles: Sequence[str] | None = None,
                  title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Selected maps, one row each: the raw map on the patch grid (query marked), the autoencoder's
    input (query-centred, scaled; centred mode only) and its reconstruction.

    Args:
        raw: float ``[n, gh, gw]`` probabilities; query: int ``[n]`` patch index; grid: (gh, gw).
        inputs, recon: float ``[n, H, W]`` (``H, W`` = ``2gh-1, 2gw-1`` centred, ``gh, gw`` absolute).
        masks: ``[n, H, W]`` validity (invalid cells blank), or None.
        raw_prefix / input_prefix / recon_prefix: ``[n]`` prefix (CLS) masses shown in the panel titles.
        titles: one label per row (e.g. "L3 H1 image 12").

    Returns:
        ``make_subplots`` figure: heatmap traces row by row (raw, [input,] reconstruction), then the
        query markers; raw maps share colour axis 1 (attention), inputs and reconstructions share
        colour axis 2 (scaled), so a reconstruction is read against its input on the same scale.
    """
    raw = np.asarray(raw, np.float64)
    n = len(raw)
    if n == 0:
        return fig_message("Click or lasso points in the scatter to see their maps.", height=height or 260)
    gh, gw = grid
    cols = 3 if mode == "centred" else 2
    qy, qx = np.divmod(np.asarray(query), gw)
    labels = list(titles) if titles is not None else [f"map {i}" for i in range(n)]

    def pre(a: np.ndarray | None, i: int) -> str:
        return "" if a is None else f" · CLS {float(a[i]):.2f}"

    sub = []
    for i in range(n):
        row = [f"{labels[i]}: raw{pre(raw_prefix, i)}"]
        if cols == 3:
            row.append(f"input (centred){pre(input_prefix, i)}")
        row.append(f"reconstruction{pre(recon_prefix, i)}")
        sub.extend(row)
    fig = make_subplots(rows=n, cols=cols, subplot_titles=sub, horizontal_spacing=0.06,
                        vertical_spacing=min(0.08, 0.3 / max(n, 1)))
    inp = _blank_invalid(inputs, masks)
    rec = _blank_invalid(recon, masks)
    for i in range(n):
        fig.add_trace(go.Heatmap(z=raw[i], coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}: %{z:.4f}<extra>raw</extra>"), row=i + 1, col=1)
        panels = [(inp[i], "input")] if cols == 3 else []
        panels.append((rec[i], "reconstruction"))
        for j, (z, name) in enumerate(panels):
            if mode == "centred":
                h, w = z.shape
                fig.add_trace(go.Heatmap(z=z, x=np.arange(w) - (w // 2), y=np.arange(h) - (h // 2),
                                         coloraxis="coloraxis2",
                                         hovertemplate="offset (%{y}, %{x}): %{z:.3f}<extra>" + name + "</extra>"),
                              row=i + 1, col=2 + j)
            else:
                fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis2",
                                         hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra>" + name + "</extra>"),
                              row=i + 1, col=2 + j)
    for i in range(n):
        fig.add_trace(go.Scatter(x=[int(qx[i])], y=[int(qy[i])], mode="markers", marker=_QUERY_MARKER,
                                 hoverinfo="skip", showlegend=False), row=i + 1, col=1)
        if mode == "centred":
            for j in range(cols - 1):
                fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", marker=_QUERY_MARKER, hoverinfo="skip",
                                         showlegend=False), row=i + 1, col=2 + j)
    fig.update_yaxes(autorange="reversed", showgrid=False, zeroline=False, constrain="domain")
    fig.update_xaxes(showgrid=False, zeroline=False, constrain="domain")
    for i in range(n):
        for j in range(cols):
            k = i * cols + j + 1
            fig.update_yaxes(scaleanchor=f"x{'' if k == 1 else k}", row=i + 1, col=j + 1)
    fig.update_layout(coloraxis=dict(colorscale=HEAT_SCALE, colorbar=dict(title="attention", x=1.0, len=0.45, y=0.78,
                                                                          thickness=10)),
                      coloraxis2=dict(colorscale=HEAT_SCALE, cmin=0, cmax=1,
                                      colorbar=dict(title="scaled", x=1.0, len=0.45, y=0.22, thickness=10)))
    fig.update_annotations(font_size=11)
    base_layout(fig, title=title, height=height or 80 + 230 * n, width=width)
    return fig


def fig_prototype_gallery(prototypes: np.ndarray, *, sizes: np.ndarray, prefix: np.ndarray | None = None,
                          nearest: np.ndarray | None = None, nearest_masks: np.ndarray | None = None,
                          names: Sequence[str] | None = None, mode: str = "centred", title: str | None = None,
                          height: int | None = None, width: int | None = None) -> go.Figure:
    """The prototype gallery as ONE heatmap (a facet image): one row per cluster, its decoded prototype
    first, then the real maps nearest its centroid.

    Args:
        prototypes: float ``[K, H, W]`` (decoded centroids, scaled).
        sizes: int ``[K]``: maps per cluster (shown with the share in the row label).
        prefix: ``[K]`` prototype prefix (CLS) masses, shown in the row label.
        nearest: float ``[K, m, H, W]`` real maps (scaled inputs), NaN-padded where a cluster has fewer.
        nearest_masks: ``[K, m, H, W]`` validity of those maps (invalid cells blank), or None.
        names: row labels (default "C0", ...).

    Returns:
        trace 0: a light grey backdrop under the tiles; trace 1: the mosaic ``go.Heatmap`` (tiles
        separated by a blank line; ``customdata`` per cell = [cluster, column]: column 0 is the
        prototype, 1.. the nearest maps); trace 2: markers on the query (the centre of every tile,
        centred mode). A bar in the cluster's colour (a layout shape)
        stands left of each row.
    """
    protos = np.asarray(prototypes, np.float64)
    k, h, w = protos.shape
    m = 0 if nearest is None else nearest.shape[1]
    cols = 1 + m
    gap = 1
    z = np.full((k * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    cd_cluster = np.full(z.shape, -1, np.int32)
    cd_col = np.full(z.shape, -1, np.int32)
    for c in range(k):
        r0 = c * (h + gap)
        tiles = [protos[c]]
        for j in range(m):
            t = np.asarray(nearest[c, j], np.float64)
            if nearest_masks is not None:
                t = np.where(nearest_masks[c, j] > 0, t, np.nan)
            tiles.append(t)
        for j, t in enumerate(tiles):
            c0 = j * (w + gap)
            z[r0 : r0 + h, c0 : c0 + w] = t
            cd_cluster[r0 : r0 + h, c0 : c0 + w] = c
            cd_col[r0 : r0 + h, c0 : c0 + w] = j
    custom = np.stack([cd_cluster, cd_col], -1).tolist()
    total = max(int(np.sum(sizes)), 1)
    labels = []
    for c in range(k):
        base = names[c] if names is not None else f"C{c}"
        extra = f" · CLS {float(prefix[c]):.2f}" if prefix is not None else ""
        labels.append(f"{base}<br>{int(sizes[c])} maps ({sizes[c] / total:.0%}){extra}")
    # light grey under every tile, so positions outside the image (NaN) read as "none", not as a gap
    backdrop = np.where(cd_cluster >= 0, 0.0, np.nan)
    fig = go.Figure(go.Heatmap(z=backdrop, colorscale=[[0, "#ececec"], [1, "#ececec"]], showscale=False,
                               hoverinfo="skip"))
    fig.add_trace(go.Heatmap(z=z, colorscale=HEAT_SCALE, zmin=0, zmax=1, customdata=custom,
                               colorbar=dict(title=dict(text="scaled attention", side="right"), thickness=10),
                               hovertemplate="cluster %{customdata[0]}, tile %{customdata[1]}: %{z:.3f}<extra></extra>"))
    if mode == "centred":
        xs = [j * (w + gap) + w // 2 for c in range(k) for j in range(cols)]
        ys = [c * (h + gap) + h // 2 for c in range(k) for j in range(cols)]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", hoverinfo="skip", showlegend=False,
                                 marker=dict(symbol="x-thin", size=6, color="white", line=dict(width=1.5, color="white"))))
    for c, colour in enumerate(cluster_colours(k)):
        r0 = c * (h + gap)
        fig.add_shape(type="rect", x0=-2.5, x1=-1.0, y0=r0 - 0.5, y1=r0 + h - 0.5, fillcolor=colour, line_width=0)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=[c * (h + gap) + (h - 1) / 2 for c in range(k)],
                     ticktext=labels, showgrid=False, zeroline=False, scaleanchor="x")
    fig.update_xaxes(tickmode="array", tickvals=[j * (w + gap) + (w - 1) / 2 for j in range(cols)],
                     ticktext=["prototype"] + [f"nearest {j}" for j in range(1, cols)], side="top",
                     showgrid=False, zeroline=False, range=[-3.5, z.shape[1] - 0.5])
    base_layout(fig, title=title, height=height or max(260, 70 + 70 * k * max(1.0, h / 14)), width=width)
    fig.update_layout(margin=dict(l=150))
    return fig


# -- heads -------------------------------------------------------------------------------------


def _head_rank_order(head_order: np.ndarray, n_layers: int, n_heads: int) -> np.ndarray:
    """``[L, H]``: for each layer, its heads sorted by their position in the global leaf order."""
    rank = np.empty(n_layers * n_heads, np.int64)
    rank[np.asarray(head_order)] = np.arange(n_layers * n_heads)
    return np.argsort(rank.reshape(n_layers, n_heads), axis=1, kind="stable")


def fig_dominant_grid(dominant: np.ndarray, mix: np.ndarray, *, head_order: np.ndarray | None = None,
                      selected: tuple[int, int] | None = None, names: Sequence[str] | None = None,
                      title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Layers x heads coloured by each head's dominant cluster, as one heatmap.

    Args:
        dominant: int ``[L, H]``: cluster with the largest share of the head's maps.
        mix: float ``[L, H, K]``: the pattern mixes (the dominant share is written in the cell).
        head_order: flat head order ``[L*H]`` (``l*H + h``) from the hierarchical clustering; when given,
            each layer's heads are arranged left to right in that order (x is then a slot, not a head
            index; hover and ``customdata`` name the real head), so heads that behave alike sit together.
        selected: (layer, head) outlined.
        names: cluster names for the hover.

    Returns:
        trace 0: ``go.Heatmap`` with ``customdata[l][slot] = [layer, head]`` (lists, for click events);
        trace 1 (when ``selected``): the outline.
    """
    dom = np.asarray(dominant, np.int64)
    mix = np.asarray(mix, np.float64)
    n_layers, n_heads, k = mix.shape
    order = _head_rank_order(head_order, n_layers, n_heads) if head_order is not None else \
        np.tile(np.arange(n_heads), (n_layers, 1))
    heads = order
    layers = np.repeat(np.arange(n_layers)[:, None], n_heads, 1)
    z = dom[layers, heads].astype(np.float64)
    share = mix[layers, heads, dom[layers, heads]]
    colours = cluster_colours(max(k, 1))
    # a stepped colour scale: value c -> colour of cluster c
    scale = []
    for c in range(k):
        lo, hi = c / k, (c + 1) / k
        scale += [[lo, colours[c]], [hi, colours[c]]]
    names = list(names) if names is not None else [f"C{c}" for c in range(k)]
    text = [[f"{share[i, j]:.0%}" for j in range(n_heads)] for i in range(n_layers)]
    hover = [[f"layer {i}, head {heads[i, j]}<br>{names[int(z[i, j])]}: {share[i, j]:.0%} of its maps"
              for j in range(n_heads)] for i in range(n_layers)]
    custom = np.stack([layers, heads], -1).tolist()
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(n_heads), y=np.arange(n_layers), colorscale=scale, zmin=-0.5, zmax=k - 0.5,
        customdata=custom, text=text, texttemplate="%{text}" if n_heads * n_layers <= 400 else None,
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", xgap=1, ygap=1,
        colorbar=dict(title=dict(text="dominant cluster", side="right"), thickness=12, tickmode="array",
                      tickvals=list(range(k)), ticktext=names)))
    if selected is not None:
        layer, head = selected
        if 0 <= layer < n_layers and 0 <= head < n_heads:
            slot = int(np.flatnonzero(heads[layer] == head)[0])
            fig.add_trace(go.Scatter(x=[slot], y=[layer], mode="markers", hoverinfo="skip", showlegend=False,
                                     marker=dict(symbol="square-open", size=max(8, min(40, 360 // max(n_heads, n_layers))),
                                                 color=SELECTED_COLOUR, line=dict(width=3))))
    xtitle = "heads, ordered by pattern mix within each layer" if head_order is not None else "head"
    fig.update_xaxes(title=xtitle, showgrid=False, zeroline=False, range=[-0.5, n_heads - 0.5],
                     showticklabels=head_order is None, dtick=1 if n_heads <= 24 else None)
    fig.update_yaxes(title="layer", autorange="reversed", showgrid=False, zeroline=False,
                     dtick=1 if n_layers <= 32 else None)
    base_layout(fig, title=title, height=height or max(220, 60 + 26 * n_layers), width=width)
    fig.update_layout(clickmode="event")
    return fig


def fig_head_mix(mix: np.ndarray, *, labels: Sequence[str], noise: np.ndarray | None = None,
                 names: Sequence[str] | None = None, highlight: int | None = None, title: str | None = None,
                 customdata: Sequence[Sequence[int]] | None = None, height: int | None = None,
                 width: int | None = None) -> go.Figure:
    """Pattern mixes as horizontal stacked bars, one bar per head.

    Args:
        mix: float ``[m, K]`` (rows: heads; each row + its noise sums to 1), or ``[K]`` for one head.
        labels: ``[m]`` bar labels (e.g. "L3 H1").
        noise: ``[m]`` share of maps HDBSCAN left unclustered, or None.
        names: cluster names (legend).
        highlight: row drawn with a bold label (the selected head).
        customdata: ``[m]`` of [layer, head] per bar, for clicks.

    Returns:
        one ``go.Bar`` trace per cluster (``x`` = shares of the m heads), then noise.
    """
    mix = np.atleast_2d(np.asarray(mix, np.float64))
    m, k = mix.shape
    colours = cluster_colours(k)
    names = list(names) if names is not None else [f"C{c}" for c in range(k)]
    ylab = [f"<b>{lab}</b>" if i == highlight else lab for i, lab in enumerate(labels)]
    fig = go.Figure()
    cd = [list(map(int, c)) for c in customdata] if customdata is not None else None
    for c in range(k):
        fig.add_trace(go.Bar(x=mix[:, c], y=ylab, orientation="h", name=names[c], marker_color=colours[c],
                             customdata=cd, hovertemplate=f"%{{y}}: {names[c]} %{{x:.0%}}<extra></extra>"))
    if noise is not None and np.any(np.asarray(noise) > 0):
        fig.add_trace(go.Bar(x=np.asarray(noise, np.float64).reshape(-1), y=ylab, orientation="h", name="noise",
                             marker_color=NOISE_COLOUR, customdata=cd,
                             hovertemplate="%{y}: noise %{x:.0%}<extra></extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.15, traceorder="normal"))
    fig.update_xaxes(title="share of the head's maps", range=[0, 1], tickformat=".0%")
    fig.update_yaxes(autorange="reversed")
    base_layout(fig, title=title, height=height or max(200, 110 + 26 * m), width=width)
    return fig


def fig_head_dendrogram(linkage: np.ndarray, *, n_heads: int, dominant: np.ndarray | None = None,
                        selected: tuple[int, int] | None = None, names: Sequence[str] | None = None,
                        title: str | None = None, height: int | None = None, width: int | None = None) -> go.Figure:
    """Dendrogram of the heads, clustered by their pattern mix (average linkage, Hellinger distance).

    Args:
        linkage: scipy linkage ``[L*H-1, 4]`` over flat head indices ``l * n_heads + h``.
        n_heads: heads per layer (to name the leaves "L3 H1").
        dominant: int ``[L, H]`` dominant cluster: leaves are coloured by it.
        selected: (layer, head) whose leaf is outlined.

    Returns:
        trace 0: the tree as one line trace (segments separated by None); trace 1: the leaves as markers
        with ``customdata = [layer, head]`` (lists, for click events); trace 2 (when ``selected``): outline.
    """
    from scipy.cluster.hierarchy import dendrogram

    z = np.asarray(linkage, np.float64)
    n = len(z) + 1
    if n < 2:
        return fig_message("One head: nothing to cluster.", height=height or 260)
    d = dendrogram(z, no_plot=True)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for ic, dc in zip(d["icoord"], d["dcoord"]):
        xs += list(ic) + [None]
        ys += list(dc) + [None]
    leaves = np.asarray(d["leaves"])
    lx = 5 + 10 * np.arange(n)
    layer, head = np.divmod(leaves, n_heads)
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#555", width=1), hoverinfo="skip",
                               showlegend=False))
    if dominant is not None:
        dom = np.asarray(dominant)[layer, head]
        k = int(np.asarray(dominant).max()) + 1
        colours = cluster_colours(k)
        col = [colours[int(c)] for c in dom]
        nm = list(names) if names is not None else [f"C{c}" for c in range(k)]
        text = [f"layer {l_}, head {h_}<br>dominant: {nm[int(c)]}" for l_, h_, c in zip(layer, head, dom)]
    else:
        col = "#4e79a7"
        text = [f"layer {l_}, head {h_}" for l_, h_ in zip(layer, head)]
    fig.add_trace(go.Scatter(x=lx, y=np.zeros(n), mode="markers", marker=dict(size=9 if n <= 150 else 6, color=col,
                                                                               line=dict(width=0.5, color="#333")),
                             customdata=np.stack([layer, head], 1).tolist(), hovertext=text,
                             hovertemplate="%{hovertext}<extra></extra>", showlegend=False))
    if selected is not None:
        pos = np.flatnonzero((layer == selected[0]) & (head == selected[1]))
        if len(pos):
            fig.add_trace(go.Scatter(x=[lx[pos[0]]], y=[0], mode="markers", hoverinfo="skip", showlegend=False,
                                     marker=dict(symbol="circle-open", size=18, color=SELECTED_COLOUR,
                                                 line=dict(width=3))))
    show_labels = n <= 64
    fig.update_xaxes(tickmode="array", tickvals=lx.tolist() if show_labels else [],
                     ticktext=[f"L{a}H{b}" for a, b in zip(layer, head)] if show_labels else [],
                     tickangle=-90, showgrid=False, zeroline=False, title="heads (leaf order)")
    fig.update_yaxes(title="Hellinger distance between mixes", zeroline=False, rangemode="tozero")
    base_layout(fig, title=title, height=height or 340, width=width)
    fig.update_layout(clickmode="event")
    return fig


def fig_training(train_loss: np.ndarray, val_loss: np.ndarray, *, k_candidates: np.ndarray | None = None,
                 silhouette: np.ndarray | None = None, chosen_k: int | None = None, title: str | None = None,
                 height: int | None = None, width: int | None = None) -> go.Figure:
    """Diagnostics: the autoencoder's loss per epoch (training, validation) and, when K was chosen by
    silhouette, the mean silhouette per K with the chosen K marked."""
    scan = k_candidates is not None and silhouette is not None and len(k_candidates) > 0
    fig = make_subplots(rows=1, cols=2 if scan else 1,
                        subplot_titles=["autoencoder loss (masked MSE)"] + (["mean silhouette per K"] if scan else []))
    ep = np.arange(1, len(train_loss) + 1)
    fig.add_trace(go.Scatter(x=ep, y=np.asarray(train_loss, np.float64), name="training", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=ep, y=np.asarray(val_loss, np.float64), name="validation", mode="lines+markers"), 1, 1)
    fig.update_xaxes(title="epoch", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    if scan:
        fig.add_trace(go.Scatter(x=np.asarray(k_candidates), y=np.asarray(silhouette, np.float64), mode="lines+markers",
                                 name="silhouette", showlegend=False), 1, 2)
        if chosen_k is not None:
            sil = dict(zip(np.asarray(k_candidates).tolist(), np.asarray(silhouette).tolist()))
            if chosen_k in sil:
                fig.add_trace(go.Scatter(x=[chosen_k], y=[sil[chosen_k]], mode="markers", name=f"chosen K = {chosen_k}",
                                         marker=dict(size=14, symbol="circle-open", color=SELECTED_COLOUR,
                                                     line=dict(width=3))), 1, 2)
        fig.update_xaxes(title="K", dtick=1, row=1, col=2)
    base_layout(fig, title=title, height=height or 300, width=width)
    return fig


def gallery_tile(click: Any, tile_shape: tuple[int, int], n_clusters: int, n_columns: int) -> tuple[int, int] | None:
    """(cluster, column) of the tile of :func:`fig_prototype_gallery` under a click (column 0: the
    prototype, 1..: nearest maps), from the point's ``x``/``y`` (Dash leaves heatmap ``customdata`` out of
    click events); None on a gap between tiles or outside."""
    try:
        x, y = int(round(float(click["points"][0]["x"]))), int(round(float(click["points"][0]["y"])))
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    h, w = tile_shape
    cluster, row_in = divmod(y, h + 1)
    column, col_in = divmod(x, w + 1)
    if x < 0 or y < 0 or row_in >= h or col_in >= w or cluster >= n_clusters or column >= n_columns:
        return None
    return cluster, column


def grid_head(click: Any, head_order: np.ndarray | None, n_layers: int, n_heads: int) -> tuple[int, int] | None:
    """(layer, head) under a click on :func:`fig_dominant_grid` drawn with ``head_order`` (None: natural
    order), from ``x`` (slot) and ``y`` (layer); None when the click carries no cell."""
    try:
        slot, layer = int(click["points"][0]["x"]), int(click["points"][0]["y"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    if not (0 <= layer < n_layers and 0 <= slot < n_heads):
        return None
    if head_order is None:
        return layer, slot
    return layer, int(_head_rank_order(head_order, n_layers, n_heads)[layer, slot])


def clicked_head(click: Any) -> tuple[int, int] | None:
    """(layer, head) from the ``clickData`` of the mix bars or the dendrogram (their points carry
    ``customdata = [layer, head]``), or None."""
    try:
        layer, head = click["points"][0]["customdata"][:2]
        return int(layer), int(head)
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def gallery_figure(rec: Any, atlas: Any, detail_fn: Any, title: str | None = None) -> go.Figure:
    """:func:`fig_prototype_gallery` of an atlas, with its nearest maps read through ``detail_fn``
    (:func:`attnviz.analysis.patterns.map_detail`); shared by the page and the report."""
    k, m = atlas.nearest.shape
    h, w = atlas.prototypes.shape[1:]
    near = np.full((k, m, h, w), np.nan)
    masks = np.zeros((k, m, h, w))
    flat = atlas.nearest.reshape(-1)
    ok = flat >= 0
    if ok.any():
        det = detail_fn(rec, atlas, flat[ok])
        near.reshape(-1, h, w)[ok] = det.inputs
        masks.reshape(-1, h, w)[ok] = det.masks
    names = [cluster_label(f["cluster"], f) for f in atlas.prototype_facts()]
    return fig_prototype_gallery(atlas.prototypes, sizes=atlas.cluster_size, prefix=atlas.prototype_prefix,
                                 nearest=near, nearest_masks=masks, names=names, mode=atlas.mode,
                                 title=title or "Cluster prototypes (decoded centroids) and the nearest real maps")
