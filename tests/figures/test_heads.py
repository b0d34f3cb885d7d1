from __future__ import annotations

import numpy as np

from attnviz.figures.heads import fig_head_grid


def test_grid_is_one_heatmap_of_the_values_with_selected_outline():
    values = np.arange(24 * 16, dtype=float).reshape(24, 16)
    values[3, 4] = np.nan
    fig = fig_head_grid(values, metric="entropy", selected=(5, 7), units="nats")
    heat = fig.data[0]
    assert heat.type == "heatmap" and len(fig.data) == 1  # one trace for all 384 heads
    z = np.asarray(heat.z, dtype=float)
    np.testing.assert_array_equal(z[~np.isnan(z)], values[~np.isnan(values)])
    assert np.isnan(z[3, 4])
    assert list(heat.x) == list(range(16)) and list(heat.y) == list(range(24))
    box = fig.layout.shapes[0]  # x = head, y = layer
    assert (box.x0, box.x1, box.y0, box.y1) == (6.5, 7.5, 4.5, 5.5)
    assert fig.layout.yaxis.autorange == "reversed"       # layer 0 at the top
    assert "nats" in heat.hovertemplate and "entropy" in heat.colorbar.title.text


def test_grid_without_selection_has_only_the_heatmap():
    fig = fig_head_grid(np.zeros((2, 3)), metric="x")
    assert len(fig.data) == 1 and not fig.layout.shapes
