"""Callbacks called as plain functions (no browser): store -> analysis -> figure, and the writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from dash import no_update

from attnviz.app.registry import UnknownFileError, get_recording
from attnviz.app.selection import Selection, resolve
from attnviz.store.reader import Recording
from tests.app.conftest import GRID, N_HEADS, apply_patch
from tests.helpers import make_recording


def sel(**kw):
    d = {"file": "run.h5", "sample": 0, "layer": 0, "head": 0, "query": None}
    d.update(kw)
    return d


def test_create_app_does_not_import_torch(rec_path):
    code = ("import sys; from attnviz.app import create_app; app = create_app([sys.argv[1]]); "
            "c = app.server.test_client(); assert c.get('/_dash-layout').status_code == 200; "
            "print(sorted(m for m in ('torch', 'transformers', 'umap', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(rec_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pages_registered_and_layout_served(app):
    import dash

    paths = {p["path"] for p in dash.page_registry.values()}
    assert {"/", "/explorer"} <= paths
    c = app.server.test_client()
    for path in ("/", "/explorer", "/_dash-layout", "/_dash-dependencies"):
        assert c.get(path).status_code == 200
    deps = json.loads(c.get("/_dash-dependencies").data)
    assert any("explorer-overlay.figure" in d["output"] for d in deps)


def test_only_given_files_can_be_opened(app, rec_path, tmp_path):
    other = make_recording(tmp_path / "other.h5", n_samples=2)
    for bad in (str(other), "other.h5", "../run.h5", str(rec_path), 3, None):
        with pytest.raises(UnknownFileError):
            get_recording(bad)
        _, rec, problem = resolve({"file": bad})
        assert rec is None and problem
    from attnviz.app.shell import pick_file

    assert pick_file(str(other)) is no_update
    assert apply_patch(sel(query=5), pick_file("run.h5")) == sel(query=None)
    assert get_recording("run.h5").path == rec_path.resolve()


def test_selection_is_parsed_and_out_of_range_values_are_said_not_guessed(app):
    s, rec, problem = resolve({"file": "run.h5", "sample": 4, "layer": 1, "head": "2", "query": 3})
    assert problem is None and s == Selection(file="run.h5", sample=4, layer=1, head=2, query=3)
    for bad, words in [({"sample": 99}, "sample 99 is out of range; this recording has samples 0..4"),
                       ({"sample": -1}, "sample -1 is out of range"), ({"layer": 7}, "layer 7 is out of range"),
                       ({"head": -3}, "head -3 is out of range"), ({"query": 1000}, "query position 1000 is out")]:
        _, rec, problem = resolve({"file": "run.h5", "sample": 0, "layer": 0, "head": 0, "query": None, **bad})
        assert rec is None and words in problem, (bad, problem)
    assert Selection.from_store("garbage") == Selection()


def test_explorer_overlay_is_the_stored_row_of_the_query(app, rec_path):
    from attnviz.app.pages import explorer

    data = sel(sample=3, layer=1, head=2, query=1 + 1 * GRID[1] + 2)  # patch (1, 2)
    fig = explorer.overlay(data)
    with Recording(rec_path) as rec:
        expect = rec.attention(3, 1, 2)[data["query"], 1:].reshape(GRID)
    np.testing.assert_allclose(np.asarray(fig.data[1].z), expect, rtol=1e-6)
    assert "query patch (1, 2)" in fig.layout.title.text


def test_click_on_a_patch_sets_the_query_and_the_map_follows(app, rec_path):
    from attnviz.app.pages import explorer

    data = sel(layer=1, head=1)
    before = np.asarray(explorer.overlay(data).data[1].z)
    click = {"points": [{"curveNumber": 1, "x": 3 * 8 + 4, "y": 2 * 8 + 4}]}  # centre of patch (2, 3)
    with_click = explorer.query_from_click(click, data)
    data2 = apply_patch(data, with_click)
    assert data2["query"] == 1 + 2 * GRID[1] + 3
    after = np.asarray(explorer.overlay(data2).data[1].z)
    with Recording(rec_path) as rec:
        np.testing.assert_allclose(after, rec.attention(0, 1, 1)[data2["query"], 1:].reshape(GRID), rtol=1e-6)
    assert not np.allclose(before, after)
    # outside the grid: nothing
    assert explorer.query_from_click({"points": [{"x": 999, "y": 1}]}, data) is no_update


def test_small_multiples_hold_every_head_and_click_selects_head(app, rec_path):
    from attnviz.app.pages import explorer

    data = sel(sample=2, layer=0, head=0, query=0)
    fig = explorer.multiples(data)
    z = np.asarray(fig.data[0].z, dtype=float)
    owner = np.asarray(fig.data[0].customdata)
    with Recording(rec_path) as rec:
        rows = rec.attention_query(2, 0, 0)[:, 1:].reshape(N_HEADS, *GRID)
    for h in range(N_HEADS):
        np.testing.assert_allclose(z[owner == h].reshape(GRID), rows[h], rtol=1e-6)
    click = {"points": [{"customdata": 2}]}
    assert apply_patch(data, explorer.head_from_click(click, data))["head"] == 2


def test_cls_button_and_cls_map(app, rec_path):
    from attnviz.app.pages import explorer

    data = sel(layer=1, head=0, query=5)
    assert apply_patch(data, explorer.cls_query(data))["query"] == 0
    data = sel(layer=1, head=0)
    fig = explorer.cls_map(data)
    with Recording(rec_path) as rec:
        np.testing.assert_allclose(np.asarray(fig.data[1].z), rec.attention(0, 1, 0)[0, 1:].reshape(GRID), rtol=1e-6)


def test_sliders_follow_the_selection(app):
    from attnviz.app.pages import explorer

    out = explorer.sliders_from_selection(sel(layer=1, head=2))
    assert out[0:2] == (1, 1) and out[3:5] == (2, N_HEADS - 1)
    assert apply_patch(sel(), explorer.slider_moved(sel(), 1, 2)) == sel(layer=1, head=2)
    assert explorer.slider_moved(sel(layer=1, head=2), 1, 2) is no_update


def test_head_grid_colours_and_click(app, rec_path):
    from attnviz.analysis.head_stats import compute_head_stats
    from attnviz.app.pages import explorer

    opts, value = explorer.grid.options(sel(), None)
    assert value == "entropy" and {o["value"] for o in opts} == {"entropy", "confidence", "cls_attention"}
    fig, note = explorer.grid.figure(sel(layer=1, head=2), "confidence")
    with Recording(rec_path) as rec:
        expect = compute_head_stats(rec, max_samples=8).confidence
    np.testing.assert_allclose(np.asarray(fig.data[0].z), expect)
    assert "estimated from the first 5 sample(s)" in note
    assert (fig.layout.shapes[0].x0, fig.layout.shapes[0].y0) == (1.5, 0.5)  # head 2, layer 1
    assert apply_patch(sel(), explorer.grid.clicked({"points": [{"x": 1, "y": 0}]})) == sel(layer=0, head=1)


def test_head_grid_prefers_stored_metrics(app, rec_path):
    from attnviz.app.pages import explorer
    from attnviz.store import HeadMetricInfo, write_head_metric

    from attnviz.app.registry import get_registry

    explorer.grid.options(sel(), None)  # the file is open in the app ...
    get_registry().close()  # ... h5py cannot reopen it r+ in the same process (analyze runs in another one)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_head_metric(rec_path, HeadMetricInfo("accuracy_drop", units="pp"), values)
    opts, value = explorer.grid.options(sel(), "accuracy_drop")  # the file changed: reopened
    assert value == "accuracy_drop" and "accuracy_drop" in {o["value"] for o in opts}
    fig, note = explorer.grid.figure(sel(), "accuracy_drop")
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), values)


def test_overview_filters_and_sample_click(app, rec_path):
    from attnviz.app.pages import overview

    fig, count, n_pages = overview.thumbs(sel(), "label", None, "all", 1)
    assert list(fig.data[1].customdata) == [0, 1, 2, 3, 4] and n_pages == 1
    fig3, _, _ = overview.thumbs(sel(sample=3), "label", None, "all", 1)  # cached page, new outline
    assert fig.layout.shapes[0].x0 == -1 and fig3.layout.shapes[0].x0 == 3 * 48 - 1
    assert len(overview.thumbs(sel(), "label", None, "all", 1)[0].layout.shapes) == 1  # the cache stays clean
    fig, count, _ = overview.thumbs(sel(), "correctness", None, "incorrect", 1)
    assert list(fig.data[1].customdata) == [1]  # make_recording: sample 1 is the one error
    fig, _, _ = overview.thumbs(sel(), "label", [0], "all", 1)
    assert list(fig.data[1].customdata) == [0, 3]  # labels are i % 3
    fig, count, _ = overview.thumbs(sel(), "label", [2], "incorrect", 1)
    assert "No sample matches" in fig.layout.annotations[0].text
    assert apply_patch(sel(), overview.pick_sample({"points": [{"customdata": 3}]}))["sample"] == 3
    card, options = overview.card(sel())
    assert [o["label"] for o in options] == ["circle", "square", "triangle"]
    assert "80.0%" in str(card)  # 4 of 5 right


def test_bad_files_show_a_message_and_others_keep_working(tmp_path):
    from attnviz.app import create_app
    from attnviz.app.shell import banner

    good = make_recording(tmp_path / "good.h5", n_samples=3)
    notrec = tmp_path / "notes.h5"
    notrec.write_bytes(b"this is not HDF5")
    other_version = make_recording(tmp_path / "v99.h5", n_samples=2)
    with h5py.File(other_version, "r+") as f:
        f.attrs["format_version"] = 99
    partial = make_recording(tmp_path / "partial.h5", n_samples=6, batch_size=2)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
        f["samples/done"][4:] = False
    doomed = make_recording(tmp_path / "doomed.h5", n_samples=2)
    create_app([good, notrec, other_version, partial, doomed])
    from attnviz.app.pages import explorer

    text, cls = banner({"file": "notes.h5"})
    assert "not an HDF5 file" in text and "error" in cls
    text, cls = banner({"file": "v99.h5"})
    assert "format version 99" in text
    text, cls = banner({"file": "partial.h5"})
    assert "4 of 6 samples" in text and "warning" in cls
    assert explorer.overlay({"file": "partial.h5", "sample": 3}).data  # a written sample of an incomplete file
    assert "samples 0..3" in explorer.overlay({"file": "partial.h5", "sample": 5}).layout.annotations[0].text
    assert "not an HDF5" in explorer.overlay({"file": "notes.h5"}).layout.annotations[0].text
    assert get_recording("doomed.h5").n_samples == 2
    os.remove(doomed)
    text, _ = banner({"file": "doomed.h5"})
    assert "deleted or moved" in text
    assert "deleted or moved" in explorer.multiples({"file": "doomed.h5"}).layout.annotations[0].text
    assert banner({"file": "good.h5"})[1].endswith("hidden")
    assert explorer.overlay({"file": "good.h5"}).data[1].type == "heatmap"


def test_registry_reopens_a_file_rewritten_by_another_process(app, rec_path):
    first = get_recording("run.h5")
    assert "entropy" not in first.head_metrics()
    code = "import sys; from attnviz.analysis.head_stats import compute_and_store; compute_and_store(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(rec_path)], check=True, capture_output=True)
    second = get_recording("run.h5")
    assert second is not first and first.closed
    assert "entropy" in second.head_metrics()


def test_folders_expand_to_their_recordings_and_names_stay_unique(tmp_path):
    from attnviz.app.registry import FileRegistry, expand_paths
    from attnviz.errors import InputError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r1 = make_recording(tmp_path / "a" / "run.h5", n_samples=2)
    r2 = make_recording(tmp_path / "b" / "run.h5", n_samples=2)
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert expand_paths([tmp_path / "a"]) == [r1]
    reg = FileRegistry([tmp_path / "a", r2, r1])  # r1 twice: once
    assert reg.keys() == ["run.h5", "run.h5~2"]
    assert reg.entry("run.h5~2").path == r2.resolve()
    with pytest.raises(InputError, match="no .h5"):
        expand_paths([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
    with pytest.raises(InputError, match="no such file"):
        FileRegistry([tmp_path / "missing.h5"])
