"""Dashboard pages on ``--store rows`` and ``--store summary`` recordings (plain callback calls): what the mode
allows is shown, what it does not is said in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attnviz
from tests.app.conftest import GRID, N_HEADS, N_LAYERS, distinct_maps
from tests.helpers import make_recording


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    kw = dict(n_samples=4, n_layers=N_LAYERS, n_heads=N_HEADS, grid=GRID, maps_fn=distinct_maps, batch_size=2)
    return {store: make_recording(tmp_path / f"{store}.h5", store=store, store_rows=3, **kw)
            for store in ("full", "rows", "summary")}


@pytest.fixture
def app(files):
    from attnviz.app import create_app

    return create_app(list(files.values()))


def _sel(name: str, **kw) -> dict:
    return {"file": f"{name}.h5", "sample": 1, "layer": 1, "head": 2, "query": None, **kw}


def _text(fig) -> str:
    """Every text of a figure's layout (title, subtitle, annotations: fig_message's line)."""
    return str(fig.to_plotly_json()["layout"]).replace("<br>", " ")


def test_explorer_on_rows_shows_the_stored_rows_and_picks_the_nearest_stored_query(app, files):
    from attnviz.app.pages import explorer

    with attnviz.open(files["rows"]) as rec:
        stored = rec.row_positions(1).tolist()
    assert stored[0] == 0 and len(stored) == 1 + 3
    patch_query = stored[2]
    fig = explorer.overlay(_sel("rows", query=patch_query))
    z = np.asarray(fig.data[1].z if len(fig.data) > 1 else fig.data[0].z, np.float64)
    row = distinct_maps(1)[1, 2, patch_query, 1:].reshape(GRID)
    assert np.allclose(np.nan_to_num(z), row, atol=1e-3)
    assert "stored query rows" in _text(fig)
    # an unstored query: the nearest stored one is shown, and the figure says so
    unstored = next(q for q in range(1, 1 + GRID[0] * GRID[1]) if q not in stored)
    fig = explorer.overlay(_sel("rows", query=unstored))
    assert "is not stored: showing the nearest" in _text(fig)
    assert "L1 H2: query" in _text(fig)
    # every head of the layer, the CLS map and the raw matrix (the stored rows only) work too
    assert "every head" in _text(explorer.multiples(_sel("rows", query=unstored)))
    assert "CLS attention" in _text(explorer.cls_map(_sel("rows")))
    raw, style = explorer.raw(_sel("rows"), ["raw"])
    assert style == {"display": "block"} and np.asarray(raw.data[0].z).shape == (4, 1 + GRID[0] * GRID[1])
    assert "stored query rows (--store rows)" in _text(raw)


def test_explorer_on_summary_says_what_it_cannot_show(app):
    from attnviz.app.pages import explorer

    msg = "stores no attention maps, only per-head summaries (--store summary)"
    for fig in (explorer.overlay(_sel("summary")), explorer.multiples(_sel("summary")), explorer.cls_map(_sel("summary")),
                explorer.raw(_sel("summary"), ["raw"])[0]):
        assert msg in _text(fig)
    # attributions are stored as usual: the stored rollout and saliency are shown
    assert len(explorer.attributions(_sel("summary")).data) >= 2


def test_head_grid_and_model_card_work_on_every_mode(app, files):
    from attnviz.app.pages import overview
    from attnviz.app.views import model_card

    grids = {}
    for name in ("full", "rows", "summary"):
        fig, _ = overview.grid.figure(_sel(name), "entropy")
        grids[name] = np.asarray(fig.data[0].z, np.float64)
        with attnviz.open(files[name]) as rec:
            card = dict(model_card(rec))
        assert {"full": "every attention map", "rows": "query rows only (--store rows): 4 per image",
                "summary": "per-head summaries only (--store summary)"}[name] in card["stored"]
        dl, _ = overview.card(_sel(name))
        assert "stored" in str(dl)
    # the same maps: the same head statistics, computed from the maps (full) or kept while recording
    np.testing.assert_allclose(grids["rows"], grids["full"], rtol=1e-6)
    np.testing.assert_allclose(grids["summary"], grids["full"], rtol=1e-6)


def test_spatial_and_patterns_pages_say_the_mode_needs_full_maps(app):
    from attnviz.app.pages import patterns, spatial

    for name, what in (("rows", "stores only query rows (--store rows)"), ("summary", "(--store summary)")):
        status = spatial.status(_sel(name), "mean")[0]
        assert what in str(status) and "the spatial-profile view needs full maps" in str(status)
        trend, _ = spatial.trends(_sel(name), "image", "all")
        assert what in _text(trend)
        st, _ = patterns.status(_sel(name))
        assert "the pattern atlas needs full maps" in str(st) and what in str(st)
        assert patterns.compute_box(_sel(name)) == {"display": "none"}
    # localization: the rows file keeps every CLS row, so only the summary refuses (nothing stored yet here)
    loc_rows, _ = spatial.localization(_sel("rows"))
    loc_summary, _ = spatial.localization(_sel("summary"))
    assert "not stored yet" in _text(loc_rows) or "stores only" in _text(loc_rows)
    assert "(--store summary)" in _text(loc_summary)
