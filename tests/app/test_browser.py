"""The dashboard in a real headless Chromium (dash[testing]): click a head, click a patch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attnviz.store.reader import Recording
from tests.app.conftest import GRID

pytestmark = pytest.mark.browser

_GD = "document.querySelector('#{id} .js-plotly-plot')"


def _plot_point(dash_duo, graph_id: str, x: float, y: float, xaxis: str = "xaxis", yaxis: str = "yaxis"):
    """Viewport pixel of data point (x, y) in a dcc.Graph, once the layout is still and the pixel
    really is on that graph (a page still settling moves things between measuring and clicking)."""
    last = None
    for _ in range(40):
        xy = dash_duo.driver.execute_script(f"""
            const gd = {_GD.format(id=graph_id)};
            gd.scrollIntoView({{block: 'center'}});
            const r = gd.getBoundingClientRect(), xa = gd._fullLayout.{xaxis}, ya = gd._fullLayout.{yaxis};
            const px = r.left + xa._offset + xa.l2p(arguments[0]), py = r.top + ya._offset + ya.l2p(arguments[1]);
            const hit = document.elementFromPoint(px, py);
            return [px, py, !!(hit && gd.contains(hit))];
        """, x, y)
        if xy[2] and last is not None and abs(xy[0] - last[0]) < 0.5 and abs(xy[1] - last[1]) < 0.5:
            return xy[:2]
        last = xy
        time.sleep(0.25)
    raise AssertionError(f"{graph_id}: point ({x}, {y}) never settled on the graph: {last}")


def _settle(dash_duo, timeout: float = 60) -> None:
    """Wait until the page has no callback in flight (a click or key press then meets a still layout)."""
    from dash.testing.wait import until

    until(lambda: dash_duo.redux_state_rqs == [], timeout=timeout, poll=0.3)
    time.sleep(0.3)


def _click_at(dash_duo, xy):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    chain = ActionChains(dash_duo.driver)
    ab = ActionBuilder(dash_duo.driver)
    ab.pointer_action.move_to_location(int(round(xy[0])), int(round(xy[1])))
    ab.pointer_action.click()
    ab.perform()
    del chain


def _figure(dash_duo, graph_id: str):
    return dash_duo.driver.execute_script(
        f"const gd = {_GD.format(id=graph_id)}; if (!gd) return null; "
        # plotly decodes base64-typed arrays into _fullData; copy rows into plain arrays
        f"const z = gd._fullData.length > 1 ? gd._fullData[1].z : null; "
        f"return {{title: gd.layout.title && gd.layout.title.text, z: z && Array.from(z, r => Array.from(r))}};")


def _wait_title(dash_duo, graph_id: str, text: str, timeout: float = 30):
    dash_duo.wait_for_contains_text(f"#{graph_id} .gtitle", text, timeout=timeout)


def test_click_head_then_patch_updates_the_map(dash_duo, rec_path):
    from attnviz.app import create_app

    app = create_app([rec_path])
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#attnviz-file-picker", timeout=30)
    dash_duo.driver.get(dash_duo.server_url + "/explorer")
    _wait_title(dash_duo, "explorer-overlay", "L0 H0")
    _wait_title(dash_duo, "explorer-multiples", "Layer 0")
    _wait_title(dash_duo, "explorer-attributions", "Attributions")
    dash_duo.wait_for_element("#explorer-headgrid .heatmaplayer", timeout=30)

    # click head (layer 1, head 2) in the all-heads grid
    _settle(dash_duo)
    _click_at(dash_duo, _plot_point(dash_duo, "explorer-headgrid", 2, 1))
    _wait_title(dash_duo, "explorer-overlay", "L1 H2")
    _wait_title(dash_duo, "explorer-multiples", "Layer 1")

    # click patch (row 2, col 1) on the image: pixel centre (1.5 * 8, 2.5 * 8)
    _settle(dash_duo)
    _click_at(dash_duo, _plot_point(dash_duo, "explorer-overlay", 12, 20))
    _wait_title(dash_duo, "explorer-overlay", "query patch (2, 1)")
    z = np.asarray(_figure(dash_duo, "explorer-overlay")["z"], dtype=float)
    query = 1 + 2 * GRID[1] + 1
    with Recording(rec_path) as rec:
        expect = rec.attention(0, 1, 2)[query, 1:].reshape(GRID)
    np.testing.assert_allclose(z, expect, rtol=1e-6)

    # the selection is shared: the overview's grid outlines the same head
    dash_duo.find_element("a.av-nav-link[href='/']").click()
    dash_duo.wait_for_element("#overview-headgrid .heatmaplayer", timeout=30)
    outline = dash_duo.driver.execute_script(
        f"const gd = {_GD.format(id='overview-headgrid')}; const s = gd.layout.shapes[0]; return [s.x0, s.y0];")
    assert outline == [1.5, 0.5]  # head 2, layer 1

    # back to the explorer: the selection (head and query) survived the page changes
    dash_duo.find_element("a.av-nav-link[href='/explorer']").click()
    _wait_title(dash_duo, "explorer-overlay", "L1 H2: query patch (2, 1)")

    # the head slider follows the selection (the slider -> selection direction is tested as plain callbacks in
    # test_app_callbacks.py: a key press on the thumb, right after the page's own updates, was timing-sensitive here)
    thumb = dash_duo.find_element("#explorer-head [role=slider]")
    assert thumb.get_attribute("aria-valuenow") == "2"
    layer_thumb = dash_duo.find_element("#explorer-layer [role=slider]")
    assert layer_thumb.get_attribute("aria-valuenow") == "1"
    logs = dash_duo.get_logs()
    assert logs == [], "\n".join(l["message"][:300] for l in logs)
