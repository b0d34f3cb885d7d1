"""Figures of the pattern atlas, checked on their trace data (hand-built arrays, no training)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import dendrogram, linkage

from attnviz.analysis.patterns import centred_masks, describe_prototype, query_centre
from attnviz.figures import patterns as F


def _scatter_data(n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    cluster = rng.integers(-1, 3, n)
    cluster[:4] = [0, 1, 2, -1]
    return dict(embedding=rng.standard_normal((n, 2)).astype(np.float32), cluster=cluster,
                layer=rng.integers(0, 2, n), head=rng.integers(0, 3, n), sample=rng.integers(0, 5, n),
                query=rng.integers(0, 12, n), grid=(3, 4))


def test_scatter_one_webgl_trace_per_cluster_then_noise_then_highlight() -> None:
    d = _scatter_data()
    fig = F.fig_pattern_scatter(**d, highlight=[3, 7])
    assert [t.type for t in fig.data] == ["scattergl"] * 5
    assert fig.layout.dragmode == "lasso"
    for c, t in zip([0, 1, 2, -1], fig.data[:4]):
        idx = np.flatnonzero(d["cluster"] == c)
        np.testing.assert_array_equal(t.x, d["embedding"][idx, 0])
        np.testing.assert_array_equal(t.y, d["embedding"][idx, 1])
        cd = np.asarray(t.customdata)
        np.testing.assert_array_equal(cd[:, :3], np.stack([d["layer"], d["head"], d["sample"]], 1)[idx])
        np.testing.assert_array_equal(cd[:, 3] * 4 + cd[:, 4], d["query"][idx])   # (row, col) of the query
        np.testing.assert_array_equal(cd[:, 5], c)
    assert fig.data[3].marker.color == F.NOISE_COLOUR
    assert fig.data[0].marker.color == F.cluster_colours(3)[0]
    np.testing.assert_array_equal(fig.data[4].x, d["embedding"][[3, 7], 0])
    assert sum(len(t.x) for t in fig.data[:4]) == 50


def test_scatter_coloured_by_a_value_is_one_trace() -> None:
    d = _scatter_data()
    fig = F.fig_pattern_scatter(**d, color_by="head")
    assert len(fig.data) == 1
    np.testing.assert_array_equal(fig.data[0].marker.color, d["head"].astype(np.float32))
    err = np.linspace(0, 1, 50)
    fig = F.fig_pattern_scatter(**d, color_by="error", error=err, highlight=[])
    np.testing.assert_allclose(fig.data[0].marker.color, err)
    assert len(fig.data) == 2 and len(fig.data[1].x) == 0               # an empty highlight is still there
    with pytest.raises(ValueError):
        F.fig_pattern_scatter(**d, color_by="size")


def test_selected_maps_maps_event_points_back_to_atlas_indices() -> None:
    d = _scatter_data()
    c = d["cluster"]
    ev = {"points": [{"curveNumber": 2, "pointIndex": 1}, {"curveNumber": 3, "pointNumber": 0},
                     {"curveNumber": 4, "pointIndex": 0}, {"curveNumber": 0}]}
    got = F.selected_maps(ev, "cluster", c)
    assert got.tolist() == [int(np.flatnonzero(c == 2)[1]), int(np.flatnonzero(c == -1)[0])]
    assert F.selected_maps(ev, "cluster", c, limit=1).tolist() == got[:1].tolist()
    assert F.selected_maps({"points": [{"curveNumber": 0, "pointIndex": 17}]}, "layer", c).tolist() == [17]
    assert len(F.selected_maps(None, "cluster", c)) == 0


def test_map_pairs_show_raw_input_reconstruction_with_invalid_cells_blank() -> None:
    grid = (3, 4)
    rng = np.random.default_rng(1)
    raw = rng.random((2, *grid)).astype(np.float32)
    query = np.array([0, 6])
    inputs = query_centre(raw, query, grid)
    recon = inputs * 0.5
    masks = centred_masks(grid)[query]
    fig = F.fig_map_pairs(raw, query, grid, inputs, recon, masks, raw_prefix=np.array([0.1, 0.2]),
                          input_prefix=np.array([0.3, 0.4]), recon_prefix=np.array([0.25, 0.35]), titles=["a", "b"])
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 6
    for i in range(2):
        np.testing.assert_allclose(np.asarray(heat[3 * i].z), raw[i])
        z_in = np.asarray(heat[3 * i + 1].z, float)
        z_rc = np.asarray(heat[3 * i + 2].z, float)
        np.testing.assert_array_equal(np.isnan(z_in), masks[i] == 0)
        np.testing.assert_allclose(z_in[masks[i] > 0], inputs[i][masks[i] > 0])
        np.testing.assert_allclose(z_rc[masks[i] > 0], recon[i][masks[i] > 0])
        # centred panels are labelled by offset: the query sits at (0, 0)
        assert list(heat[3 * i + 1].x) == list(range(-3, 4)) and list(heat[3 * i + 1].y) == list(range(-2, 3))
    marks = [t for t in fig.data if t.type == "scatter"]
    qy, qx = divmod(6, 4)
    assert (marks[3].x[0], marks[3].y[0]) == (qx, qy)                    # the raw map of row 2
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "a: raw · CLS 0.10" and titles[2] == "reconstruction · CLS 0.25"
    absolute = F.fig_map_pairs(raw, query, grid, raw, raw, None, mode="absolute")
    assert len([t for t in absolute.data if t.type == "heatmap"]) == 4
    assert "lasso" in F.fig_map_pairs(raw[:0], query[:0], grid, inputs[:0], recon[:0]).layout.annotations[0].text


def test_prototype_gallery_is_one_mosaic_of_the_tiles() -> None:
    k, m, h, w = 3, 2, 5, 7
    rng = np.random.default_rng(2)
    protos = rng.random((k, h, w))
    near = rng.random((k, m, h, w))
    near[2, 1] = np.nan                                                  # cluster 2 has one nearest map only
    masks = np.ones((k, m, h, w))
    masks[0, 0, 0, :] = 0
    fig = F.fig_prototype_gallery(protos, sizes=np.array([50, 30, 20]), prefix=np.array([0.9, 0.1, 0.0]),
                                  nearest=near, nearest_masks=masks, names=["C0 prefix/CLS", "C1", "C2"])
    z = np.asarray(fig.data[1].z, float)
    cd = np.asarray(fig.data[1].customdata)
    assert z.shape == (k * (h + 1) - 1, (1 + m) * (w + 1) - 1)
    for c in range(k):
        r0 = c * (h + 1)
        np.testing.assert_allclose(z[r0 : r0 + h, :w], protos[c])
        for j in range(m):
            tile = z[r0 : r0 + h, (j + 1) * (w + 1) : (j + 1) * (w + 1) + w]
            expect = np.where(masks[c, j] > 0, near[c, j], np.nan)
            np.testing.assert_array_equal(np.isnan(tile), np.isnan(expect))
            np.testing.assert_allclose(tile[~np.isnan(tile)], expect[~np.isnan(expect)])
        for j in range(1 + m):
            y, x = r0 + h // 2, j * (w + 1) + w // 2
            assert list(cd[y, x]) == [c, j]
            assert F.gallery_tile({"points": [{"x": x, "y": y}]}, (h, w), k, 1 + m) == (c, j)
    assert np.isnan(z[h, :]).all()                                       # the gap between rows
    assert F.gallery_tile({"points": [{"x": 0, "y": h}]}, (h, w), k, 1 + m) is None
    labels = list(fig.layout.yaxis.ticktext)
    assert labels[0].startswith("C0 prefix/CLS<br>50 maps (50%) · CLS 0.90")
    assert len(fig.layout.shapes) == k                                   # a cluster-coloured bar per row
    assert fig.layout.shapes[1].fillcolor == F.cluster_colours(k)[1]


def test_dominant_grid_natural_and_ordered_by_mix() -> None:
    mix = np.array([[[0.7, 0.3], [0.1, 0.9], [0.6, 0.4]], [[0.2, 0.8], [1.0, 0.0], [0.45, 0.55]]])
    dom = mix.argmax(-1)
    fig = F.fig_dominant_grid(dom, mix, selected=(1, 2))
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), dom)
    assert fig.data[0].text[1][2] == "55%"
    assert (fig.data[1].x[0], fig.data[1].y[0]) == (2, 1)
    order = np.array([4, 1, 3, 0, 5, 2])       # flat heads l*3+h: rank of (0,0)=3, (0,1)=1, (0,2)=5, ...
    fig = F.fig_dominant_grid(dom, mix, head_order=order, selected=(0, 0))
    drawn = np.asarray(fig.data[0].customdata)[..., 1]
    np.testing.assert_array_equal(drawn, [[1, 0, 2], [1, 0, 2]])        # layer 0: ranks 1,3,5; layer 1: 0,2,4
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), dom[[[0], [1]], drawn])
    assert fig.data[1].x[0] == 1                                          # head 0 of layer 0 drawn in slot 1
    for layer in range(2):
        for slot in range(3):
            assert F.grid_head({"points": [{"x": slot, "y": layer}]}, order, 2, 3) == (layer, drawn[layer, slot])
    assert F.grid_head({"points": [{"x": 2, "y": 1}]}, None, 2, 3) == (1, 2)
    assert F.grid_head({"points": [{"x": 3, "y": 1}]}, None, 2, 3) is None


def test_head_mix_bars_stack_to_the_mix() -> None:
    mix = np.array([[0.5, 0.25, 0.25], [0.0, 0.6, 0.2]])
    fig = F.fig_head_mix(mix, labels=["L0 H0", "L0 H1"], noise=np.array([0.0, 0.2]), highlight=1,
                         customdata=[[0, 0], [0, 1]])
    assert len(fig.data) == 4 and fig.data[3].name == "noise"
    for c in range(3):
        np.testing.assert_allclose(fig.data[c].x, mix[:, c])
    np.testing.assert_allclose(fig.data[3].x, [0.0, 0.2])
    assert list(fig.data[0].y) == ["L0 H0", "<b>L0 H1</b>"]
    assert fig.layout.barmode == "stack"
    assert F.clicked_head({"points": [{"customdata": fig.data[1].customdata[1]}]}) == (0, 1)
    assert len(F.fig_head_mix(mix[0], labels=["x"]).data) == 3            # one head, no noise trace


def test_dendrogram_leaves_follow_scipy() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((6, 3))
    z = linkage(x, "average")
    dom = np.array([[0, 1, 1], [2, 0, 1]])
    fig = F.fig_head_dendrogram(z, n_heads=3, dominant=dom, selected=(1, 0))
    leaves = dendrogram(z, no_plot=True)["leaves"]
    cd = np.asarray(fig.data[1].customdata)
    np.testing.assert_array_equal(cd[:, 0] * 3 + cd[:, 1], leaves)
    assert max(y for y in fig.data[0].y if y is not None) == pytest.approx(z[:, 2].max())
    colours = F.cluster_colours(3)
    assert list(fig.data[1].marker.color) == [colours[dom[l_, h_]] for l_, h_ in cd]
    assert fig.data[2].x[0] == fig.data[1].x[leaves.index(3)]            # outline on leaf L1H0
    assert F.clicked_head({"points": [{"customdata": list(cd[0])}]}) == tuple(cd[0])


def test_training_diagnostics_mark_the_chosen_k() -> None:
    fig = F.fig_training(np.array([0.3, 0.2, 0.1]), np.array([0.35, 0.25, 0.2]), k_candidates=np.array([2, 3, 4]),
                         silhouette=np.array([0.4, 0.7, 0.5]), chosen_k=3)
    assert len(fig.data) == 4
    np.testing.assert_allclose(fig.data[1].y, [0.35, 0.25, 0.2])
    assert (fig.data[3].x[0], fig.data[3].y[0]) == (3, 0.7)
    assert len(F.fig_training(np.array([0.3]), np.array([0.3])).data) == 2   # K given: no scan panel


def test_cluster_labels_from_prototype_facts() -> None:
    h = w = 7
    c = 3
    yy, xx = np.mgrid[:h, :w]

    def label(proto: np.ndarray, prefix: float = 0.0) -> str:
        return F.cluster_label(4, describe_prototype(proto, prefix, "centred"))

    assert label(np.zeros((h, w)) + 0.01, prefix=1.0) == "C4 prefix/CLS"
    assert label(np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / 1.0)) == "C4 self/local"
    one = np.zeros((h, w))
    one[c, c + 2] = 1
    assert label(one) == "C4 offset (+0,+2)"
    row = np.zeros((h, w))
    row[c] = 1
    assert label(row) == "C4 row band" and label(row.T) == "C4 column band"
    assert label(np.full((h, w), 0.9)) == "C4 broad"
    assert F.cluster_label(-1) == "noise" and F.cluster_label(2) == "C2"
