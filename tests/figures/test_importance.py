"""Importance figures, checked on their trace data; report views on a recording with stored importance."""

from __future__ import annotations

import numpy as np
import pytest

from attnviz.figures.importance import (
    fig_metric_scatter,
    fig_partial_pruning,
    fig_pruning_curves,
    fig_spearman_table,
)
from attnviz.figures.spatial import clicked_head


def test_metric_scatter_points_and_click():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = -x
    fig = fig_metric_scatter(x, y, x_name="a", y_name="b", selected=(1, 2), rho=-1.0)
    assert len(fig.data) == 3  # two layers + selected
    assert list(fig.data[1].x) == [4.0, 5.0, 6.0] and list(fig.data[1].y) == [-4.0, -5.0, -6.0]
    assert fig.data[1].customdata[2] == [1, 2]
    assert list(fig.data[2].x) == [6.0] and list(fig.data[2].y) == [-6.0]
    assert clicked_head({"points": [{"customdata": fig.data[0].customdata[1]}]}) == (0, 1)
    assert "rho = -1.00" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "a" and fig.layout.yaxis.title.text == "b"
    with pytest.raises(ValueError):
        fig_metric_scatter(x, y[:1], x_name="a", y_name="b")


def test_spearman_table():
    rho = np.array([[1.0, 0.5], [0.5, np.nan]])
    fig = fig_spearman_table(["a", "b"], rho, highlight=("a", "b"))
    hm = fig.data[0]
    assert list(hm.x) == ["a", "b"] and hm.zmin == -1 and hm.zmax == 1
    assert hm.text[0][1] == "0.50" and hm.text[1][1] == "n/a"
    assert fig.data[1].x == ("a",) and fig.data[1].y == ("b",)


def test_pruning_curves_band_and_lines():
    f = np.linspace(0, 1, 3)
    curves = {"accuracy_drop": np.array([0.9, 0.7, 0.1]), "entropy": np.array([0.9, 0.3, 0.1])}
    mean, std = np.array([0.9, 0.5, 0.1]), np.array([0.0, 0.1, 0.0])
    fig = fig_pruning_curves(f, curves, random_mean=mean, random_std=std, random_low=mean - 0.2,
                             random_high=mean + 0.2, auc={"accuracy_drop": 0.6, "entropy": 0.4},
                             random_auc=(0.5, 0.02), n_heads_total=10, highlight="entropy")
    upper, lower, rmean, rlo, rhi, acc, ent = fig.data
    np.testing.assert_allclose(upper.y, [0.9, 0.6, 0.1])
    np.testing.assert_allclose(lower.y, [0.9, 0.4, 0.1])
    assert lower.fill == "tonexty"
    np.testing.assert_allclose(rmean.y, mean)
    np.testing.assert_allclose(rlo.y, mean - 0.2)
    np.testing.assert_allclose(acc.y, curves["accuracy_drop"])
    assert acc.name == "accuracy_drop, AUC 0.600" and "0.500 +- 0.020" in rmean.name
    assert list(ent.customdata) == [0, 5, 10] and ent.line.width > acc.line.width


def test_partial_pruning():
    p = np.array([1.0, 0.5, 0.1])
    fig = fig_partial_pruning(p, np.array([0.9, 0.8, 0.2]), layer=1, head=3, base_accuracy=0.9,
                              kl=np.array([0.0, 0.1, 1.2]))
    assert list(fig.data[0].x) == [1.0, 0.5, 0.1] and list(fig.data[0].y) == [0.9, 0.8, 0.2]
    assert fig.data[1].yaxis == "y2" and list(fig.data[1].y) == [0.0, 0.1, 1.2]
    assert fig.layout.xaxis.autorange == "reversed"
    assert fig.layout.yaxis.title.text == "accuracy" and fig.layout.yaxis2.title.text == "KL divergence (nats)"
    assert "Layer 1, head 3" in fig.layout.title.text
    assert fig.layout.shapes[0].y0 == 0.9


def test_report_views(tmp_path):
    from attnviz.analysis import importance as A
    from attnviz.app.exports import VIEWS, load_views
    from attnviz.store.cache import save_analysis, write_head_metric
    from attnviz.store.schema import HeadMetricInfo
    from tests.analysis.test_importance import curves_fixture
    from tests.helpers import make_recording

    import attnviz

    load_views()

    path = make_recording(tmp_path / "r.h5", n_layers=2, n_heads=3)
    with attnviz.open(path) as rec:
        for name in ("importance_metrics", "importance_pruning", "importance_correlation"):
            assert VIEWS[name].make(rec, None) is None  # nothing stored yet: skipped
    rng = np.random.default_rng(0)
    for m in ("accuracy_drop", "gradient_importance"):
        write_head_metric(path, HeadMetricInfo(m, definition="d"), rng.random((2, 3)))
    arrays, attrs = curves_fixture().to_arrays()
    save_analysis(path, A.ANALYSIS_NAME, {}, arrays, attrs)
    with attnviz.open(path) as rec:
        grids = VIEWS["importance_metrics"].make(rec, None)
        assert [n for n, _ in grids] == ["accuracy_drop", "gradient_importance"]
        np.testing.assert_allclose(grids[0][1].data[0].z, rec.head_metric("accuracy_drop"), rtol=1e-6)
        curves = VIEWS["importance_pruning"].make(rec, None)
        assert "targets: predictions" in curves.layout.title.text
        corr = VIEWS["importance_correlation"].make(rec, None)
        assert list(corr.data[0].x) == ["accuracy_drop", "gradient_importance"]
