"""Patterns page ("/patterns"): the attention pattern atlas — every pattern the heads learned.

Reads only the cached atlas ``analyses/patterns`` (written by ``attnviz analyze FILE --patterns``); the
page never trains, never runs UMAP and never loops over the samples. The only reads from the maps
are the few maps shown in full (one chunk each) and the reconstructions stored with the atlas.

Views: the UMAP scatter of the latent codes (WebGL; colour by cluster / layer / head / image /
reconstruction error; the selected head's maps circled); click or lasso points to see their raw maps
(query marked), the autoencoder's input and its reconstruction; the prototype gallery (click a tile
to see those maps); the layers x heads grid coloured by each head's dominant cluster (optionally
ordered by the hierarchical clustering of mixes); the pattern mix of the selected layer's heads; the
dendrogram of all heads; training and silhouette diagnostics. A click on a head (grid, bars,
dendrogram) or on a map in the scatter selects that head (and image) everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import deque
from typing import Any

import dash
import numpy as np
from dash import Input, Output, State, callback, dcc, html, no_update

from attnviz.analysis.patterns import PatternAtlas, load_atlas, map_detail, pattern_kind
from attnviz.app import ids
from attnviz.app.components import graph, message, triggered_id
from attnviz.app.data import memo
from attnviz.app.selection import Selection, patch, resolve
from attnviz.app.views import no_image_note
from attnviz.errors import InputError
from attnviz.figures import fig_message
from attnviz.figures.patterns import (
    COLOR_BY,
    clicked_head,
    cluster_label,
    fig_dominant_grid,
    fig_head_dendrogram,
    fig_head_mix,
    fig_map_pairs,
    fig_pattern_scatter,
    fig_training,
    gallery_figure,
    gallery_tile,
    grid_head,
    highlight_trace,
    scatter_groups,
    selected_maps,
)
from attnviz.store.reader import Recording, store_refusal

dash.register_page(__name__, path="/patterns", name="Patterns", order=4, title="attnviz - patterns")

P = "patterns"
STATUS = ids.page_id(P, "status")
SUMMARY = ids.page_id(P, "summary")
COLOUR = ids.page_id(P, "colour")
SCATTER = ids.page_id(P, "scatter")
SCATTER_KEY = ids.page_id(P, "scatter-key")
PICKED = ids.page_id(P, "picked")
CLEAR = ids.page_id(P, "clear")
MAPS = ids.page_id(P, "maps")
MAPS_NOTE = ids.page_id(P, "maps-note")
GALLERY = ids.page_id(P, "gallery")
ORDER = ids.page_id(P, "order")
GRID = ids.page_id(P, "grid")
MIX = ids.page_id(P, "mix")
DENDROGRAM = ids.page_id(P, "dendrogram")
TRAINING = ids.page_id(P, "training")
COMPUTE = ids.page_id(P, "compute")
COMPUTE_BOX = ids.page_id(P, "compute-box")
JOB_STATUS = ids.page_id(P, "job-status")
TICK = ids.page_id(P, "tick")
RELOAD = ids.page_id(P, "reload")

#: maps shown in full at once (raw, input, reconstruction)
MAX_SHOWN = 6
#: graphs whose points carry customdata [layer, head]: a click selects that head everywhere
HEAD_GRAPHS = (MIX, DENDROGRAM)

_ABOUT = (
    "Each point is one query patch's attention map, re-centred on the query (so 'attends to its left "
    "neighbour' looks the same anywhere in the image), encoded by a small convolutional autoencoder; UMAP "
    "lays the codes out in 2-D and clustering groups them (KMeans with K by silhouette, or HDBSCAN). A "
    "prototype is the decoder's image of a cluster centre; a head's mix is the share of its maps in each "
    "cluster. Cluster names are guesses from the prototype. Method and parameters: docs/patterns.md."
)


def _radio(id_: str, options: list[tuple[str, str]], value: str) -> dcc.RadioItems:
    return dcc.RadioItems(id=id_, value=value, inline=True, options=[{"label": lab, "value": v} for v, lab in options],
                          inputStyle={"marginRight": "4px", "marginLeft": "10px"})


def layout(**_kwargs: Any) -> html.Div:
    return html.Div([
        html.H2("Attention pattern atlas"),
        html.Div(id=STATUS),
        html.Div([html.Button("compute the atlas now", id=COMPUTE, className="av-button"),
                  html.Span(id=JOB_STATUS, className="av-note", style={"marginLeft": "12px"})],
                 id=COMPUTE_BOX, className="av-row", style={"display": "none"}),
        dcc.Interval(id=TICK, interval=1000, disabled=True),
        dcc.Location(id=RELOAD, refresh=True),
        html.Div(id=SUMMARY, className="av-note"),
        dcc.Store(id=SCATTER_KEY),
        dcc.Store(id=PICKED),
        html.Div([
            html.Div([
                html.H3("Every sampled map, by its latent code (UMAP); click or lasso points"),
                html.Div([html.Label("colour by", htmlFor=COLOUR, className="av-label"),
                          _radio(COLOUR, [(c, c) for c in COLOR_BY], "cluster")], className="av-row"),
                graph(SCATTER, filename="patterns-umap", height=560,
                      config={"modeBarButtonsToRemove": []}),   # keep lasso/box select
            ], className="av-card av-col"),
            html.Div([
                html.H3("Selected maps: raw (query ×), input, reconstruction"),
                html.Div([html.Span(id=MAPS_NOTE, className="av-note"),
                          html.Button("show the selected head's maps", id=CLEAR, className="av-button")],
                         className="av-row"),
                graph(MAPS, filename="patterns-maps"),
            ], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Prototypes (decoded cluster centres) and the nearest real maps; click a tile"),
                      graph(GALLERY, filename="patterns-prototypes")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([
                html.H3("Heads by dominant pattern (click selects a head everywhere)"),
                html.Div([html.Label("heads", htmlFor=ORDER, className="av-label"),
                          _radio(ORDER, [("natural", "in index order"), ("clustered", "ordered by mix")],
                                 "natural")], className="av-row"),
                graph(GRID, filename="patterns-dominant"),
            ], className="av-card av-col"),
            html.Div([html.H3("Pattern mix of the selected layer's heads"),
                      graph(MIX, filename="patterns-mix")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div([
            html.Div([html.H3("Heads clustered by their pattern mix"),
                      graph(DENDROGRAM, filename="patterns-dendrogram")], className="av-card av-col"),
            html.Div([html.H3("Autoencoder training and the choice of K"),
                      graph(TRAINING, filename="patterns-training")], className="av-card av-col"),
        ], className="av-cols"),
        html.Div(_ABOUT, className="av-note"),
    ], className="av-page")


# -- data access (memoised per open recording; the atlas is read once) ------------------------------------


def _howto(file: str) -> str:
    return (f"No pattern atlas in {file} yet: run `attnviz analyze {file} --patterns` (it trains a small "
            "autoencoder, then UMAP and clustering; a few minutes for 50,000 maps on a CPU). Then reload this page.")


def cached_atlas(rec: Recording) -> PatternAtlas | None:
    return memo(rec, ("patterns_atlas",), lambda: load_atlas(rec))


def _resolve(data: Any) -> tuple[Selection, Recording | None, PatternAtlas | None, str | None]:
    """(selection clamped to the atlas's stack, recording, atlas, problem)."""
    sel, rec, problem = resolve(data)
    if problem:
        return sel, None, None, problem
    atlas = cached_atlas(rec)
    if atlas is None:
        refusal = store_refusal(rec, "the pattern atlas")
        if refusal:
            return sel, None, None, f"{sel.file}: {refusal}."
        try:
            pattern_kind(rec, None)
        except InputError as e:
            if rec.family == "s2t":
                return sel, None, None, no_image_note(sel.file, rec, "pattern atlas of image attention maps")
            return sel, None, None, f"{sel.file}: {e}"
        return sel, None, None, _howto(sel.file)
    return sel.clamp(rec, atlas.kind), rec, atlas, None


def _names(atlas: PatternAtlas) -> list[str]:
    return [cluster_label(f["cluster"], f) for f in atlas.prototype_facts()]


def _atlas_stamp(sel: Selection, atlas: PatternAtlas) -> list[Any]:
    """Identifies one atlas of one file (indices into an atlas mean nothing for another)."""
    return [sel.file, atlas.n_maps, str(atlas.summary.get("seconds", {}).get("total", ""))]


def head_maps(atlas: PatternAtlas, layer: int, head: int, sample: int | None = None,
              limit: int = MAX_SHOWN) -> np.ndarray:
    """Atlas indices of a head's maps, those of ``sample`` first, at most ``limit``."""
    idx = np.flatnonzero((atlas.layer == layer) & (atlas.head == head))
    if sample is not None:
        idx = np.concatenate([idx[atlas.sample[idx] == sample], idx[atlas.sample[idx] != sample]])
    return idx[:limit]


# -- callbacks (thin: selection -> cached atlas -> figure) -----------------------------------------------


@callback(Output(STATUS, "children"), Output(SUMMARY, "children"), Input(ids.SELECTION, "data"))
def status(data: Any):
    """Selection -> what the atlas is (or how to compute it)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        kind = "warning" if problem.startswith("No pattern atlas") or "(--store " in problem else "error"
        return message(problem, kind), ""
    s = atlas.summary
    p = atlas.params
    h, w = s["map_shape"]
    by = {"silhouette": "K chosen by silhouette", "given": "K given", "hdbscan": "HDBSCAN"}.get(s["clusters_chosen_by"], "")
    kind = "" if atlas.kind == rec.main_kind else f" of the {atlas.kind!r} stack"
    text = (f"{atlas.n_maps} {atlas.mode} maps ({h}x{w}){kind} sampled from {s['n_samples_used']} images, "
            f"{s['n_layers']}x{s['n_heads']} heads; latent {p['latent']}, {s['epochs_run']} epochs; "
            f"{atlas.n_clusters} clusters ({by}); reconstruction error {s['reconstruction_error']:.3g} "
            f"({s['explained']:.0%} of the mean-map error explained). Selected: layer {sel.layer}, head {sel.head}.")
    return "", text


@callback(Output(SCATTER, "figure"), Output(SCATTER_KEY, "data"),
          Input(ids.SELECTION, "data"), Input(COLOUR, "value"), State(SCATTER_KEY, "data"))
def scatter(data: Any, colour: str | None, key: Any):
    """Selection, colouring -> the UMAP scatter with the selected head's maps circled.

    The full figure (tens of thousands of points) is sent only when the file or the colouring changes;
    a new head selection replaces just the highlight trace (a ``dash.Patch``).
    """
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return fig_message(problem), None
    colour = colour if colour in COLOR_BY else "cluster"
    new_key = [*_atlas_stamp(sel, atlas), colour]
    mine = np.flatnonzero((atlas.layer == sel.layer) & (atlas.head == sel.head))
    if key == new_key:
        p = dash.Patch()
        last = len(scatter_groups(colour, atlas.cluster))   # the highlight trace follows the groups
        p["data"][last] = highlight_trace(atlas.embedding, mine, atlas.n_maps,
                                        name=f"layer {sel.layer}, head {sel.head}").to_plotly_json()
        return p, no_update
    fig = fig_pattern_scatter(atlas.embedding, cluster=atlas.cluster, layer=atlas.layer, head=atlas.head,
                              sample=atlas.sample, query=atlas.query, grid=atlas.grid, color_by=colour,
                              error=atlas.error, cluster_names=_names(atlas), highlight=mine)
    fig.data[-1].name = f"layer {sel.layer}, head {sel.head}"
    return fig, new_key


def picked_from_scatter(data: Any, selected: Any, colour: str | None) -> dict[str, Any] | None:
    """A click/lasso on the scatter -> the picked atlas indices (all of them; the maps view shows a few)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem or not selected:
        return None
    idx = selected_maps(selected, colour if colour in COLOR_BY else "cluster", atlas.cluster)
    if not len(idx):
        return None
    return {"atlas": _atlas_stamp(sel, atlas), "indices": idx.tolist(), "source": "scatter"}


def picked_from_gallery(data: Any, click: Any) -> dict[str, Any] | None:
    """A click on a gallery tile -> its map (a nearest map) or its cluster's nearest maps (the prototype)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return None
    tile = gallery_tile(click, atlas.prototypes.shape[1:], atlas.n_clusters, 1 + atlas.nearest.shape[1])
    if tile is None:
        return None
    cluster, column = tile
    near = atlas.nearest[cluster]
    near = near[near >= 0]
    idx = near if column == 0 else near[column - 1 : column]
    return {"atlas": _atlas_stamp(sel, atlas), "indices": [int(i) for i in idx], "source": f"cluster {cluster}"}


@callback(Output(PICKED, "data"), Input(SCATTER, "selectedData"), Input(GALLERY, "clickData"), Input(CLEAR, "n_clicks"),
          State(ids.SELECTION, "data"), State(COLOUR, "value"), prevent_initial_call=True)
def pick(selected: Any, gallery_click: Any, _clear: Any, data: Any, colour: str | None):
    """Scatter selection / gallery click / the clear button -> the picked maps (page-local store)."""
    trigger = triggered_id()
    if trigger == CLEAR:
        return None
    if trigger == GALLERY:
        return picked_from_gallery(data, gallery_click)
    return picked_from_scatter(data, selected, colour)


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(SCATTER, "clickData"),
          State(ids.SELECTION, "data"), State(COLOUR, "value"), prevent_initial_call=True)
def select_from_scatter(click: Any, data: Any, colour: str | None):
    """A click on one map in the scatter -> select its head, image and query everywhere."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return no_update
    idx = selected_maps(click, colour if colour in COLOR_BY else "cluster", atlas.cluster, limit=1)
    if not len(idx):
        return no_update
    j = int(idx[0])
    n_prefix = rec.layout(atlas.kind).n_prefix
    return patch(layer=int(atlas.layer[j]), head=int(atlas.head[j]), sample=int(atlas.sample[j]),
                 query=n_prefix + int(atlas.query[j]))


@callback(Output(MAPS, "figure"), Output(MAPS_NOTE, "children"), Input(PICKED, "data"), Input(ids.SELECTION, "data"))
def maps(picked: Any, data: Any):
    """Picked maps (or, with none picked, the selected head's maps) -> raw / input / reconstruction."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return fig_message(problem), ""
    valid = isinstance(picked, dict) and picked.get("atlas") == _atlas_stamp(sel, atlas) and picked.get("indices")
    if valid:
        all_idx = np.asarray([i for i in picked["indices"] if 0 <= int(i) < atlas.n_maps], np.int64)
        idx = all_idx[:MAX_SHOWN]
        src = picked.get("source", "scatter")
        note = (f"{len(all_idx)} map(s) picked ({src}); showing {len(idx)}." if len(all_idx) > len(idx)
                else f"{len(idx)} map(s) picked ({src}).")
    else:
        idx = head_maps(atlas, sel.layer, sel.head, sel.sample)
        note = (f"Layer {sel.layer}, head {sel.head}: {len(idx)} of its maps (image {sel.sample} first). "
                "Click or lasso points in the scatter to see others.")
    if not len(idx):
        return fig_message("No maps of this head in the atlas sample."), note
    d = map_detail(rec, atlas, idx)
    qy, qx = np.divmod(d.query, atlas.grid[1])
    titles = [f"L{l} H{h} · img {s} · q({y},{x}) · C{c}" if c >= 0 else f"L{l} H{h} · img {s} · q({y},{x}) · noise"
              for l, h, s, y, x, c in zip(d.layer, d.head, d.sample, qy, qx, d.cluster)]
    fig = fig_map_pairs(d.raw, d.query, atlas.grid, d.inputs, d.recon, d.masks, mode=atlas.mode,
                        raw_prefix=d.raw_prefix, input_prefix=d.input_prefix, recon_prefix=d.recon_prefix,
                        titles=titles)
    return fig, note


@callback(Output(GALLERY, "figure"), Input(ids.SELECTION, "data"))
def gallery(data: Any):
    """File -> the prototype gallery (read once per open recording)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return memo(rec, ("patterns_gallery",), lambda: gallery_figure(rec, atlas, map_detail))


@callback(Output(GRID, "figure"), Output(MIX, "figure"), Output(DENDROGRAM, "figure"),
          Input(ids.SELECTION, "data"), Input(ORDER, "value"))
def heads(data: Any, order: str | None):
    """Selection -> dominant-cluster grid, the selected layer's mixes, the dendrogram of heads."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return fig_message(problem), fig_message(problem), fig_message(problem)
    names = _names(atlas)
    selected = (sel.layer, sel.head)
    grid = fig_dominant_grid(atlas.dominant, atlas.mix, head_order=atlas.head_order if order == "clustered" else None,
                             selected=selected, names=names)
    l = sel.layer
    noise = atlas.noise[l] if atlas.noise.any() else None
    mix = fig_head_mix(atlas.mix[l], labels=[f"L{l} H{h}" for h in range(atlas.n_heads)], noise=noise, names=names,
                       highlight=sel.head, customdata=[[l, h] for h in range(atlas.n_heads)],
                       title=f"Layer {l}: share of each head's maps per cluster")
    dendro = fig_head_dendrogram(atlas.linkage, n_heads=atlas.n_heads, dominant=atlas.dominant, selected=selected,
                                 names=names)
    return grid, mix, dendro


@callback(Output(TRAINING, "figure"), Input(ids.SELECTION, "data"))
def training(data: Any):
    """File -> loss curves and the silhouette scan."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return fig_message(problem)
    return fig_training(atlas.train_loss, atlas.val_loss, k_candidates=atlas.k_candidates, silhouette=atlas.silhouette,
                        chosen_k=atlas.n_clusters)


def select_head(click: Any):
    """A click on a head (mix bar, dendrogram leaf) -> selection layer/head."""
    head = clicked_head(click)
    return no_update if head is None else patch(layer=head[0], head=head[1])


@callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(GRID, "clickData"),
          State(ORDER, "value"), State(ids.SELECTION, "data"), prevent_initial_call=True)
def select_from_grid(click: Any, order: str | None, data: Any):
    """A click on a cell of the dominant-cluster grid -> selection layer/head (the cell's slot is
    mapped back to the head when the heads are ordered by mix)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem:
        return no_update
    head = grid_head(click, atlas.head_order if order == "clustered" else None, atlas.n_layers, atlas.n_heads)
    return no_update if head is None else patch(layer=head[0], head=head[1])


for _graph in HEAD_GRAPHS:
    callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(_graph, "clickData"),
             prevent_initial_call=True)(select_head)


# -- the "compute" button: `python -m attnviz.analysis.patterns FILE` in a subprocess ---------------------
# The server never imports torch or umap: the computation runs in its own process, which prints one
# JSON line per progress step; a reader thread keeps the last one. One job per file at a time.


class Job:
    """A running (or finished) computation of one file's atlas. (A plain class: Dash executes page
    modules without registering them in ``sys.modules``, which ``dataclasses`` needs.)"""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.last: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stderr: deque = deque(maxlen=20)

    def start_reader(self) -> None:
        def read_stdout() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "done" in msg or "error" in msg:
                    self.result = msg
                else:
                    self.last = msg

        def read_stderr() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self.stderr.append(line.rstrip())

        self._reader = threading.Thread(target=read_stdout, daemon=True)
        self._reader.start()
        threading.Thread(target=read_stderr, daemon=True).start()

    def describe(self) -> str:
        if self.result is not None:
            if "error" in self.result:
                return f"failed: {self.result['error']}"
            return f"done: {self.result.get('n_maps')} maps, {self.result.get('n_clusters')} clusters"
        if self.proc.poll() is not None:
            tail = next((l for l in reversed(self.stderr) if l.strip()), "")
            return f"failed (exit code {self.proc.returncode}){': ' + tail if tail else ''}"
        if not self.last:
            return "starting (loading torch and the recording)..."
        return f"{self.last.get('stage', '')} {float(self.last.get('fraction', 0)):.0%}: {self.last.get('message', '')}"


_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()


def job_command(path: str) -> list[str]:
    """The command a compute button runs (replaceable in tests)."""
    return [sys.executable, "-m", "attnviz.analysis.patterns", path]


def start_job(key: str, path: str) -> Job:
    """Start computing the atlas of ``path`` (registry ``key``), or return the job already running."""
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is not None and job.proc.poll() is None:
            return job
        proc = subprocess.Popen(job_command(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        job = Job(proc)
        job.start_reader()
        _JOBS[key] = job
        return job


def job_state(key: str | None) -> tuple[str, bool, bool]:
    """(text for the page, still running, finished well) of the file's job; ("", False, False) when none."""
    job = _JOBS.get(key) if key else None
    if job is None:
        return "", False, False
    if job.proc.poll() is not None:
        job._reader.join(timeout=2)  # the last lines
    running = job.proc.poll() is None
    ok = not running and job.result is not None and bool(job.result.get("done"))
    return job.describe(), running, ok


@callback(Output(COMPUTE_BOX, "style"), Input(ids.SELECTION, "data"))
def compute_box(data: Any):
    """Show the compute button only when the file has no atlas (and could have one)."""
    sel, rec, atlas, problem = _resolve(data)
    if problem and problem.startswith("No pattern atlas"):
        return {}
    return {"display": "none"}


@callback(Output(TICK, "disabled"), Output(JOB_STATUS, "children", allow_duplicate=True), Input(COMPUTE, "n_clicks"),
          State(ids.SELECTION, "data"), prevent_initial_call=True)
def compute(n_clicks: Any, data: Any):
    """The button -> start the subprocess (one per file) and the progress ticks."""
    from attnviz.app.registry import get_recording

    sel = Selection.from_store(data)
    if not n_clicks or sel.file is None:
        return no_update, no_update
    try:
        path = str(get_recording(sel.file).path)
    except Exception as e:  # noqa: BLE001 - unknown or unreadable file: say so on the page
        return True, f"cannot start: {e}"
    job = start_job(sel.file, path)
    return False, job.describe()


@callback(Output(JOB_STATUS, "children"), Output(TICK, "disabled", allow_duplicate=True), Output(RELOAD, "href"),
          Input(TICK, "n_intervals"), State(ids.SELECTION, "data"), prevent_initial_call=True)
def progress(_n: Any, data: Any):
    """Every second while a job runs: its progress; when it has finished well, reload the page."""
    key = Selection.from_store(data).file
    text, running, ok = job_state(key)
    if running:
        return text, False, no_update
    return text, True, ("/patterns" if ok else no_update)
