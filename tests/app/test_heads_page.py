"""The Heads page's callbacks called as plain functions (no browser), plus one browser check."""

from __future__ import annotations

import numpy as np
import pytest
from dash import no_update

from attnviz.analysis import importance as A
from attnviz.app import create_app
from attnviz.store.cache import save_analysis, write_head_metric
from attnviz.store.schema import HeadMetricInfo
from tests.analysis.test_importance import curves_fixture
from tests.helpers import make_recording

L, H = 2, 3


def _ops(p) -> dict:
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


def _page(path):
    create_app([path])
    from attnviz.app.pages import heads  # after create_app (register_page needs the app)

    return heads


def text(fig) -> str:
    """The message of a fig_message figure, line breaks undone."""
    return fig.layout.annotations[0].text.replace("<br>", " ")


def _sel(path, **kw) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


def store_importance(path, target_source="prediction"):
    rng = np.random.default_rng(0)
    values = {}
    for name, d in A.METRIC_DEFINITIONS.items():
        values[name] = rng.random((L, H))
        write_head_metric(path, HeadMetricInfo(name, definition=d.definition, citation=d.citation, units=d.units),
                          values[name])
    c = curves_fixture(2)
    arrays, attrs = c.to_arrays()
    attrs["target_source"] = target_source
    save_analysis(path, A.ANALYSIS_NAME, {}, arrays, attrs)
    return values, c


@pytest.fixture()
def measured(tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=4, n_layers=L, n_heads=H)
    values, c = store_importance(path)
    return path, values, c


def test_without_importance_the_page_says_how_to_compute_it(tmp_path):
    path = make_recording(tmp_path / "raw.h5", n_samples=3, n_layers=L, n_heads=H)
    page = _page(path)
    status = page.status(_sel(path))
    assert "attnviz importance --model MODEL --input IMAGES --into raw.h5" in status.children
    assert "attnviz importance" in text(page.pruning(_sel(path), None))
    assert "attnviz importance" in text(page.partial(_sel(path)))
    scatter, table = page.comparison(_sel(path), "entropy", "confidence")
    assert "attnviz importance" in text(scatter)


def test_status_and_definitions_say_what_the_targets_were(measured):
    path, _, c = measured
    page = _page(path)
    status = page.status(_sel(path, layer=1, head=2))
    assert "own predictions" in status.children and "zero ablation" in status.children
    assert "layer 1, head 2" in status.children and "av-msg-warning" in status.className
    defs = page.definitions(_sel(path), "gradient_importance")
    first = defs[0]
    assert first.children[0].children.startswith("gradient_importance")
    assert "Michel" in first.children[-1].children and "dL" in first.children[2].children
    listed = [d.children[0].children.split(" [")[0] for d in defs[:-1]]
    assert set(listed) == {*A.METRIC_DEFINITIONS, "entropy", "confidence"}


def test_scatter_and_spearman_show_the_stored_metrics(measured):
    path, values, _ = measured
    page = _page(path)
    opts, x, _, y = page.axes(_sel(path), None, None, None)
    assert (x, y) == ("accuracy_drop", "gradient_importance")
    assert [o["value"] for o in opts][:4] == list(A.METRIC_DEFINITIONS)
    scatter, table = page.comparison(_sel(path, layer=1, head=1), x, y)
    pts = {tuple(cd): (px, py) for tr in scatter.data[:L] for cd, px, py in zip(tr.customdata, tr.x, tr.y)}
    for l in range(L):
        for h in range(H):
            assert pts[(l, h)] == pytest.approx((values[x][l, h], values[y][l, h]), rel=1e-6)
    assert list(scatter.data[-1].x) == pytest.approx([values[x][1, 1]])  # the selected head
    names = list(table.data[0].x)
    expected = A.spearman_table({m: values[m] for m in A.METRIC_DEFINITIONS})[1]
    np.testing.assert_allclose(np.asarray(table.data[0].z, float)[:4, :4], expected, rtol=1e-5)
    assert names[:4] == list(A.METRIC_DEFINITIONS)


def test_spearman_click_picks_the_pair_and_scatter_click_selects_the_head(measured, monkeypatch):
    path, _, _ = measured
    page = _page(path)
    monkeypatch.setattr(page, "triggered_id", lambda: page.SPEARMAN)
    _, x, _, y = page.axes(_sel(path), {"points": [{"x": "kl_divergence", "y": "entropy"}]},
                           "accuracy_drop", "gradient_importance")
    assert (x, y) == ("kl_divergence", "entropy")
    assert _ops(page.pick({"points": [{"customdata": [1, 2]}]})) == {"layer": 1, "head": 2}
    assert page.pick({"points": [{"x": 0.5}]}) is no_update


def test_pruning_curves_and_partial_curve_of_the_selected_head(measured):
    path, _, c = measured
    page = _page(path)
    fig = page.pruning(_sel(path), "entropy")
    lines = {tr.name.split(",")[0]: tr for tr in fig.data if tr.name and tr.name in
             {f"{m}, AUC {c.auc[m]:.3f}" for m in c.pruning_metrics}}
    np.testing.assert_allclose(lines["entropy"].y, c.curve("entropy"))
    assert lines["entropy"].line.width > lines["accuracy_drop"].line.width
    np.testing.assert_allclose(fig.data[2].y, c.random_accuracy.mean(0))  # random mean
    assert "agreement" in fig.layout.yaxis.title.text  # targets were predictions
    part = page.partial(_sel(path, layer=1, head=2))
    np.testing.assert_allclose(part.data[0].y, c.partial_accuracy[1, 2])
    np.testing.assert_allclose(part.data[1].y, c.partial_kl[1, 2])
    assert "Layer 1, head 2" in part.layout.title.text


@pytest.mark.browser
def test_heads_page_in_the_browser(dash_duo, tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=4, n_layers=L, n_heads=H)
    store_importance(path, "label")
    app = create_app([path])
    dash_duo.start_server(app)
    dash_duo.wait_for_page(url=dash_duo.server_url + "/heads")
    dash_duo.wait_for_contains_text(f"#{'heads-status'}", "Targets: the true labels", timeout=20)
    dash_duo.wait_for_element("#heads-pruning .main-svg", timeout=20)
    dash_duo.wait_for_element("#heads-spearman .main-svg", timeout=20)
    assert dash_duo.get_logs() == []
