"""The Vision-language page on a tiny LLaVA recording: callbacks as plain functions (values against the
recording read directly), the other pages on an lvlm recording, and the real page in headless Chromium."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dash import no_update

import attnviz
from attnviz.app import create_app
from attnviz.figures.vlm import plain_text
from tests.app.test_qk_page import _click, _point  # screen position of a data point; a real mouse click
from tests.helpers import LVLM_QUESTIONS, LVLM_TAU, make_recording


def _ops(p) -> dict:
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


@pytest.fixture(scope="module")
def lvlm(lvlm_run, tmp_path_factory) -> Path:
    """A copy of the shared recording (the other pages' analyses are added to it here)."""
    path = tmp_path_factory.mktemp("vlm-page") / "vqa.h5"
    shutil.copy(lvlm_run["full"], path)
    return path


def _page(path: Path):
    create_app([path])
    from attnviz.app.pages import vlm  # after create_app (register_page needs the app)

    return vlm


def _sel(path: Path, **kw) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


def test_image_figure_is_the_heads_attention_of_the_chosen_answer_token(lvlm: Path) -> None:
    page = _page(lvlm)
    s, layer, head, j = 1, 1, 2, 1
    with attnviz.open(lvlm) as rec:
        meta = rec.meta(s)
        start, stop = meta["image_span"]
        step = meta["answer_span"][0] - 1 + j
        row = rec.attention(s, layer, head, "self")[step]
        phi = rec.per_sample("sink_phi", s)[layer, start:stop]
    fig = page.image(_sel(lvlm, sample=s, layer=layer, head=head), j)
    np.testing.assert_allclose(fig.data[1].z, row[start:stop].reshape(4, 4), rtol=1e-6)
    assert f"answer token '{plain_text(meta['generated_tokens'][j])}'" in fig.layout.title.text
    assert f"{row[start:stop].sum():.0%} of its attention on the image" in fig.layout.title.subtitle.text
    marks = [sh for sh in fig.layout.shapes if sh.name == "sink"]
    assert len(marks) == int((phi > LVLM_TAU).sum())
    # token choices are the generated tokens; an out-of-range choice falls back to the first
    options, value = page.token_options(_sel(lvlm, sample=s), 7)
    assert [o["label"] for o in options] == meta["generated_tokens"] and value == 0


def test_heatmaps_and_bars_show_the_token_or_the_recording_means(lvlm: Path) -> None:
    page = _page(lvlm)
    s, j = 2, 0
    with attnviz.open(lvlm) as rec:
        meta = rec.meta(s)
        start, stop = meta["image_span"]
        step = meta["answer_span"][0] - 1 + j
        ratio = np.array([[rec.attention(s, l, h, "self")[step, start:stop].sum() for h in range(4)] for l in range(2)])
        vhd = rec.per_sample("vhd", s)[:, :, j]
        mean_ratio, mean_vhd = rec.head_metric("image_attention_ratio"), rec.head_metric("vhd")
    f_ratio, f_vhd = page.heatmaps(_sel(lvlm, sample=s, layer=1, head=3), j, "token")
    np.testing.assert_allclose(f_ratio.data[0].z, ratio, rtol=1e-5)
    np.testing.assert_allclose(f_vhd.data[0].z, vhd, rtol=1e-6)
    assert f_ratio.layout.shapes[0].x0 == 2.5 and f_ratio.layout.shapes[0].y0 == 0.5  # L1 H3 outlined
    f_ratio, f_vhd = page.heatmaps(_sel(lvlm, sample=s), j, "mean")
    np.testing.assert_allclose(f_ratio.data[0].z, mean_ratio)
    np.testing.assert_allclose(f_vhd.data[0].z, mean_vhd)
    bars = page.bars(_sel(lvlm, sample=s, layer=1, head=3), 0)
    assert bars.data[0].y[0] == pytest.approx(ratio[1, 3], rel=1e-5)
    assert list(bars.data[0].customdata) == [plain_text(t) for t in meta["generated_tokens"]]


def test_clicks_and_the_question_list_write_the_selection(lvlm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = _page(lvlm)
    monkeypatch.setattr(page, "user_triggered", lambda: page.VHD)
    assert _ops(page.pick_head(None, {"points": [{"x": 3, "y": 1, "z": 0.2}]})) == {"layer": 1, "head": 3}
    monkeypatch.setattr(page, "user_triggered", lambda: page.RATIO)
    assert _ops(page.pick_head({"points": [{"x": 2, "y": 0}]}, None)) == {"layer": 0, "head": 2}
    monkeypatch.setattr(page, "user_triggered", lambda: None)
    assert page.pick_head({"points": [{"x": 2, "y": 0}]}, None) is no_update
    assert page.choose_question(3, _sel(lvlm)) is no_update  # page insertion
    monkeypatch.setattr(page, "user_triggered", lambda: page.QUESTION)
    assert _ops(page.choose_question(3, _sel(lvlm))) == {"sample": 3}
    options, value = page.question_options(_sel(lvlm, sample=4))
    assert len(options) == len(LVLM_QUESTIONS) and value == 4 and LVLM_QUESTIONS[4]["prompt"] in options[4]["label"]


def test_answers_status_centric_and_sinks(lvlm: Path) -> None:
    page = _page(lvlm)
    with attnviz.open(lvlm) as rec:
        meta = rec.meta(1)
        centric = rec.head_metric("image_centric")
    text = str(page.answers(_sel(lvlm, sample=1)))
    assert meta["generated"] in text and meta["reinforced"]["generated"] in text and "reinforced (×3.0)" in text
    assert "5 questions" in str(page.status(_sel(lvlm)))
    listing = str(page.centric(_sel(lvlm)))
    if centric.any():
        assert all(f"L{l} H{h}" in listing for l, h in zip(*np.nonzero(centric)))
    else:
        assert "No head meets both thresholds" in listing
    assert "phi > 3" in listing
    with attnviz.open(lvlm) as rec:
        from attnviz.analysis.lvlm import load_summary

        per_image = load_summary(rec)["sinks_per_image"]
    fig = page.sinks(_sel(lvlm))
    if np.any(per_image):
        assert fig.data[0].z.shape == (4, 9)  # two layers of 4x4 side by side, one NaN column between
    else:
        assert "No visual sink token in any layer at tau 3" in fig.layout.annotations[0].text


def test_the_page_explains_itself_on_a_vit_recording(tmp_path: Path) -> None:
    vit = make_recording(tmp_path / "vit.h5")
    page = _page(vit)
    assert "vit recording" in str(page.status(_sel(vit)))
    assert page.image(_sel(vit), 0).layout.annotations


def test_the_other_pages_work_on_an_lvlm_recording(lvlm: Path) -> None:
    """Explorer, spatial and patterns read the vision tower; the overview shows thumbnails and answers."""
    from attnviz.analysis.spatial import analyze_step
    from attnviz.app.views import explorer_kind, model_card, query_overlay, thumbnail_page

    analyze_step(lvlm, show_bar=False)
    create_app([lvlm])
    from attnviz.app.pages import explorer, heads, overview, patterns, spatial

    sel = _sel(lvlm, layer=1, head=1)
    with attnviz.open(lvlm) as rec:
        assert explorer_kind(rec) == "vision"
        fig = query_overlay(rec, 0, 1, 1, None)
        assert fig.data[1].z.shape == (4, 4)
        assert dict(model_card(rec))["attention 'vision'"].startswith("2 × 4, 4×4 patches")
        assert thumbnail_page(rec).n_matching == len(LVLM_QUESTIONS)
    assert explorer.slider_state(sel)[1] == 1  # layers of the tower
    status = str(spatial.status(sel, "all")[0])
    assert "vision stack" in status and "4x4 patches" in status and "av-msg-error" not in status
    assert "No pattern atlas" in str(patterns.status(sel)[0])  # how to make it, not an error
    assert "av-msg-error" not in str(heads.status(sel))
    assert "LlavaForConditionalGeneration" in str(overview.card(sel)[0])
    card = str(overview.sample_card(sel))
    assert "prediction" in card and "nan" not in card  # the answer is the prediction; no class scores


def _heat(dash_duo: Any) -> list[list[float]]:
    return dash_duo.driver.execute_script(
        "return document.querySelector('#vlm-image .js-plotly-plot')._fullData[1].z;")


@pytest.mark.browser
def test_vlm_page_in_a_browser(dash_duo, lvlm: Path) -> None:
    """Click an answer token: the image shows that token's attention; click a heatmap cell: that head is
    selected (status, title, outline); values as in the file; no console errors."""
    with attnviz.open(lvlm) as rec:
        meta = rec.meta(0)
        start, stop = meta["image_span"]
        first = meta["answer_span"][0] - 1
        want = {(l, h, j): rec.attention(0, l, h, "self")[first + j, start:stop].reshape(4, 4)
                for l in range(2) for h in range(4) for j in range(len(meta["generated_ids"]))}
    app = create_app([lvlm])
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#attnviz-file-picker", timeout=15)
    dash_duo.driver.get(dash_duo.server_url + "/vlm")
    dash_duo.wait_for_contains_text("#vlm-status", "5 questions", timeout=20)
    dash_duo.wait_for_contains_text("#vlm-image", "L0 H0", timeout=20)
    np.testing.assert_allclose(_heat(dash_duo), want[(0, 0, 0)], rtol=1e-5)
    # click the second answer token
    labels = dash_duo.driver.find_elements("css selector", "#vlm-tokens label")
    assert [l.text for l in labels] == meta["generated_tokens"]
    labels[1].click()
    dash_duo.wait_for_contains_text("#vlm-image", f"answer token '{meta['generated_tokens'][1]}'", timeout=20)
    np.testing.assert_allclose(_heat(dash_duo), want[(0, 0, 1)], rtol=1e-5)
    # click the VHD heatmap's cell of layer 1, head 2: that head everywhere
    _click(dash_duo, _point(dash_duo, "vlm-vhd", 2, 1))  # x = head, y = layer
    dash_duo.wait_for_contains_text("#vlm-status", "L1 H2", timeout=20)
    dash_duo.wait_for_contains_text("#vlm-image", "L1 H2", timeout=20)
    np.testing.assert_allclose(_heat(dash_duo), want[(1, 2, 1)], rtol=1e-5)
    outline = dash_duo.driver.execute_script(
        "return document.querySelector('#vlm-ratio .js-plotly-plot')._fullLayout.shapes[0].x0;")
    assert outline == 1.5
    assert meta["reinforced"]["generated"] in dash_duo.find_element("#vlm-reinforced").text
    other_page = re.compile(r"nonexistent object was used in an `Input`.*The id of this object is `(?!vlm)")
    assert [e["message"][:300] for e in dash_duo.get_logs() if not other_page.search(e["message"])] == []
