from __future__ import annotations

import numpy as np

from attnviz.figures.explorer import (
    block_mean,
    cell_of_point,
    fig_attribution_panels,
    fig_head_multiples,
    fig_query_overlay,
    fig_token_matrix,
    mask_outline_path,
    token_labels,
)

IMG = np.zeros((32, 48, 3), np.uint8)


def test_query_overlay_heat_is_the_grid_and_covers_the_image():
    heat = np.arange(12, dtype=float).reshape(3, 4) / 66
    fig = fig_query_overlay(IMG, heat, patch_size=(8, 8), query_cell=(1, 2))  # 24x32 model input
    image, hm = fig.data
    np.testing.assert_array_equal(np.asarray(hm.z), heat)
    np.testing.assert_array_equal(hm.x, [4, 12, 20, 28])
    np.testing.assert_array_equal(hm.y, [4, 12, 20])
    # the 48x32 thumbnail is stretched onto 32x24 input pixels, pixel edges at 0 and 32
    assert image.dx == 32 / 48 and image.x0 == image.dx / 2
    assert fig.layout.yaxis.range == (24, 0)
    rect = [s for s in fig.layout.shapes if s.type == "rect"][0]
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (16, 24, 8, 16)


def test_cell_of_point():
    assert cell_of_point(12.0, 4.0, (3, 4), (8, 8)) == (0, 1)
    assert cell_of_point(31.9, 23.9, (3, 4), (8, 8)) == (2, 3)
    assert cell_of_point(33, 4, (3, 4), (8, 8)) is None


def test_head_multiples_tiles_each_head_with_its_map():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 2, 3))
    fig = fig_head_multiples(maps, selected_head=4, cols=3)
    assert len([t for t in fig.data if t.type == "heatmap"]) == 1
    z, owner = np.asarray(fig.data[0].z, float), np.asarray(fig.data[0].customdata)
    assert z.shape == (2 * 3 - 1, 3 * 4 - 1)
    for h in range(5):
        r, c = divmod(h, 3)
        np.testing.assert_array_equal(z[r * 3 : r * 3 + 2, c * 4 : c * 4 + 3], maps[h])
        assert (owner[r * 3 : r * 3 + 2, c * 4 : c * 4 + 3] == h).all()
    assert np.isnan(z[2]).all() and (owner[2] == -1).all()       # gap row
    assert np.isnan(z[3:, 8:]).all()                              # 6th slot empty
    assert list(fig.data[1].text) == [f"head {h}" for h in range(5)]
    np.testing.assert_allclose(fig.data[1].x, [1, 5, 9, 1, 5])  # tile centres
    assert fig.data[0].zmax == maps.max()


def test_attribution_panels_scale_each_map_and_outline_the_mask():
    sal = np.array([[-2.0, 1.0], [0.5, 0.0]])
    roll = np.array([[0.1, 0.3], [0.2, 0.4]])
    mask = np.zeros((32, 48), np.uint8)
    mask[8:16, 8:24] = 1
    fig = fig_attribution_panels(IMG, [("rollout", roll), ("saliency", sal)], image_size=(24, 32), mask=mask)
    heat = [t for t in fig.data if t.type == "heatmap"]
    np.testing.assert_allclose(heat[0].z, roll / 0.4)
    np.testing.assert_allclose(heat[1].z, sal / 2.0)
    assert heat[0].zmin == 0 and heat[1].zmin == -1          # signed map on a diverging scale
    assert heat[1].xaxis == "x3"
    outlines = [s for s in fig.layout.shapes if s.name == "object mask"]
    assert [s.xref for s in outlines] == ["x", "x2", "x3"]   # the mask on every panel
    assert [a.text for a in fig.layout.annotations] == ["input + object mask", "rollout", "saliency"]


def test_mask_outline_traces_the_object_boundary():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 1  # rows 1-2, cols 2-4
    path = mask_outline_path(mask, (12, 16))  # 2x scale
    assert sorted(path.replace("M", " M").split()) == sorted(
        ["M4.00,2.00H10.00", "M4.00,6.00H10.00", "M4.00,2.00V6.00", "M10.00,2.00V6.00"])


def test_token_matrix_labels_and_block_mean():
    m = np.arange(25, dtype=float).reshape(5, 5)
    labels = token_labels(5, 1, ("cls",), (2, 2))
    assert labels == ["cls", "0,0", "0,1", "1,0", "1,1"]
    fig = fig_token_matrix(m, labels=labels)
    np.testing.assert_array_equal(fig.data[0].z, m)
    assert list(fig.data[0].y) == labels
    z, b = block_mean(np.ones((5, 7)), 3)
    assert b == 3 and z.shape == (2, 3) and np.allclose(z, 1)
    big = fig_token_matrix(np.eye(900), max_side=300)
    assert np.asarray(big.data[0].z).shape == (300, 300) and "blocks of 3" in big.layout.xaxis.title.text
