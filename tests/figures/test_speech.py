"""The speech figures: their trace data, and that they are valid plotly figures (they are built unvalidated for
speed, so this test validates every one of them)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from attnviz.figures import decode_data_uri
from attnviz.figures.speech import (
    colourise,
    fig_clip,
    fig_correlation_grid,
    fig_deletion,
    fig_token_alignment,
    highlight_shape,
)


def _valid(fig: go.Figure) -> go.Figure:
    """Check the figure by rebuilding it WITH plotly's validation (raises on any invalid property); returns it."""
    go.Figure(fig.to_dict())
    return fig


def test_colourise_maps_low_to_high_through_the_scale():
    img = colourise(np.array([[0.0, 0.5, 1.0], [np.nan, 0.25, 1.0]]))
    assert img.shape == (2, 3, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, 0], [68, 1, 84])  # viridis' first colour
    np.testing.assert_array_equal(img[0, 2], [253, 231, 37])  # and its last
    np.testing.assert_array_equal(img[1, 0], img[0, 0])  # NaN -> the lowest colour
    assert (colourise(np.ones((2, 2))) == img[0, 0]).all()  # a constant map


def test_clip_figure():
    env = np.stack([-np.linspace(0, 1, 200), np.linspace(0, 1, 200)])
    mel = np.random.default_rng(0).random((16, 100))
    fig = _valid(fig_clip(env, 0.005, mel, 0.01, duration=1.0, reference=[("one", 0.1, 0.3)],
                          aligned=[("one", 0.05, 0.35)], highlight=(0.05, 0.35), title="clip"))
    mx, mn, img = fig.data
    np.testing.assert_allclose(mx.x[:2], [0.0025, 0.0075])  # bin centres
    assert mn.fill == "tonexty" and img.type == "image" and img.x0 == 0.005 and img.dx == 0.01
    pixels = decode_data_uri(img.source)
    assert pixels.shape[:2] == (16, 100)
    np.testing.assert_array_equal(pixels[-1, :, :3], colourise(mel)[0])  # mel bin 0 at the bottom
    assert [s.name for s in fig.layout.shapes][-1] == "selected" and fig.layout.shapes[-1].x0 == 0.05
    assert [a.text for a in fig.layout.annotations] == ["one", "one"]
    assert fig.layout.yaxis2.scaleanchor is False  # not squeezed to square pixels
    hidden = highlight_shape(None)
    assert hidden["visible"] is False and highlight_shape((0.1, 0.2))["x1"] == 0.2


def test_token_alignment_figure():
    e = 50
    curves = {"head": np.eye(e)[10] * 0.4, "layer mean": np.full(e, 0.02), "saliency (mean)": np.arange(e, dtype=float)}
    fig = _valid(fig_token_alignment(np.random.default_rng(1).random((8, 100)), 0.01, curves, 0.02, duration=1.0,
                                     span=(0.2, 0.3), aligned_span=(0.18, 0.32), title="t", subtitle="s"))
    assert fig.data[0].type == "image"
    head = fig.data[1]
    np.testing.assert_allclose(head.x, (np.arange(e) + 0.5) * 0.02)
    assert head.y[10] == 1.0 and head.customdata[10] == pytest.approx(0.4)  # scaled to max, raw in the hover
    assert fig.data[3].line.dash == "dot" and len(fig.layout.shapes) == 2
    no_map = _valid(fig_token_alignment(None, 0.01, curves, 0.02, duration=1.0))
    assert all(t.type == "scatter" for t in no_map.data) and "yaxis2" not in no_map.layout.to_plotly_json()


def test_correlation_grid_and_deletion():
    values = np.array([[0.1, -0.2], [0.9, np.nan]])
    grid = _valid(fig_correlation_grid(values, selected=(1, 0), label="pearson r"))
    assert (grid.data[0].zmin, grid.data[0].zmax) == (-1, 1) and grid.layout.shapes[0].y0 == 0.5
    f = np.linspace(0, 1, 3)
    fig = _valid(fig_deletion(f, {"ca_mean": np.array([0.9, 0.5, 0.1]), "random": np.array([0.9, 0.8, 0.1])},
                              {"ca_mean": 0.5, "random": 0.65}))
    assert [t.name for t in fig.data] == ["ca_mean (AUC 0.500)", "random (AUC 0.650)"]
    np.testing.assert_allclose(fig.data[0].x, [0, 50, 100]) and fig.data[1].line.dash == "dot"
