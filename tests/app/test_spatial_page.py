"""The Spatial page's callbacks called as plain functions (no browser)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from dash import no_update

import attnviz
from attnviz.analysis.spatial import analyze_spatial, load_spatial, spatial_for_sample
from attnviz.app import create_app
from attnviz.store import Recording, RecordingWriter, SampleBatch, StackSpec, TokenLayout
from tests.helpers import make_recording, random_attention


def _ops(p) -> dict:
    """The keys a selection dash.Patch assigns, as a dict."""
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


def _page(path):
    create_app([path])
    from attnviz.app.pages import spatial  # after create_app (register_page needs the app)

    return spatial


def _sel(path, **kw) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


@pytest.fixture()
def analysed(tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=5, n_layers=3, n_heads=4, grid=(3, 4))
    analyze_spatial(path)  # before the app opens the file
    return path


def test_missing_cache_says_how_to_compute_and_one_image_still_works(tmp_path):
    path = make_recording(tmp_path / "raw.h5", n_samples=3, n_layers=2, n_heads=3, grid=(2, 3))
    S = _page(path)
    status, label, _, _ = S.status(_sel(path), "mean")
    assert "attnviz analyze raw.h5" in status.children and "img_000.png" in label
    fig, _ = S.trends(_sel(path), "mean", "raw")
    assert "attnviz analyze raw.h5" in fig.layout.annotations[0].text.replace("<br>", " ")
    # the selected image is computed on demand from its maps, without the cache
    fig, _ = S.trends(_sel(path, sample=2), "image", "raw")
    with attnviz.open(path) as rec:
        expected = spatial_for_sample(rec, 2).mean_distance
    custom = np.asarray(fig.data[0].customdata)
    np.testing.assert_allclose(fig.data[0].y, expected[custom[:, 0], custom[:, 1]], rtol=1e-6)


def test_trend_and_head_views_show_the_cached_values_of_the_selected_head(analysed):
    S = _page(analysed)
    with attnviz.open(analysed) as rec:
        prof = load_spatial(rec)
        stored = rec.head_metric("mean_attention_distance")
    sel = _sel(analysed, layer=2, head=1)
    dist, local = S.trends(sel, "mean", "raw")
    custom = np.asarray(dist.data[0].customdata)
    np.testing.assert_allclose(dist.data[0].y, stored[custom[:, 0], custom[:, 1]], rtol=1e-6)
    assert list(dist.data[2].customdata[0]) == [2, 1]  # the selected head is marked
    np.testing.assert_allclose(local.data[0].y, prof.local_share[custom[:, 0], custom[:, 1]], rtol=1e-6)
    patches, _ = S.trends(sel, "mean", "patches")
    np.testing.assert_allclose(patches.data[0].y, prof.mean_distance_patches[custom[:, 0], custom[:, 1]], rtol=1e-6)

    offset, qmap = S.head_views(sel, "mean", [], "raw")
    np.testing.assert_allclose(np.asarray(offset.data[0].z), prof.offset_profile[2, 1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qmap.data[0].z), prof.query_distance[2, 1], rtol=1e-6)
    hidden, _ = S.head_views(sel, "mean", ["hide"], "raw")
    assert np.isnan(np.asarray(hidden.data[0].z, dtype=float)[2, 3])  # the centre of a (5, 7) profile


def test_selected_image_view_uses_that_image(analysed):
    S = _page(analysed)
    sel = _sel(analysed, sample=3, layer=1, head=3)
    offset, _ = S.head_views(sel, "image", [], "raw")
    with attnviz.open(analysed) as rec:
        one = spatial_for_sample(rec, 3)
        mean = load_spatial(rec)
    np.testing.assert_allclose(np.asarray(offset.data[0].z), one.offset_profile[1, 3], rtol=1e-6)
    assert not np.allclose(np.asarray(offset.data[0].z), mean.offset_profile[1, 3])
    fig = S.image_vs_mean(sel, "raw")
    pts = fig.data[0]
    for x, y, (layer, head) in zip(pts.x, pts.y, pts.customdata):
        assert x == pytest.approx(mean.mean_distance[layer, head], rel=1e-6)
        assert y == pytest.approx(mean.image_mean_distance[3, layer, head], rel=1e-6)


def test_layer_views_radial_and_shares(analysed):
    S = _page(analysed)
    with attnviz.open(analysed) as rec:
        prof = load_spatial(rec)
    radial, shares = S.layer_views(_sel(analysed, layer=1, head=0), "mean", "euclidean", "mass")
    rad = prof.radial("euclidean")
    assert len(radial.data) == 4
    for h, tr in enumerate(radial.data):
        np.testing.assert_allclose(tr.y, rad.mass[1, h], rtol=1e-6)
    for i, tr in enumerate(shares.data):
        np.testing.assert_allclose(tr.y, prof.shares[1, :, i], rtol=1e-6)


def test_clicks_select_heads_and_buttons_step_images(analysed):
    S = _page(analysed)
    assert _ops(S.select_head({"points": [{"customdata": [2, 3]}]})) == {"layer": 2, "head": 3}
    assert S.select_head({"points": [{"x": 1}]}) is no_update
    # a click on a real trend point round-trips to the head it shows
    fig, _ = S.trends(_sel(analysed), "mean", "raw")
    layer, head = fig.data[0].customdata[7]
    assert _ops(S.select_head({"points": [{"customdata": list(fig.data[0].customdata[7])}]})) == \
        {"layer": layer, "head": head}
    assert _ops(S.next_image(1, _sel(analysed, sample=1))) == {"sample": 2}
    assert _ops(S.previous_image(1, _sel(analysed, sample=1))) == {"sample": 0}
    assert S.previous_image(1, _sel(analysed, sample=0)) is no_update
    assert S.next_image(1, _sel(analysed, sample=4)) is no_update


def test_page_never_streams_over_all_samples(analysed, monkeypatch):
    """Requests read the cache; only the one selected image's maps may be read."""
    S = _page(analysed)
    original = Recording.iter_attention

    def guarded(self, kind=None, *, samples=None, batch_size=16):
        assert samples is not None and len(samples) == 1, "a request read more than one image's maps"
        return original(self, kind, samples=samples, batch_size=batch_size)

    monkeypatch.setattr(Recording, "iter_attention", guarded)
    sel = _sel(analysed, sample=4, layer=1, head=1)
    for view in ("mean", "image"):
        S.status(sel, view)
        S.trends(sel, view, "raw")
        S.head_views(sel, view, [], "patches")
        S.layer_views(sel, view, "chebyshev", "strength")
    S.image_vs_mean(sel, "raw")


def test_lvlm_recording_uses_the_vision_tower(tmp_path):
    n, grid, tv = 2, (2, 2), 5
    w = RecordingWriter.create(
        tmp_path / "l.h5", family="lvlm", model_name="tiny-llava", model_class="LlavaForConditionalGeneration",
        sample_ids=["a.png", "b.png"],
        stacks=[StackSpec("self", 2, 2, 6, 6, TokenLayout()),
                StackSpec("vision", 3, 2, tv, tv, TokenLayout(n_prefix=1, grid=grid, patch_size=(14, 14)))],
        class_names=["x"], labels=None, thumbnail_shape=(28, 28), batch_size=n)
    rng = np.random.default_rng(0)
    with w:
        w.write(SampleBatch(start=0, attention={"self": random_attention(rng, (n, 2, 2, 6, 6)),
                                                "vision": random_attention(rng, (n, 3, 2, tv, tv))},
                            predictions=np.zeros(n, int), logits=np.zeros((n, 1), np.float32),
                            thumbnails=np.zeros((n, 28, 28, 3), np.uint8)))
        w.finish()
    prof, _ = analyze_spatial(tmp_path / "l.h5")
    S = _page(tmp_path / "l.h5")
    sel = {"file": "l.h5", "sample": 0, "layer": 2, "head": 1, "query": None}
    status, _, main_style, vision_style = S.status(sel, "mean")
    assert main_style == {"display": "none"} and vision_style == {}
    assert "vision" in status.children
    dist, _ = S.trends(sel, "mean", "raw")
    assert len(dist.data[0].x) == 6 and list(dist.data[2].customdata[0]) == [2, 1]  # 3 vision layers x 2 heads
    offset, _ = S.head_views(sel, "mean", [], "raw")
    np.testing.assert_allclose(np.asarray(offset.data[0].z), prof.offset_profile[2, 1], rtol=1e-6)


@pytest.mark.browser
def test_spatial_page_in_a_browser(dash_duo, analysed):
    """The real page renders its figures, a click on a head selects it, and the console stays clean."""
    from selenium.webdriver.common.action_chains import ActionChains

    app = create_app([analysed])
    dash_duo.start_server(app)
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/spatial")
    dash_duo.wait_for_element("#spatial-trend .scatterlayer .point", timeout=20)
    dots = dash_duo.driver.find_elements("css selector", "#spatial-trend .scatterlayer .trace:first-child .point")
    assert len(dots) == 3 * 4  # every head of the 3x4 model is a dot
    # click a head's dot (plotly takes clicks on its drag layer above the points: click where the dot is)
    dot = dash_duo.driver.find_elements("css selector", "#spatial-trend .scatterlayer .trace:first-child .point")[7]
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", dot)
    ActionChains(dash_duo.driver).move_to_element(dot).pause(0.5).click().perform()
    dash_duo.wait_for_contains_text("#spatial-offset", "Layer 1, head 3", timeout=20)  # dot 7 = layer 1, head 3
    # no console errors; a callback of another page waiting for its own components is that page's to fix
    other_page = re.compile(r"nonexistent object was used in an `Input`.*The id of this object is `(?!spatial)")
    assert [e["message"][:300] for e in dash_duo.get_logs() if not other_page.search(e["message"])] == []
