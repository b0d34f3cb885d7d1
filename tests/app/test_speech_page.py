"""The Speech page: callbacks as plain functions on a synthetic s2t recording with known answers, the image pages
on an s2t recording (a message, not a traceback), and the real page in headless Chromium."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from dash import no_update

import attnviz
from attnviz.analysis.crossattn import analyze_step, load_crossattn, pool_frames, reduce_frequency
from attnviz.app import create_app
from tests.app.conftest import apply_patch
from tests.app.test_qk_page import _click, _point  # the page-agnostic click helpers
from tests.helpers import make_recording
from tests.helpers_s2t import SYN_ALIGNED_HEAD, make_s2t_recording


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = make_s2t_recording(tmp_path_factory.mktemp("speech") / "speech.h5")
    analyze_step(path)
    return path


def _page(path: Path):
    create_app([path])
    from attnviz.app.pages import speech  # after create_app (register_page needs the app)

    return speech


def _sel(path: Path, **kw) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


def _ops(p) -> dict:
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


def test_controls_list_the_clips_methods_and_tokens(speech):
    page = _page(speech)
    clips, clip, methods, method, tokens, token = page.controls(_sel(speech, sample=2), None)
    assert [c["value"] for c in clips] == [0, 1, 2] and clip == 2
    assert [m["value"] for m in methods] == ["perturbation", "gradient"] and method == "perturbation"
    assert [t["value"] for t in tokens] == [0, 1, 2, 3] and token == 0  # the first text token by default
    assert page.controls(_sel(speech, query=2), "gradient")[3:6:2] == ("gradient", 2)


def test_controls_write_the_selection(speech):
    page = _page(speech)
    data = _sel(speech, query=1)
    assert _ops(page.selection_change(page.TOKENS, 0, 2, None, data)) == {"query": 2}
    assert page.selection_change(page.TOKENS, 0, 1, None, data) is no_update  # the radio just followed
    assert _ops(page.selection_change(page.CLIP, 2, 1, None, data)) == {"sample": 2, "query": None}
    assert page.selection_change(page.CLIP, 0, 1, None, data) is no_update
    click = {"points": [{"x": 1, "y": 0, "z": 0.1}]}
    assert _ops(page.selection_change(page.GRID, 0, 1, click, data)) == {"layer": 0, "head": 1}
    assert page.selection_change(page.GRID, 0, 1, {"points": []}, data) is no_update
    assert apply_patch(data, page.selection_change(page.TOKENS, 0, 3, None, data))["query"] == 3


def test_the_token_view_shows_the_recorded_rows(speech):
    page = _page(speech)
    layer, head = SYN_ALIGNED_HEAD
    fig = page.token(_sel(speech, sample=1, query=2, layer=layer, head=head), "perturbation", "mean")
    names = [t.name for t in fig.data[1:]]
    assert names == ["head", "layer mean", "all-layer mean", "saliency (mean)"]
    with attnviz.open(speech) as rec:
        row = rec.attention(1, layer, head, "cross")[2]
        sal = pool_frames(reduce_frequency(rec.attribution(1, "perturbation")[2].astype(np.float64)), "mean")
        np.testing.assert_allclose(fig.data[1].customdata, row, rtol=1e-6)  # raw values in the hover
        np.testing.assert_allclose(fig.data[4].customdata, sal, rtol=1e-6)
        np.testing.assert_allclose(fig.data[1].x, (np.arange(20) + 0.5) * 0.02)  # encoder frame centres (s)
    assert "head 1.00" in fig.layout.title.subtitle.text  # this head IS the pooled saliency
    assert fig.data[0].type == "image" and fig.data[0].dx == 0.01  # the token's saliency over the spectrogram
    assert "token 2" in fig.layout.title.text and "L1 H0" in fig.layout.title.text


def test_the_grid_and_the_aggregates_come_from_the_cached_analysis(speech):
    page = _page(speech)
    fig, table = page.grid(_sel(speech, layer=1, head=1), "perturbation", "mean", "pearson")
    with attnviz.open(speech) as rec:
        expected = load_crossattn(rec).tables[("perturbation", "mean")]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), expected["head_pearson"])
    assert fig.layout.shapes[0].x0 == 0.5 and fig.layout.shapes[0].y0 == 0.5  # head 1, layer 1 outlined
    text = str(table)
    assert "all-layer mean" in text and "control: time-shuffled attention" in text and "best head L1 H0" in text
    spear, _ = page.grid(_sel(speech), "perturbation", "max", "spearman")
    assert "spearman" in spear.layout.title.text and "max" in spear.layout.title.text


def test_deletion_table_wave_and_alignment(speech):
    page = _page(speech)
    rec_fig = page.deletion(_sel(speech), "recording")
    assert len(rec_fig.data) == 5 and "AUC 0.500" in rec_fig.data[0].name
    tok = page.deletion(_sel(speech, query=1), "token")
    with attnviz.open(speech) as rec:
        np.testing.assert_allclose(tok.data[3].y, np.exp(rec.per_sample("deletion", 0)[3, :, 1]), rtol=1e-6)
    wave, drawn = page.wave(_sel(speech, query=1), None)
    assert [t.type for t in wave.data] == ["scatter", "scatter", "image"]
    assert wave.layout.shapes[-1].name == "selected" and drawn == {"file": speech.name, "sample": 0,
                                                                    "shape": len(wave.layout.shapes) - 1}
    dtw = [s for s in wave.layout.shapes if s.line.dash == "dot"]
    assert wave.layout.shapes[-1].x0 == dtw[1].x0 and wave.layout.shapes[-1].visible  # token 1's word, by DTW
    # another token of the same clip: only the outline moves (a patch of that one shape)
    moved, same = page.wave(_sel(speech, query=2), drawn)
    assert same is no_update
    op = moved.to_plotly_json()["operations"][0]
    assert op["location"] == ["layout", "shapes", drawn["shape"]] and op["params"]["value"]["x0"] == dtw[2].x0
    # another clip: drawn again
    fig, other = page.wave(_sel(speech, sample=2, query=0), drawn)
    assert other["sample"] == 2 and fig.layout.title.text.startswith("#2 ")
    table = page.table(_sel(speech, layer=1, head=0, query=2), "perturbation", "mean").children.splitlines()
    assert len(table) == 2 + 4 and "CA peak L1H0 (s)" in table[0]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in table[2:]]
    assert [c[0].strip("*") for c in cells] == ["0", "1", "2", "3"]
    assert [c[2].strip("*") for c in cells] == ["text", "text", "text", "special"]
    assert [c[9].strip("*") for c in cells[:3]] == ["1.00"] * 3  # the aligned head IS the pooled saliency
    assert [c[0].startswith("**") for c in cells] == [False, False, True, False]  # the selected token, bold
    assert cells[3][1] == "&lt;\\|endoftext\\|>"  # a token shown literally, not as markup
    assert "DTW" in str(page.alignment(_sel(speech)))
    assert "clips" in str(page.status(_sel(speech)))


def test_an_image_recording_on_the_speech_page(tmp_path):
    vit = make_recording(tmp_path / "vit.h5")
    page = _page(vit)
    assert "speech-to-text recordings" in str(page.status(_sel(vit)))
    assert page.token(_sel(vit), None, None).layout.annotations


def test_image_pages_say_an_s2t_recording_has_no_image(speech):
    create_app([speech])
    from attnviz.app.pages import explorer, overview, patterns, qk, spatial

    data = _sel(speech)
    assert "no image" in overview.thumbs(data, "correctness", None, "all", 1)[0].layout.annotations[0].text
    card = str(overview.sample_card(data))
    assert "no image" in card and "one two three" in card and "/speech" in card
    assert "no image" in explorer.overlay(data).layout.annotations[0].text
    assert "no image" in str(spatial.status(data, "mean")[0])
    assert "no image" in str(patterns.status(data)[0])
    assert "no image" in str(qk.status(data))
    from attnviz.app.views import model_card

    with attnviz.open(speech) as rec:
        assert dict(model_card(rec))["accuracy"].startswith("none: a speech model writes text")


def test_report_views_of_a_speech_recording(speech):
    from attnviz.app.exports import load_views

    views = {v.name: v for v in load_views()}
    with attnviz.open(speech) as rec:
        assert views["inputs"].make(rec, None) is None  # no thumbnails
        heads = views["speech_heads"].make(rec, None)
        assert [name for name, _ in heads] == ["perturbation_mean", "perturbation_max", "gradient_mean", "gradient_max"]
        assert len(views["speech_tokens"].make(rec, 0)) == 3  # the text tokens
        assert views["speech_clip"].make(rec, 0) is not None and views["speech_deletion"].make(rec, None) is not None


# -- in a browser ------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_speech_page_in_a_browser(dash_duo, speech, tmp_path):
    """Click a token of the transcript: the token view shows it; click a head in the grid: it is selected and the
    token view shows that head's cross-attention (values checked); no console errors."""
    path = tmp_path / "speech.h5"
    shutil.copy(speech, path)
    app = create_app([path])
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#attnviz-file-picker", timeout=15)
    dash_duo.driver.get(dash_duo.server_url + "/speech")
    dash_duo.wait_for_contains_text("#speech-token .gtitle", "token 0", timeout=30)
    labels = dash_duo.driver.find_elements("css selector", "#speech-tokens label")
    assert [el.text.strip() for el in labels] == ["one", "two", "three", "<|endoftext|>"]
    labels[1].click()
    dash_duo.wait_for_contains_text("#speech-token .gtitle", "token 1 “two”", timeout=30)
    dash_duo.wait_for_contains_text("#speech-status", "token 1", timeout=30)
    dash_duo.wait_for_element("#speech-grid .heatmaplayer", timeout=30)
    _click(dash_duo, _point(dash_duo, "speech-grid", 0, 1))  # head 0 of layer 1
    dash_duo.wait_for_contains_text("#speech-token .gtitle", "L1 H0", timeout=30)
    dash_duo.wait_for_contains_text("#speech-status", "decoder layer 1 head 0", timeout=30)
    shown = dash_duo.driver.execute_script(
        "const gd = document.querySelector('#speech-token .js-plotly-plot');"
        "const t = gd._fullData.find(d => d.name === 'head'); return Array.from(t.customdata);")
    with attnviz.open(path) as rec:
        np.testing.assert_allclose(shown, rec.attention(0, 1, 0, "cross")[1], rtol=1e-5)
    subtitle = dash_duo.driver.execute_script(
        "return document.querySelector('#speech-token .js-plotly-plot').layout.title.subtitle.text;")
    assert "head 1.00" in subtitle
    # the head selection is shared: the overview's all-heads grid outlines it
    dash_duo.find_element("a.av-nav-link[href='/']").click()
    dash_duo.wait_for_element("#overview-headgrid .heatmaplayer", timeout=30)
    dash_duo.wait_for_contains_text("#overview-sample", "no image", timeout=30)
    outline = dash_duo.driver.execute_script(
        "const gd = document.querySelector('#overview-headgrid .js-plotly-plot'); const s = gd.layout.shapes[0];"
        "return [s.x0, s.y0];")
    assert outline == [-0.5, 0.5]
    other_page = re.compile(r"nonexistent object was used in an `Input`.*The id of this object is `(?!speech)")
    assert [e["message"][:300] for e in dash_duo.get_logs() if not other_page.search(e["message"])] == []
