"""Views of the spatial page (the cached spatial profiles; skipped when absent)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from attnviz.app.exports import register_view
from attnviz.figures.spatial import (
    fig_distance_trend,
    fig_image_vs_mean,
    fig_local_share_trend,
    fig_radial_profiles,
    fig_shares,
)


def cached(rec):  # noqa: ANN001, ANN202
    from attnviz.analysis.spatial import load_spatial

    return load_spatial(rec)


@register_view("spatial_trend", "Spatial profiles: mean attention distance and local share across layers",
               order=40)


def _trend(rec, sample):  # noqa: ANN001, ANN202
    prof = cached(rec)
    if prof is None:
        return None
    kind = "" if prof.kind == rec.main_kind else f" ({prof.kind})"
    return [("distance", fig_distance_trend(prof.mean_distance, uniform=prof.uniform_mean_distance,
                                            title=f"Mean attention distance{kind}")),
            ("distance_patches", fig_distance_trend(prof.mean_distance_patches, renormalised=True,
                                                    uniform=prof.uniform_mean_distance,
                                                    title=f"Mean attention distance, patches only{kind}")),
            ("local_share", fig_local_share_trend(prof.local_share, title=f"Local share{kind}"))]


@register_view("spatial_layers", "Spatial profiles per layer: radial profiles and shares", order=41)
def _layers(rec, sample):  # noqa: ANN001, ANN202
    prof = cached(rec)
    if prof is None:
        return None
    rad = prof.radial("chebyshev")
    out: list[tuple[str, go.Figure]] = []
    for layer in range(prof.n_layers):
        out.append((f"radial_layer{layer}", fig_radial_profiles(rad.radius, rad.strength[layer], layer=layer)))
        out.append((f"shares_layer{layer}", fig_shares(prof.shares[layer], layer=layer)))
    return out


@register_view("spatial_image", "Spatial profiles: this image against the mean over images", per_sample=True,
               order=42)


def _image(rec, sample):  # noqa: ANN001, ANN202
    prof = cached(rec)
    if prof is None or sample is None:
        return None
    rows = np.flatnonzero(np.asarray(prof.samples) == sample)
    if rows.size == 0:
        return None
    label = f"image {sample}"
    return fig_image_vs_mean(prof.image_mean_distance[rows[0]], prof.mean_distance,
                             metric="mean attention distance", units="px", image_label=label,
                             title=f"Mean attention distance: {label} vs mean over images")


@register_view("localization", "Localization: energy inside the object mask and the pointing game", order=43)
def _localization(rec, sample):  # noqa: ANN001, ANN202
    from attnviz.analysis.localization import load_localization
    from attnviz.figures.heads import fig_head_grid
    from attnviz.figures.localization import fig_localization, fig_localization_by_layer

    loc = load_localization(rec)
    if loc is None:
        return None
    return [("scores", fig_localization(loc.energy, loc.hit, method_energy=loc.method_energy, method_hit=loc.method_hit,
                                        baseline_energy=loc.baseline_energy, baseline_pointing=loc.baseline_pointing,
                                        n_images=loc.n_images)),
            ("by_layer", fig_localization_by_layer(loc.energy, baseline_energy=loc.baseline_energy)),
            ("energy_grid", fig_head_grid(loc.energy, metric="mask_energy",
                                          title=f"All heads: mask energy (uniform {loc.baseline_energy:.2f})")),
            ("pointing_grid", fig_head_grid(loc.hit, metric="pointing_hit",
                                            title=f"All heads: pointing hit rate (random {loc.baseline_pointing:.2f})"))]
