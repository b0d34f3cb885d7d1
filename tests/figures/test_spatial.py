"""Spatial figures tested on their trace data."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from attnviz.analysis.spatial import PatchGeometry, spatial_profiles_from_maps
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


def test_trend_has_one_dot_per_head_with_layer_head_customdata():
    values = np.arange(12, dtype=float).reshape(3, 4) * 2.0  # layer l, head h -> 2 * (4l + h)
    values[1, 2] = np.nan
    fig = fig_distance_trend(values, uniform=5.0, selected=(2, 3))
    heads = fig.data[0]
    assert len(heads.x) == 11  # the NaN head is left out
    custom = np.asarray(heads.customdata)
    np.testing.assert_array_equal(np.asarray(heads.y), values[custom[:, 0], custom[:, 1]])
    # dots sit near their layer (offset per head < 0.5) and keep the head order within a layer
    assert np.all(np.abs(np.asarray(heads.x) - custom[:, 0]) < 0.5)
    np.testing.assert_allclose(fig.data[1].y, [3.0, np.nanmean(values[1]), 19.0])  # layer means
    sel = fig.data[2]
    assert list(sel.customdata[0]) == [2, 3] and sel.y[0] == values[2, 3]
    assert fig.layout.shapes[0].y0 == 5.0  # the uniform-attention reference
    assert "px" in fig.layout.yaxis.title.text
    # a click on a dot gives back (layer, head)
    i = 5
    assert clicked_head({"points": [{"customdata": list(custom[i])}]}) == tuple(custom[i])
    assert clicked_head({"points": [{}]}) is None and clicked_head(None) is None


def test_local_share_trend_values():
    v = np.array([[0.1, 0.5], [0.9, 0.2]])
    fig = fig_local_share_trend(v, selected=None)
    assert len(fig.data) == 2  # heads + layer mean, no selection marker
    np.testing.assert_allclose(sorted(fig.data[0].y), sorted(v.ravel()))
    assert fig.layout.yaxis.range[1] == pytest.approx(0.9 * 1.08)


def test_offset_profile_is_centred_with_axes_in_patches():
    gh, gw = 3, 5
    prof = np.arange((2 * gh - 1) * (2 * gw - 1), dtype=float).reshape(2 * gh - 1, 2 * gw - 1)
    fig = fig_offset_profile(prof)
    hm = fig.data[0]
    assert list(hm.x) == list(range(-(gw - 1), gw)) and list(hm.y) == list(range(-(gh - 1), gh))
    z = np.asarray(hm.z)
    # the value shown at (dy=0, dx=+1) is the profile's cell right of the centre
    assert z[list(hm.y).index(0), list(hm.x).index(1)] == prof[gh - 1, gw]
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.yaxis.scaleanchor == "x"
    hidden = np.asarray(fig_offset_profile(prof, hide_self=True).data[0].z, dtype=float)  # None (a gap) -> NaN
    assert np.isnan(hidden[gh - 1, gw - 1]) and np.isnan(hidden).sum() == 1
    with pytest.raises(ValueError):
        fig_offset_profile(np.zeros((4, 5)))


def test_offset_profile_of_right_neighbour_head_lights_dx_plus_one():
    gh, gw = 3, 4
    t = 1 + gh * gw
    m = np.zeros((1, 1, t, t))
    m[0, 0, 0, 0] = 1
    for q in range(gh * gw):
        m[0, 0, 1 + q, 1 + (q + 1 if q % gw < gw - 1 else q - 1)] = 1
    prof = spatial_profiles_from_maps(m[None], PatchGeometry((gh, gw), (8, 8), 1)).offset_profile[0, 0]
    hm = fig_offset_profile(prof).data[0]
    z = np.asarray(hm.z)
    iy, ix = np.unravel_index(np.nanargmax(z), z.shape)
    assert (hm.y[iy], hm.x[ix]) == (0, 1) and z[iy, ix] == pytest.approx(1.0)


def test_query_distance_map():
    d = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    hm = fig_query_distance_map(d).data[0]
    np.testing.assert_array_equal(np.asarray(hm.z), d)
    assert list(hm.x) == [0, 1, 2] and list(hm.y) == [0, 1]


def test_radial_profiles_one_line_per_head():
    radius = np.arange(4)
    values = np.array([[1.0, 0.5, 0.2, 0.1], [0.0, 0.1, 0.3, 0.6], [0.25] * 4])
    fig = fig_radial_profiles(radius, values, layer=2, selected_head=1, metric="euclidean")
    assert len(fig.data) == 3
    for h, tr in enumerate(fig.data):
        np.testing.assert_array_equal(tr.x, radius)
        np.testing.assert_array_equal(tr.y, values[h])
        assert [list(c) for c in tr.customdata] == [[2, h]] * 4
    assert fig.data[1].line.width > fig.data[0].line.width
    assert "Euclidean" in fig.layout.xaxis.title.text


def test_shares_stacked_bars_sum_to_one():
    shares = np.array([[0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.0, 1.0]])
    fig = fig_shares(shares, layer=4, selected_head=0)
    assert fig.layout.barmode == "stack" and len(fig.data) == 4
    assert [tr.name.split()[0] for tr in fig.data] == ["prefix", "self", "3x3", "farther"]
    stacked = np.sum([np.asarray(tr.y) for tr in fig.data], axis=0)
    np.testing.assert_allclose(stacked, 1.0)
    np.testing.assert_array_equal(fig.data[2].y, shares[:, 2])
    assert [list(c) for c in fig.data[0].customdata] == [[4, 0], [4, 1]]
    assert clicked_head({"points": [{"customdata": [4, 1]}]}) == (4, 1)


def test_image_vs_mean_points_and_diagonal():
    img = np.array([[1.0, 2.0], [3.0, 4.0]])
    mean = np.array([[1.5, 2.0], [2.0, np.nan]])
    fig = fig_image_vs_mean(img, mean, metric="mean attention distance", units="px", selected=(0, 1))
    pts = fig.data[0]
    assert len(pts.x) == 3  # the NaN head is left out
    for x, y, (layer, head) in zip(pts.x, pts.y, pts.customdata):
        assert x == mean[layer, head] and y == img[layer, head]
    assert list(fig.data[1].x) == [1.0, 3.0] == list(fig.data[1].y)
    assert fig.data[2].x[0] == 2.0 and fig.data[2].y[0] == 2.0
    with pytest.raises(ValueError):
        fig_image_vs_mean(img, mean[:1], metric="d")


def test_figures_are_plotly_figures():
    for fig in (fig_distance_trend(np.ones((2, 2))), fig_query_distance_map(np.ones((2, 2))),
                fig_shares(np.full((2, 4), 0.25), layer=0)):
        assert isinstance(fig, go.Figure)


def test_report_views_read_the_cache_and_skip_without_it(tmp_path):
    import attnviz
    from attnviz.analysis.spatial import analyze_spatial, load_spatial
    from attnviz.report import collect_figures
    from tests.helpers import make_recording

    views = ["spatial_trend", "spatial_layers", "spatial_image"]
    path = make_recording(tmp_path / "r.h5", n_samples=4, n_layers=2, n_heads=3, grid=(2, 3))
    with attnviz.open(path) as rec:
        assert collect_figures(rec, samples=[0], views=views) == []  # nothing cached: skipped
    analyze_spatial(path)
    with attnviz.open(path) as rec:
        prof = load_spatial(rec)
        items = collect_figures(rec, samples=[1, 3], views=views)
    stems = [it.stem for it in items]
    assert stems == ["spatial_trend_distance", "spatial_trend_distance_patches", "spatial_trend_local_share",
                     "spatial_layers_radial_layer0", "spatial_layers_shares_layer0",
                     "spatial_layers_radial_layer1", "spatial_layers_shares_layer1",
                     "spatial_image_s1", "spatial_image_s3"]
    image3 = items[-1].figure.data[0]
    for x, y, (layer, head) in zip(image3.x, image3.y, image3.customdata):
        assert y == pytest.approx(prof.image_mean_distance[3, layer, head], rel=1e-6)
        assert x == pytest.approx(prof.mean_distance[layer, head], rel=1e-6)
