"""Localization figures on their trace data, and the Spatial page's localization callback."""

from __future__ import annotations

import numpy as np

from attnviz.figures.localization import fig_localization, fig_localization_by_layer


def test_scores_figure_rows_and_baselines():
    energy = np.array([[0.1, 0.9], [0.3, 0.5]])
    hit = np.array([[0.0, 1.0], [0.5, 0.5]])
    fig = fig_localization(energy, hit, method_energy={"saliency": 0.4}, method_hit={"saliency": 0.6},
                           baseline_energy=0.2, baseline_pointing=0.3, n_images=5, selected=(1, 0))
    e, h = fig.data
    assert list(e.y) == ["selected L1 H0", "median head", "best head L0 H1", "saliency"]
    assert list(e.x) == [0.3, 0.4, 0.9, 0.4] and list(h.x) == [0.5, 0.5, 1.0, 0.6]
    assert [s.x0 for s in fig.layout.shapes] == [0.2, 0.3]  # the uniform baselines, dashed
    assert "5 images" in fig.layout.title.text


def test_by_layer_dots_carry_their_head():
    fig = fig_localization_by_layer(np.array([[0.1, 0.9], [0.3, 0.5]]), baseline_energy=0.2, selected=(0, 1))
    dots = fig.data[0]
    assert np.asarray(dots.customdata).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert list(dots.y) == [0.1, 0.9, 0.3, 0.5] and fig.layout.shapes[0].y0 == 0.2
    assert fig.data[1].y[0] == 0.9  # the selected head ringed


def test_spatial_page_shows_stored_scores_or_says_how(tmp_path):
    from attnviz.analysis.localization import analyze_localization
    from attnviz.app import create_app
    from tests.helpers import make_recording

    with_masks = make_recording(tmp_path / "m.h5")
    no_masks = make_recording(tmp_path / "n.h5", with_masks=False)
    analyze_localization(with_masks)
    create_app([with_masks, no_masks])
    from attnviz.app.pages import spatial

    sel = {"file": "m.h5", "sample": 0, "layer": 1, "head": 2, "query": None}
    scores, layers = spatial.localization(sel)
    assert "selected L1 H2" in list(scores.data[0].y) and len(layers.data[0].y) == 2 * 3
    msg, _ = spatial.localization({**sel, "file": "n.h5"})
    assert "no object masks" in msg.layout.annotations[0].text
