"""The Query-key page: callbacks as plain functions, and the real page in headless Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dash import no_update

from attnviz.analysis.qk import QKParams, compute_qk_embedding
from attnviz.app import create_app
from tests.helpers import make_qk_recording, make_recording


def _ops(p) -> dict:
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


def _page(path: Path):
    create_app([path])
    from attnviz.app.pages import qk  # after create_app (register_page needs the app)

    return qk


def _sel(path: Path, **kw) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


@pytest.fixture()
def analysed(tmp_path: Path) -> Path:
    path = make_qk_recording(tmp_path / "qk.h5", n_samples=4, n_layers=2, n_heads=3, grid=(4, 4), dim=8)
    compute_qk_embedding(path, QKParams(method="pca", max_points=48))
    return path


def test_pages_say_how_to_get_the_embedding(tmp_path: Path) -> None:
    plain = make_recording(tmp_path / "plain.h5")
    page = _page(plain)
    assert "--store-qk" in str(page.status(_sel(plain)))
    vectors = make_qk_recording(tmp_path / "vectors.h5")
    page = _page(vectors)
    text = str(page.status(_sel(vectors)))
    assert "attnviz analyze vectors.h5 --qk" in text
    assert page.scatter(_sel(vectors), "role").layout.annotations  # a message, not an empty plot


def test_scatter_shows_the_selected_heads_stored_coordinates(analysed: Path) -> None:
    from attnviz.analysis.qk import load_qk_embedding
    import attnviz

    page = _page(analysed)
    with attnviz.open(analysed) as rec:
        emb = load_qk_embedding(rec)
    fig = page.scatter(_sel(analysed, layer=1, head=2), "role")
    queries, keys = fig.data[0], fig.data[1]
    assert np.allclose(queries.x, emb.query_xy[1, 2, :, 0]) and np.allclose(keys.y, emb.key_xy[1, 2, :, 1])
    assert queries.marker.symbol == "circle" and keys.marker.symbol == "diamond"
    by_mask = page.scatter(_sel(analysed, layer=1, head=2), "mask")
    names = [t.name for t in by_mask.data]
    assert any("on the object" in n for n in names) and any("background" in n for n in names)
    # a selected token is ringed (query and key)
    s, p = int(emb.sample[5]), int(emb.position[5])
    ringed = page.scatter(_sel(analysed, layer=1, head=2, sample=s, query=p), "role").data[-1]
    assert len(ringed.x) == 2 and ringed.x[0] == pytest.approx(emb.query_xy[1, 2, 5, 0])
    assert "L1 H2" in str(page.status(_sel(analysed, layer=1, head=2)))


def test_clicks_select_a_token_or_a_head(analysed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = _page(analysed)
    from attnviz.analysis.qk import load_qk_embedding
    import attnviz

    with attnviz.open(analysed) as rec:
        emb = load_qk_embedding(rec)
    monkeypatch.setattr(page, "user_triggered", lambda: page.SCATTER)
    click = {"points": [{"curveNumber": 1, "pointIndex": 20}]}  # the key of token 20
    assert _ops(page.pick(click, None, "role", _sel(analysed))) == {"sample": int(emb.sample[20]),
                                                                   "query": int(emb.position[20])}
    # coloured by mask, traces are split by group: trace 2 = queries on the background
    background = np.flatnonzero(emb.in_mask == 0)
    click = {"points": [{"curveNumber": 2, "pointIndex": 3}]}
    assert _ops(page.pick(click, None, "mask", _sel(analysed)))["query"] == int(emb.position[background[3]])
    monkeypatch.setattr(page, "user_triggered", lambda: page.MULTIPLES)
    assert _ops(page.pick(None, {"points": [{"curveNumber": 11}]}, "role", _sel(analysed))) == {"layer": 1, "head": 2}
    monkeypatch.setattr(page, "user_triggered", lambda: None)
    assert page.pick(click, None, "role", _sel(analysed)) is no_update
    tok = page.token(_sel(analysed, sample=3, query=7, layer=1, head=2))
    assert "L1 H2" in tok.layout.title.text and "patch (1, 2)" in tok.layout.title.text  # position 7 = patch (1, 2)
    multi = page.multiples(_sel(analysed, layer=1, head=2))
    assert len(multi.data) == 2 * 2 * 3 and len(multi.layout.shapes) == 1  # queries and keys of 6 heads; 1 outline


def _point(dash_duo: Any, graph_id: str, x: float, y: float) -> list[float]:
    return dash_duo.driver.execute_script(f"""
        const gd = document.querySelector('#{graph_id} .js-plotly-plot');
        gd.scrollIntoView({{block: 'center'}});
        const r = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [r.left + xa._offset + xa.l2p(arguments[0]), r.top + ya._offset + ya.l2p(arguments[1])];""", x, y)


def _click(dash_duo: Any, xy: list[float]) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    time.sleep(0.3)
    ab = ActionBuilder(dash_duo.driver)
    ab.pointer_action.move_to_location(int(round(xy[0])), int(round(xy[1])))
    ab.pointer_action.click()
    ab.perform()


@pytest.mark.browser
def test_qk_page_in_a_browser(dash_duo, analysed: Path) -> None:
    """The page draws the selected head's queries and keys, a click on a point shows that token's map, a
    click on a small panel selects its head; no console errors."""
    from attnviz.analysis.qk import load_qk_embedding
    import attnviz

    with attnviz.open(analysed) as rec:
        emb = load_qk_embedding(rec)
    app = create_app([analysed])
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#attnviz-file-picker", timeout=15)
    dash_duo.driver.get(dash_duo.server_url + "/qk")
    dash_duo.wait_for_element("#qk-scatter .scatterlayer, #qk-scatter canvas", timeout=20)
    dash_duo.wait_for_contains_text("#qk-status", "L0 H0", timeout=20)
    n = dash_duo.driver.execute_script("const gd = document.querySelector('#qk-scatter .js-plotly-plot');"
                                       "return gd._fullData.slice(0, 2).map(t => t.x.length);")
    assert n == [48, 48]
    # a click on token 10's query point: its map appears, titled with its position
    j = 10
    _click(dash_duo, _point(dash_duo, "qk-scatter", *emb.query_xy[0, 0, j].tolist()))
    dash_duo.wait_for_contains_text("#qk-token", "L0 H0: query", timeout=20)
    # a click on the small panel of layer 1, head 2 selects that head
    xy = dash_duo.driver.execute_script("""
        const gd = document.querySelector('#qk-multiples .js-plotly-plot');
        gd.scrollIntoView({block: 'center'});
        const r = gd.getBoundingClientRect(), xa = gd._fullLayout['xaxis6'], ya = gd._fullLayout['yaxis6'];
        const t = gd._fullData.find(d => d.xaxis === 'x6');
        return [r.left + xa._offset + xa.l2p(t.x[0]), r.top + ya._offset + ya.l2p(t.y[0])];""")
    _click(dash_duo, xy)
    dash_duo.wait_for_contains_text("#qk-status", "L1 H2", timeout=20)
    other_page = re.compile(r"nonexistent object was used in an `Input`.*The id of this object is `(?!qk)")
    assert [e["message"][:300] for e in dash_duo.get_logs() if not other_page.search(e["message"])] == []
