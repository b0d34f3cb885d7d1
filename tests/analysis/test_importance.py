"""Pure importance analysis: normalisation, pruning orders/masks, AUC, random baseline, Spearman table, storage."""

from __future__ import annotations

import numpy as np
import pytest

import attnviz
from attnviz.analysis import importance as A
from attnviz.store.cache import load_analysis, save_analysis
from tests.helpers import make_recording


def test_l2_normalize_per_layer():
    v = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(A.l2_normalize_per_layer(v), [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])


def test_pruning_order_directions_ties_and_nan():
    v = np.array([[0.5, 0.1], [0.1, np.nan]])
    # least important first; the 0.1 tie keeps (layer, head) order; NaN counts as least important
    np.testing.assert_array_equal(A.pruning_order(v), [3, 1, 2, 0])
    np.testing.assert_array_equal(A.pruning_order(np.array([[2.0, 1.0, 3.0]]), higher_is_more_important=False),
                                  [2, 0, 1])


def test_pruning_masks_are_cumulative():
    order = np.array([4, 0, 5, 1, 3, 2])
    masks = A.pruning_masks(order, (2, 3), A.pruning_fractions(3))
    assert masks.shape == (4, 2, 3)
    np.testing.assert_array_equal(masks.reshape(4, -1).sum(1), [0, 2, 4, 6])
    np.testing.assert_array_equal(np.flatnonzero(masks[1]), [0, 4])
    np.testing.assert_array_equal(np.flatnonzero(masks[2]), [0, 1, 4, 5])
    with pytest.raises(ValueError):
        A.pruning_masks(np.array([0, 0, 1, 2, 3, 4]), (2, 3), [0.5])


def test_pruning_fractions_and_partial_fractions():
    np.testing.assert_allclose(A.pruning_fractions(10), np.arange(11) / 10)
    assert A.PARTIAL_FRACTIONS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def test_curve_auc_by_hand():
    # trapezoids over [0, .5, 1]: (1 + .8)/2 * .5 + (.8 + .2)/2 * .5 = .45 + .25
    assert A.curve_auc([0, 0.5, 1.0], [1.0, 0.8, 0.2]) == pytest.approx(0.7)
    assert A.curve_auc(A.pruning_fractions(10), np.full(11, 0.3)) == pytest.approx(0.3)


def test_random_orders_are_seeded_permutations():
    a = A.random_orders(12, 3)
    assert a.shape == (3, 12) and all(sorted(r) == list(range(12)) for r in a)
    np.testing.assert_array_equal(a, A.random_orders(12, [0, 1, 2]))
    assert not np.array_equal(a[0], a[1])


def test_random_baseline():
    curves = np.array([[1.0, 0.6, 0.0], [1.0, 0.2, 0.0]])
    rb = A.random_baseline(np.array([0, 0.5, 1.0]), curves)
    np.testing.assert_allclose(rb.mean, [1.0, 0.4, 0.0])
    np.testing.assert_allclose(rb.std, [0.0, 0.2, 0.0])
    np.testing.assert_allclose(rb.low, [1.0, 0.2, 0.0])
    np.testing.assert_allclose(rb.high, [1.0, 0.6, 0.0])
    # AUCs 0.55 and 0.35
    assert rb.auc_mean == pytest.approx(0.45) and rb.auc_std == pytest.approx(0.1)


def test_spearman_table_against_the_rank_formula():
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([[10.0, 30.0, 20.0], [40.0, 60.0, 50.0]])
    names, rho = A.spearman_table({"a": a, "b": b, "neg": -a, "const": np.ones((2, 3))})
    assert names == ["a", "b", "neg", "const"]
    # ranks of b: 1 3 2 4 6 5 -> d = 0 1 1 0 1 1 -> rho = 1 - 6*4 / (6*35)
    assert rho[0, 1] == pytest.approx(1 - 6 * 4 / (6 * 35)) and rho[1, 0] == rho[0, 1]
    assert rho[0, 2] == pytest.approx(-1.0) and rho[0, 0] == 1.0
    assert np.isnan(rho[0, 3]) and np.isnan(rho[3, 3])


def curves_fixture(n_metrics=2):
    rng = np.random.default_rng(0)
    return A.ImportanceCurves(
        target_source="prediction", ablation="zero", n_samples=6, base_accuracy=1.0, base_loss=0.25,
        partial_fractions=np.array(A.PARTIAL_FRACTIONS), partial_accuracy=rng.random((2, 3, 10)),
        partial_loss=rng.random((2, 3, 10)), partial_kl=rng.random((2, 3, 10)),
        pruning_fractions=A.pruning_fractions(10), pruning_metrics=("accuracy_drop", "entropy")[:n_metrics],
        pruning_accuracy=rng.random((n_metrics, 11)), pruning_order=np.stack([rng.permutation(6)] * n_metrics),
        random_accuracy=rng.random((3, 11)), gradient_raw=rng.random((2, 3)),
    )


def test_importance_curves_round_trip(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_layers=2, n_heads=3)
    c = curves_fixture()
    arrays, attrs = c.to_arrays()
    save_analysis(path, A.ANALYSIS_NAME, {"p": 1}, arrays, attrs)
    with attnviz.open(path) as rec:
        back = A.read_importance(rec)
        assert load_analysis(rec, A.ANALYSIS_NAME, {"p": 1}) is not None
        assert load_analysis(rec, A.ANALYSIS_NAME, {"p": 2}) is None
        g = rec.analysis_group(A.ANALYSIS_NAME)
        assert g.attrs["target_source"] == "prediction"
        assert g.attrs["auc_entropy"] == pytest.approx(A.curve_auc(c.pruning_fractions, c.pruning_accuracy[1]))
    assert back.pruning_metrics == c.pruning_metrics and back.target_source == "prediction"
    assert back.n_samples == 6 and back.base_loss == 0.25
    for k in A.ImportanceCurves._ARRAYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(c, k))
    np.testing.assert_array_equal(back.curve("entropy"), c.pruning_accuracy[1])
    assert back.random.auc_mean == pytest.approx(np.mean([A.curve_auc(c.pruning_fractions, r)
                                                          for r in c.random_accuracy]))


def test_read_importance_absent(tmp_path):
    with attnviz.open(make_recording(tmp_path / "r.h5")) as rec:
        assert A.read_importance(rec) is None


def test_metric_definitions_have_formula_and_citation():
    for name, d in A.METRIC_DEFINITIONS.items():
        assert d.name == name and d.definition and "Michel" in d.citation
