"""Spatial page ("/spatial"): where each head looks on the patch grid, and how that changes with depth.

Reads only the cached analysis ``analyses/spatial/<kind>`` (written by ``attnviz analyze FILE``);
nothing here loops over the samples of a recording. The one exception is the "selected image"
view, which computes the profiles of that one image from its maps on demand (one sample's maps:
tens of milliseconds) and keeps the last few in memory.

Kind: the recording's first attention kind with a patch grid (ViT: "self"; LVLM: the vision
tower, "vision"); layer/head of the selection are read in that stack.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import dash
import numpy as np
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.analysis.spatial import (
    SpatialProfiles,
    default_spatial_kind,
    load_spatial,
    spatial_for_sample,
)
from attnviz.analysis.localization import load_localization, localization_refusal
from attnviz.app import ids
from attnviz.app.components import HeadGrid, graph, message
from attnviz.app.data import memo
from attnviz.app.selection import Selection, patch, resolve
from attnviz.app.views import no_image_note
from attnviz.figures import fig_message
from attnviz.figures.localization import fig_localization, fig_localization_by_layer
from attnviz.figures.spatial import (
    clicked_head,
    fig_distance_trend,
    fig_image_vs_mean,
    fig_local_share_trend,
    fig_offset_profile,
    fig_query_distance_map,
    fig_radial_profiles,
    fig_shares,
)
from attnviz.store.reader import Recording, store_refusal

dash.register_page(__name__, path="/spatial", name="Spatial", order=3, title="attnviz - spatial")

P = "spatial"
STATUS = ids.page_id(P, "status")
VIEW = ids.page_id(P, "view")
DISTANCE = ids.page_id(P, "distance")
RING = ids.page_id(P, "ring")
QUANTITY = ids.page_id(P, "quantity")
HIDE_SELF = ids.page_id(P, "hide-self")
PREV = ids.page_id(P, "prev")
NEXT = ids.page_id(P, "next")
IMAGE = ids.page_id(P, "image")
TREND = ids.page_id(P, "trend")
TREND_LOCAL = ids.page_id(P, "trend-local")
OFFSET = ids.page_id(P, "offset")
QUERY_MAP = ids.page_id(P, "query-map")
RADIAL = ids.page_id(P, "radial")
SHARES = ids.page_id(P, "shares")
IMAGE_VS_MEAN = ids.page_id(P, "image-vs-mean")
LOCALIZATION = ids.page_id(P, "localization")
LOCALIZATION_LAYERS = ids.page_id(P, "localization-layers")
GRID_MAIN = ids.page_id(P, "grid-main")
GRID_VISION = ids.page_id(P, "grid-vision")

#: graphs whose points carry customdata [layer, head]: a click selects that head everywhere
CLICKABLE = (TREND, TREND_LOCAL, RADIAL, SHARES, IMAGE_VS_MEAN, LOCALIZATION_LAYERS)
#: per-image profiles kept in memory per recording (computed on demand, small)
IMAGE_CACHE_SIZE = 8

grid = HeadGrid(P, default_metric="mean_attention_distance")
grid_vision = HeadGrid(f"{P}-vision", kind="vision", default_metric="mean_attention_distance",
                       title="vision tower")

_DEFINITIONS = (
    "Only patch queries count (CLS/registers have no position). Mean attention distance (Dosovitskiy et al. "
    "2021, Fig. 7): sum over patch keys of attention x pixel distance between patch centres, averaged over "
    "queries and images; 'raw' counts attention on CLS/registers as no distance, 'patches only' renormalises "
    "over the patch keys. Offset profile: mean attention to the key at offset (dy, dx), divided by the number of "
    "query-key pairs with that offset. Shares: prefix (CLS/registers), self, 3x3 neighbours, farther patches. "
    "Definitions: docs/spatial.md."
)


def _radio(id_: str, options: list[tuple[str, str]], value: str) -> dcc.RadioItems:
    return dcc.RadioItems(id=id_, value=value, inline=True, options=[{"label": lab, "value": v} for v, lab in options],
                          inputStyle={"marginRight": "4px", "marginLeft": "10px"})


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Spatial attention profiles"),
        html.Div(id=STATUS),
        html.Div([
            html.Label("show", htmlFor=VIEW, className="av-label"),
            _radio(VIEW, [("mean", "mean over images"), ("image", "selected image")], "mean"),
            html.Button("◀", id=PREV, className="av-button", title="previous image"),
            html.Button("▶", id=NEXT, className="av-button", title="next image"),
            html.Span(id=IMAGE, className="av-note"),
            html.Label("distance", htmlFor=DISTANCE, className="av-label", style={"marginLeft": "16px"}),
            _radio(DISTANCE, [("raw", "raw weights"), ("patches", "patches only")], "raw"),
        ], className="av-row av-card"),
        html.Div([
            html.Div([html.H3("Across layers: each head a dot (click selects it)"),
                      graph(TREND, filename="spatial-distance-trend"),
                      graph(TREND_LOCAL, filename="spatial-local-share-trend")], className="av-card av-col"),
            html.Div([html.H3("All heads"),
                      html.Div(grid.layout(), id=GRID_MAIN),
                      html.Div(grid_vision.layout(), id=GRID_VISION, style={"display": "none"})],
                     className="av-card av-col-narrow"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Selected head: attention by key offset"),
                      dcc.Checklist(id=HIDE_SELF, options=[{"label": " hide the query itself (0, 0)", "value": "hide"}],
                                    value=[], inline=True),
                      graph(OFFSET, filename="spatial-offset-profile")], className="av-card av-col"),
            html.Div([html.H3("Selected head: mean distance by query position"),
                      graph(QUERY_MAP, filename="spatial-query-distance")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Selected layer: radial profiles"),
                      html.Div([html.Label("rings", htmlFor=RING, className="av-label"),
                                _radio(RING, [("chebyshev", "Chebyshev"), ("euclidean", "Euclidean")], "chebyshev"),
                                html.Label("value", htmlFor=QUANTITY, className="av-label"),
                                _radio(QUANTITY, [("strength", "per query-key pair"), ("mass", "share of attention")],
                                       "strength")], className="av-row"),
                      graph(RADIAL, filename="spatial-radial")], className="av-card av-col"),
            html.Div([html.H3("Selected layer: shares per head"),
                      graph(SHARES, filename="spatial-shares")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Selected image against the mean over images"),
                      graph(IMAGE_VS_MEAN, filename="spatial-image-vs-mean")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Localization: how much falls on the object (images with masks)"),
                      graph(LOCALIZATION, filename="spatial-localization")], className="av-card av-col"),
            html.Div([html.H3("Localization per head (click selects it)"),
                      graph(LOCALIZATION_LAYERS, filename="spatial-localization-heads")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div(_DEFINITIONS, className="av-note"),
    ], className="av-page")


# -- data access (memoised per open recording; never a pass over all samples) -------------------------


def _resolve(data: Any) -> tuple[Selection, Recording | None, str | None, str | None]:
    """(selection clamped to the spatial stack, recording, kind, problem)."""
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, None, problem
    kind = memo(rec, ("spatial_kind",), lambda: default_spatial_kind(rec))
    if kind is None:
        return sel, None, None, no_image_note(sel.file, rec, "spatial attention profile (it needs image patches)")
    sel, rec, problem = resolve(data, kind)
    return sel, rec, kind, problem


def cached_profiles(rec: Recording, kind: str) -> SpatialProfiles | None:
    """The cached analysis of ``kind`` (read once per open recording), or None."""
    return memo(rec, ("spatial", kind), lambda: load_spatial(rec, kind))


def image_profiles(rec: Recording, kind: str, sample: int) -> SpatialProfiles:
    """Profiles of one image from its maps, the last :data:`IMAGE_CACHE_SIZE` kept."""
    cache: OrderedDict = memo(rec, ("spatial_images", kind), OrderedDict)
    if sample in cache:
        cache.move_to_end(sample)
        return cache[sample]
    prof = spatial_for_sample(rec, sample, kind)
    cache[sample] = prof
    while len(cache) > IMAGE_CACHE_SIZE:
        cache.popitem(last=False)
    return prof


def _missing(sel: Selection, rec: Recording | None = None) -> str:
    problem = None if rec is None else store_refusal(rec, "the spatial-profile view")
    if problem:
        return f"{sel.file}: {problem}."
    return (f"No spatial profiles stored in {sel.file} yet: run `attnviz analyze {sel.file}` to compute them "
            "over all images, or choose 'selected image' to see one image (computed on demand).")


def _profiles(rec: Recording, kind: str, sel: Selection, view: str | None) -> tuple[SpatialProfiles | None, str]:
    """The profiles the figures show (mean over images, or the selected image) and a label."""
    if view == "image" and rec.has_maps():
        return image_profiles(rec, kind, sel.sample), f"image {sel.sample}"
    prof = cached_profiles(rec, kind)
    return prof, ("" if prof is None else f"mean over {prof.n_samples} images")


def _image_distance(rec: Recording, kind: str, sel: Selection, patches: bool) -> np.ndarray:
    """float ``[layer, head]`` mean attention distance of the selected image (cached row, else computed)."""
    prof = cached_profiles(rec, kind)
    if prof is not None:
        rows = np.flatnonzero(np.asarray(prof.samples) == sel.sample)
        if rows.size:
            values = prof.image_mean_distance_patches if patches else prof.image_mean_distance
            return np.asarray(values[rows[0]])
    one = image_profiles(rec, kind, sel.sample)
    return (one.image_mean_distance_patches if patches else one.image_mean_distance)[0]


def _kind_note(rec: Recording, kind: str) -> str:
    return "" if kind == rec.main_kind else f" [{kind} stack]"


# -- callbacks (thin: selection -> cached analysis -> figure) ----------------------------------------


@callback(Output(STATUS, "children"), Output(IMAGE, "children"), Output(GRID_MAIN, "style"),
          Output(GRID_VISION, "style"), Input(ids.SELECTION, "data"), Input(VIEW, "value"))
def status(data: Any, view: str | None):
    """Selection -> what is shown (or why not), the image label, which all-heads grid fits the stack."""
    shown, hidden = {}, {"display": "none"}
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return message(problem, "error"), "", shown, hidden
    grids = (hidden, shown) if kind == "vision" else (shown, hidden)
    label = f"image {sel.sample} of {rec.n_samples}: {rec.sample_ids()[sel.sample]}"
    prof = cached_profiles(rec, kind)
    if prof is None:
        return message(_missing(sel, rec), "warning"), label, *grids
    what = f"selected image {sel.sample}" if view == "image" else f"mean over {prof.n_samples} images"
    g = prof.geometry
    text = (f"Showing the {what}{_kind_note(rec, kind)}: {g.grid[0]}x{g.grid[1]} patches of "
            f"{g.patch_size[0]}x{g.patch_size[1]} px, {g.n_prefix} prefix token(s). Selected: layer {sel.layer}, "
            f"head {sel.head}.")
    return html.Div(text, className="av-note"), label, *grids


@callback(Output(TREND, "figure"), Output(TREND_LOCAL, "figure"),
          Input(ids.SELECTION, "data"), Input(VIEW, "value"), Input(DISTANCE, "value"))
def trends(data: Any, view: str | None, distance: str | None):
    """Selection, view, distance mode -> layer-vs-distance and layer-vs-local-share scatter."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem)
    prof, label = _profiles(rec, kind, sel, view)
    if prof is None:
        msg = _missing(sel, rec)
        return fig_message(msg), fig_message(msg)
    patches = distance == "patches"
    values = prof.mean_distance_patches if patches else prof.mean_distance
    where = f" ({label}){_kind_note(rec, kind)}"
    return (fig_distance_trend(values, uniform=prof.uniform_mean_distance, selected=(sel.layer, sel.head),
                               renormalised=patches, title="Mean attention distance" + where),
            fig_local_share_trend(prof.local_share, selected=(sel.layer, sel.head), title="Local share" + where))


@callback(Output(OFFSET, "figure"), Output(QUERY_MAP, "figure"),
          Input(ids.SELECTION, "data"), Input(VIEW, "value"), Input(HIDE_SELF, "value"), Input(DISTANCE, "value"))
def head_views(data: Any, view: str | None, hide_self: list[str] | None, distance: str | None):
    """Selection -> offset profile and per-query-position mean distance of the selected head."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem)
    prof, label = _profiles(rec, kind, sel, view)
    if prof is None:
        msg = _missing(sel, rec)
        return fig_message(msg), fig_message(msg)
    l, h = sel.layer, sel.head
    patches = distance == "patches"
    qmap = prof.query_distance_patches[l, h] if patches else prof.query_distance[l, h]
    return (fig_offset_profile(prof.offset_profile[l, h], hide_self=bool(hide_self),
                               title=f"Layer {l}, head {h}: attention by key offset ({label})"),
            fig_query_distance_map(qmap, title=f"Layer {l}, head {h}: mean attention distance"
                                               f"{' (patches only)' if patches else ''} by query ({label})"))


@callback(Output(RADIAL, "figure"), Output(SHARES, "figure"),
          Input(ids.SELECTION, "data"), Input(VIEW, "value"), Input(RING, "value"), Input(QUANTITY, "value"))
def layer_views(data: Any, view: str | None, ring: str | None, quantity: str | None):
    """Selection -> radial profiles and shares of every head of the selected layer."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem)
    prof, label = _profiles(rec, kind, sel, view)
    if prof is None:
        msg = _missing(sel, rec)
        return fig_message(msg), fig_message(msg)
    ring = ring if ring in ("chebyshev", "euclidean") else "chebyshev"
    quantity = quantity if quantity in ("strength", "mass") else "strength"
    rad = prof.radial(ring)
    values = rad.strength if quantity == "strength" else rad.mass
    l = sel.layer
    return (fig_radial_profiles(rad.radius, values[l], layer=l, metric=ring, quantity=quantity, selected_head=sel.head,
                                title=f"Layer {l}: attention by distance ({label})"),
            fig_shares(prof.shares[l], layer=l, selected_head=sel.head,
                       title=f"Layer {l}: where the attention goes ({label})"))


@callback(Output(IMAGE_VS_MEAN, "figure"), Input(ids.SELECTION, "data"), Input(DISTANCE, "value"))
def image_vs_mean(data: Any, distance: str | None):
    """Selection -> the selected image's per-head mean distance against the mean over images."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    prof = cached_profiles(rec, kind)
    if prof is None:
        return fig_message(_missing(sel, rec))
    patches = distance == "patches"
    mean = prof.mean_distance_patches if patches else prof.mean_distance
    metric = "mean attention distance" + (" (patches only)" if patches else "")
    return fig_image_vs_mean(_image_distance(rec, kind, sel, patches), mean, metric=metric, units="px",
                             image_label=f"image {sel.sample}", selected=(sel.layer, sel.head),
                             title=f"Image {sel.sample} ({rec.sample_ids()[sel.sample]}) vs the mean over "
                                   f"{prof.n_samples} images")


def _localization_missing(rec: Recording, sel: Selection) -> str:
    if not rec.has_masks:
        return ("This recording has no object masks, so there is no object to score attention against. Inputs "
                "with masks (a manifest column 'mask') give energy-inside-the-mask and pointing-game scores.")
    problem = localization_refusal(rec)
    if problem:
        return f"{sel.file}: {problem}."
    return f"Localization scores are not stored yet: run `attnviz analyze {sel.file}`."


@callback(Output(LOCALIZATION, "figure"), Output(LOCALIZATION_LAYERS, "figure"), Input(ids.SELECTION, "data"))
def localization(data: Any):
    """Selection -> energy inside the mask and pointing game: attributions, best/median/selected head, baselines."""
    sel, rec, kind, problem = _resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem)
    loc = memo(rec, ("localization",), lambda: load_localization(rec))
    if loc is None or loc.kind != kind:
        msg = _localization_missing(rec, sel)
        return fig_message(msg), fig_message(msg)
    return (fig_localization(loc.energy, loc.hit, method_energy=loc.method_energy, method_hit=loc.method_hit,
                             baseline_energy=loc.baseline_energy, baseline_pointing=loc.baseline_pointing,
                             n_images=loc.n_images, selected=(sel.layer, sel.head)),
            fig_localization_by_layer(loc.energy, baseline_energy=loc.baseline_energy, selected=(sel.layer, sel.head)))


def select_head(click: Any):
    """A click on a head (any figure of this page) -> selection layer/head."""
    head = clicked_head(click)
    return no_update if head is None else patch(layer=head[0], head=head[1])


for _graph in CLICKABLE:
    callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(_graph, "clickData"),
             prevent_initial_call=True)(select_head)


def _step_image(data: Any, delta: int):
    sel, rec, _, problem = _resolve(data)
    if problem:
        return no_update
    target = min(max(sel.sample + delta, 0), rec.n_samples - 1)
    return no_update if target == sel.sample else patch(sample=target)


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(PREV, "n_clicks"), State(ids.SELECTION, "data"),
          prevent_initial_call=True)
def previous_image(_n: Any, data: Any):
    """◀ -> the previous sample."""
    return _step_image(data, -1)


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(NEXT, "n_clicks"), State(ids.SELECTION, "data"),
          prevent_initial_call=True)
def next_image(_n: Any, data: Any):
    """▶ -> the next sample."""
    return _step_image(data, +1)
