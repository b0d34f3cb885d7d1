"""The Patterns page: callbacks as plain functions, and one browser test.

The atlas is computed for real once per module (tiny: 240 maps, 3 epochs); the page only reads it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dash import no_update

import attnviz
from attnviz.analysis.patterns import PatternParams, compute_patterns, load_atlas, query_centre
from tests.helpers import make_recording

GRID = (3, 4)
N_LAYERS, N_HEADS = 2, 3
PARAMS = PatternParams(max_maps=240, latent=4, channels=(4, 8), epochs=3, batch_size=64, clusters=3,
                       umap_neighbors=8, n_nearest=3)


def _ops(p: Any) -> dict:
    return {op["location"][0]: op["params"]["value"] for op in p.to_plotly_json()["operations"]}


def _text(fig: Any) -> str:
    """The message of a fig_message figure (its line breaks undone)."""
    return fig.layout.annotations[0].text.replace("<br>", " ")


def _sel(path: Path, **kw: Any) -> dict:
    return {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None, **kw}


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_recording(tmp_path_factory.mktemp("patterns_page") / "atlas.h5", n_samples=5, n_layers=N_LAYERS,
                          n_heads=N_HEADS, grid=GRID)
    compute_patterns(path, PARAMS, device="cpu")
    return path


@pytest.fixture()
def analysed(computed: Path, tmp_path: Path) -> Path:
    path = tmp_path / computed.name
    shutil.copy(computed, path)
    return path


def _page(path: Path):
    from attnviz.app import create_app

    create_app([path])
    from attnviz.app.pages import patterns  # after create_app (register_page needs the app)

    return patterns


def test_without_an_atlas_the_page_says_how_to_compute_it(tmp_path: Path) -> None:
    path = make_recording(tmp_path / "raw.h5", n_samples=2, n_layers=1, n_heads=2, grid=(2, 2))
    PG = _page(path)
    status, summary = PG.status(_sel(path))
    assert "attnviz analyze raw.h5 --patterns" in status.children and summary == ""
    fig, key = PG.scatter(_sel(path), "cluster", None)
    assert "attnviz analyze raw.h5 --patterns" in _text(fig) and key is None
    for fig in (PG.gallery(_sel(path)), PG.training(_sel(path)), *PG.heads(_sel(path), "natural"),
                PG.maps(None, _sel(path))[0]):
        assert "attnviz analyze raw.h5 --patterns" in _text(fig)


def test_scatter_full_then_patch_of_the_highlight_only(analysed: Path) -> None:
    PG = _page(analysed)
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
    fig, key = PG.scatter(_sel(analysed, layer=1, head=2), "cluster", None)
    assert sum(len(t.x) for t in fig.data[:-1]) == atlas.n_maps == 240
    mine = (atlas.layer == 1) & (atlas.head == 2)
    np.testing.assert_allclose(fig.data[-1].x, atlas.embedding[mine, 0])
    # same file and colouring: only the highlight trace is replaced
    p, key2 = PG.scatter(_sel(analysed, layer=0, head=1), "cluster", key)
    assert key2 is no_update
    op = p.to_plotly_json()["operations"][0]
    assert op["location"] == ["data", len(fig.data) - 1]
    np.testing.assert_allclose(op["params"]["value"]["x"], atlas.embedding[(atlas.layer == 0) & (atlas.head == 1), 0])
    # another colouring: a full figure again, one trace + highlight
    fig3, key3 = PG.scatter(_sel(analysed), "layer", key)
    assert len(fig3.data) == 2 and key3[-1] == "layer"
    np.testing.assert_array_equal(fig3.data[0].marker.color, atlas.layer.astype(np.float32))


def test_lasso_on_scatter_shows_those_maps_and_their_reconstructions(analysed: Path) -> None:
    PG = _page(analysed)
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
        recon = rec.analysis_group("patterns")["recon"][()].astype(np.float32)
    fig, _ = PG.scatter(_sel(analysed), "cluster", None)
    # points 2 and 0 of trace 1 (cluster 1) and point 1 of trace 0
    event = {"points": [{"curveNumber": 1, "pointIndex": 2}, {"curveNumber": 1, "pointIndex": 0},
                        {"curveNumber": 0, "pointIndex": 1}, {"curveNumber": len(fig.data) - 1, "pointIndex": 0}]}
    picked = PG.picked_from_scatter(_sel(analysed), event, "cluster")
    c1, c0 = np.flatnonzero(atlas.cluster == 1), np.flatnonzero(atlas.cluster == 0)
    assert picked["indices"] == [int(c1[2]), int(c1[0]), int(c0[1])]      # the highlight point is ignored
    maps_fig, note = PG.maps(picked, _sel(analysed))
    assert note.startswith("3 map(s) picked")
    heat = [t for t in maps_fig.data if t.type == "heatmap"]
    assert len(heat) == 3 * 3                                                # raw, input, reconstruction per map
    for row, j in enumerate(picked["indices"]):
        raw, inp, rc = heat[3 * row : 3 * row + 3]
        with attnviz.open(analysed) as rec:
            a = rec.attention(int(atlas.sample[j]), int(atlas.layer[j]), int(atlas.head[j]))[1 + int(atlas.query[j])]
        np.testing.assert_allclose(np.asarray(raw.z), a[1:].reshape(GRID), rtol=1e-6)
        valid = np.isfinite(np.asarray(rc.z, float))
        np.testing.assert_allclose(np.asarray(rc.z, float)[valid], recon[j][valid], rtol=1e-6)
        centred = query_centre(a[1:].reshape(1, *GRID), atlas.query[j : j + 1], GRID)[0]
        peak = max(centred.max(), a[0])
        np.testing.assert_allclose(np.asarray(inp.z, float)[valid], centred[valid] / peak, rtol=1e-5)
    # the query is marked on the raw map at (column, row)
    marks = [t for t in maps_fig.data if t.type == "scatter" and t.xaxis == "x"]
    qy, qx = divmod(int(atlas.query[picked["indices"][0]]), GRID[1])
    assert (marks[0].x[0], marks[0].y[0]) == (qx, qy)


def test_without_a_pick_the_selected_heads_maps_are_shown(analysed: Path) -> None:
    PG = _page(analysed)
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
    fig, note = PG.maps(None, _sel(analysed, layer=1, head=0, sample=3))
    assert "Layer 1, head 0" in note
    titles = [a.text for a in fig.layout.annotations if "raw" in a.text]
    assert titles and all(t.startswith("L1 H0") for t in titles)
    assert "img 3" in titles[0]                                              # the selected image first
    assert len(titles) == min(PG.MAX_SHOWN, int(((atlas.layer == 1) & (atlas.head == 0)).sum()))


def test_gallery_click_picks_the_clusters_nearest_maps(analysed: Path) -> None:
    PG = _page(analysed)
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
    fig = PG.gallery(_sel(analysed))
    mosaic = fig.data[1]
    assert np.asarray(mosaic.customdata).shape[:2] == np.asarray(mosaic.z).shape
    h, w = atlas.prototypes.shape[1:]
    cd = np.asarray(mosaic.customdata)

    def click(cluster: int, column: int, dy: int = 0, dx: int = 0) -> dict:
        x, y = column * (w + 1) + dx, cluster * (h + 1) + dy
        assert list(cd[y, x]) == [cluster, column]            # the tile drawn there
        return {"points": [{"x": x, "y": y}]}

    picked = PG.picked_from_gallery(_sel(analysed), click(2, 0, h - 1, w - 1))
    assert picked["indices"] == atlas.nearest[2][atlas.nearest[2] >= 0].tolist()
    one = PG.picked_from_gallery(_sel(analysed), click(1, 2, 1, 2))
    assert one["indices"] == [int(atlas.nearest[1, 1])]
    assert PG.picked_from_gallery(_sel(analysed), {"points": [{"x": w, "y": 0}]}) is None     # the gap


def test_head_views_and_clicks_select_heads(analysed: Path) -> None:
    PG = _page(analysed)
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
    grid, mix, dendro = PG.heads(_sel(analysed, layer=1, head=2), "natural")
    np.testing.assert_array_equal(np.asarray(grid.data[0].z), atlas.dominant)
    assert [b.x[2] for b in mix.data[: atlas.n_clusters]] == pytest.approx(atlas.mix[1, 2].tolist())
    assert len(dendro.data[1].x) == N_LAYERS * N_HEADS
    # clicks: a grid cell (x = slot, y = layer, as Dash sends heatmap clicks), a bar, a dendrogram leaf
    assert _ops(PG.select_from_grid({"points": [{"x": 2, "y": 1}]}, "natural", _sel(analysed))) == {"layer": 1, "head": 2}
    assert _ops(PG.select_head({"points": [{"customdata": mix.data[0].customdata[1]}]})) == {"layer": 1, "head": 1}
    leaf = dendro.data[1].customdata[0]
    assert _ops(PG.select_head({"points": [{"customdata": leaf}]})) == {"layer": leaf[0], "head": leaf[1]}
    assert PG.select_head({"points": [{"x": 1}]}) is no_update
    # clicking a map in the scatter selects its head, image and query token everywhere
    j = int(np.flatnonzero(atlas.cluster == 0)[3])
    ops = _ops(PG.select_from_scatter({"points": [{"curveNumber": 0, "pointIndex": 3}]}, _sel(analysed), "cluster"))
    assert ops == {"layer": int(atlas.layer[j]), "head": int(atlas.head[j]), "sample": int(atlas.sample[j]),
                   "query": 1 + int(atlas.query[j])}
    # clustered order: each layer's heads rearranged; a click on a slot selects the head drawn there
    g2, _, _ = PG.heads(_sel(analysed), "clustered")
    for layer in range(N_LAYERS):
        drawn = [c[1] for c in g2.data[0].customdata[layer]]
        assert sorted(drawn) == list(range(N_HEADS))
        np.testing.assert_array_equal(np.asarray(g2.data[0].z)[layer], atlas.dominant[layer, drawn])
        for slot, head in enumerate(drawn):
            click = {"points": [{"x": slot, "y": layer}]}
            assert _ops(PG.select_from_grid(click, "clustered", _sel(analysed))) == {"layer": layer, "head": head}
    assert PG.select_from_grid({"points": [{"x": 7, "y": 0}]}, "natural", _sel(analysed)) is no_update


def test_status_summarises_the_atlas(analysed: Path) -> None:
    PG = _page(analysed)
    status, summary = PG.status(_sel(analysed))
    assert status == "" and "240 centred maps (5x7)" in summary and "3 clusters (K given)" in summary


def _point(dash_duo: Any, graph_id: str, x: float, y: float) -> list[float]:
    """Viewport pixel of data point (x, y) of a graph (scrolled into view first)."""
    return dash_duo.driver.execute_script(f"""
        const gd = document.querySelector('#{graph_id} .js-plotly-plot');
        gd.scrollIntoView({{block: 'center'}});
        const r = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [r.left + xa._offset + xa.l2p(arguments[0]), r.top + ya._offset + ya.l2p(arguments[1])];""", x, y)


def _click(dash_duo: Any, xy: list[float]) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    time.sleep(0.3)  # scrolling settles
    ab = ActionBuilder(dash_duo.driver)
    ab.pointer_action.move_to_location(int(round(xy[0])), int(round(xy[1])))
    ab.pointer_action.click()
    ab.perform()


@pytest.mark.browser
def test_patterns_page_in_a_browser(dash_duo, analysed: Path) -> None:
    from attnviz.app import create_app

    app = create_app([analysed])
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#attnviz-file-picker", timeout=15)
    dash_duo.driver.get(dash_duo.server_url + "/patterns")
    dash_duo.wait_for_element("#patterns-scatter .scatterlayer, #patterns-scatter canvas", timeout=20)
    dash_duo.wait_for_element("#patterns-grid .heatmaplayer", timeout=20)
    dash_duo.wait_for_contains_text("#patterns-maps-note", "Layer 0, head 0", timeout=20)
    n_points = dash_duo.driver.execute_script(
        "const gd = document.querySelector('#patterns-scatter .js-plotly-plot');"
        "return gd._fullData.slice(0, -1).reduce((s, t) => s + t.x.length, 0);")
    assert n_points == 240
    time.sleep(0.5)
    # click head (layer 1, head 2) in the dominant-cluster grid: the maps follow the selection
    _click(dash_duo, _point(dash_duo, "patterns-grid", 2, 1))
    dash_duo.wait_for_contains_text("#patterns-maps-note", "Layer 1, head 2", timeout=15)
    dash_duo.wait_for_contains_text("#patterns-summary", "Selected: layer 1, head 2", timeout=15)
    # click a tile of the gallery (nearest map 1 of cluster 0): that map is shown
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
    h, w = atlas.prototypes.shape[1:]
    _click(dash_duo, _point(dash_duo, "patterns-gallery", (w + 1) + w // 2, h // 2))
    dash_duo.wait_for_contains_text("#patterns-maps-note", "1 map(s) picked (cluster 0)", timeout=15)
    j = int(atlas.nearest[0, 0])
    dash_duo.wait_for_contains_text("#patterns-maps", f"L{atlas.layer[j]} H{atlas.head[j]} · img {atlas.sample[j]}",
                                    timeout=15)
    # click one point of the WebGL scatter: its head and image become the selection
    k = int(np.flatnonzero(atlas.cluster == 0)[0])
    _click(dash_duo, _point(dash_duo, "patterns-scatter", *atlas.embedding[k].tolist()))
    dash_duo.wait_for_contains_text("#patterns-summary", f"Selected: layer {atlas.layer[k]}, head {atlas.head[k]}",
                                    timeout=15)
    # a lasso-equivalent selection event on the scatter shows those maps
    dash_duo.driver.execute_script("""
        const gd = document.querySelector('#patterns-scatter .js-plotly-plot');
        gd.emit('plotly_selected', {points: [{curveNumber: 0, pointIndex: 0}, {curveNumber: 0, pointIndex: 1}]});""")
    dash_duo.wait_for_contains_text("#patterns-maps-note", "2 map(s) picked (scatter)", timeout=15)
    logs = dash_duo.get_logs()
    assert logs == [], "\n".join(entry["message"][:300] for entry in logs)


def test_report_views_of_the_atlas(analysed: Path, tmp_path: Path) -> None:
    from attnviz.report import collect_figures

    views = ["patterns_atlas", "patterns_prototypes", "patterns_heads"]
    with attnviz.open(analysed) as rec:
        atlas = load_atlas(rec)
        items = collect_figures(rec, samples=[0], views=views)
        names = [i.stem for i in items]
        assert names == ["patterns_atlas", "patterns_prototypes", "patterns_heads_grid", "patterns_heads_mix",
                         "patterns_heads_dendrogram", "patterns_heads_training"]
        scatter = items[0].figure
        assert sum(len(t.x) for t in scatter.data) == atlas.n_maps
        mosaic = np.asarray(items[1].figure.data[1].z, float)
        h, w = atlas.prototypes.shape[1:]
        np.testing.assert_allclose(mosaic[:h, :w], atlas.prototypes[0], rtol=1e-6)
    plain = make_recording(tmp_path / "plain.h5", n_samples=2)
    with attnviz.open(plain) as rec:
        assert collect_figures(rec, samples=[0], views=views) == []        # skipped without an atlas


def _run_job(PG: Any, path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """Press "compute" with ``script`` standing in for the computation; poll until it ends."""
    import sys

    monkeypatch.setattr(PG, "job_command", lambda p: [sys.executable, "-c", script, p])
    PG._JOBS.clear()
    disabled, text = PG.compute(1, _sel(path))
    assert disabled is False and text
    for _ in range(100):
        text, disabled, reload = PG.progress(1, _sel(path))
        if disabled:
            return text, reload
        time.sleep(0.1)
    raise AssertionError("the job did not end")


def test_compute_button_runs_the_job_and_reloads_when_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_recording(tmp_path / "raw.h5", n_samples=2, n_layers=1, n_heads=2, grid=(2, 2))
    PG = _page(path)
    assert PG.compute_box(_sel(path)) == {}                                  # no atlas: the button shows
    assert PG.job_command(str(path))[1:] == ["-m", "attnviz.analysis.patterns", str(path)]
    ok = ("import json, sys, time\n"
          "assert sys.argv[1].endswith('raw.h5')\n"
          "print(json.dumps({'stage': 'autoencoder', 'fraction': 0.5, 'message': 'epoch 3'}), flush=True)\n"
          "time.sleep(0.3)\n"
          "print(json.dumps({'done': True, 'reused': False, 'n_maps': 16, 'n_clusters': 2}), flush=True)\n")
    text, reload = _run_job(PG, path, ok, monkeypatch)
    assert text == "done: 16 maps, 2 clusters" and reload == "/patterns"
    bad = "import json; print(json.dumps({'error': 'the recording is incomplete'}), flush=True); raise SystemExit(2)"
    text, reload = _run_job(PG, path, bad, monkeypatch)
    assert text == "failed: the recording is incomplete" and reload is no_update
    crash = "import sys; sys.stderr.write('Traceback...\\nMemoryError\\n'); raise SystemExit(1)"
    text, reload = _run_job(PG, path, crash, monkeypatch)
    assert text == "failed (exit code 1): MemoryError" and reload is no_update


def test_compute_box_hidden_when_the_atlas_exists(analysed: Path) -> None:
    PG = _page(analysed)
    assert PG.compute_box(_sel(analysed)) == {"display": "none"}
