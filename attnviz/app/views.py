"""Recording -> figure builders shared by the pages' callbacks and ``attnviz report`` (no Dash).

Each function reads only the slices it shows (one query row, one layer's rows, one thumbnail),
hands them to a pure :mod:`attnviz.figures` function, and returns the figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from attnviz.app.data import lru
from attnviz.figures import fig_message
from attnviz.figures.explorer import (
    fig_attribution_panels,
    fig_head_multiples,
    fig_query_overlay,
    fig_token_matrix,
    token_labels,
)
from attnviz.figures.overview import CORRECT, UNKNOWN, WRONG, class_colour, fig_thumbnail_mosaic, tile_mosaic
from attnviz.errors import RecordingError
from attnviz.store.reader import Recording, store_refusal
from attnviz.store.schema import STORE_FULL, STORE_ROWS, TokenLayout

__all__ = [
    "no_image_note",
    "explorer_kind",
    "default_query",
    "query_cell",
    "query_of_cell",
    "query_overlay",
    "head_multiples",
    "cls_overlay",
    "attribution_panels",
    "token_matrix",
    "model_card",
    "ThumbPage",
    "filter_samples",
    "thumbnail_page",
    "COLOUR_BY",
]

COLOUR_BY = ("correctness", "label", "prediction")


# -- recordings without images -----------------------------------------------------------------------

def no_image_note(file: str, rec: Recording, what: str) -> str:
    """One line for an image page opened on a recording whose inputs are not images (speech), or that has no
    attention over an image patch grid; ``what`` names what the page would show."""
    if rec.family == "s2t":
        return (f"{file} is a speech-to-text recording: its inputs are audio clips, it has no image, so there is no "
                f"{what}. Its waveform, transcript and cross-attention over time are on the Speech page.")
    return f"{file}: this {rec.family} recording has no attention over an image patch grid, so there is no {what}."


# -- explorer -------------------------------------------------------------------------------------

def explorer_kind(rec: Recording) -> str | None:
    """The attention kind the explorer shows: the main kind if it is a patch stack, else the first
    patch stack (LVLM: the vision tower); None when the recording has no image patches."""
    for kind in rec.kinds():
        if rec.layout(kind).grid is not None:
            return kind
    return None


def default_query(layout: TokenLayout) -> int:
    """The centre patch's token position."""
    gh, gw = layout.grid or (1, 1)
    return layout.n_prefix + (gh // 2) * gw + gw // 2


def query_cell(layout: TokenLayout, query: int) -> tuple[int, int] | None:
    """(row, col) of a patch query; None for a prefix token."""
    if layout.grid is None or query < layout.n_prefix:
        return None
    return divmod(query - layout.n_prefix, layout.grid[1])


def query_of_cell(layout: TokenLayout, cell: tuple[int, int]) -> int:
    return layout.n_prefix + cell[0] * layout.grid[1] + cell[1]


def _patch_heat(row: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """``row`` float ``[..., key_pos]`` -> the patch keys on the grid ``[..., gh, gw]``."""
    gh, gw = layout.grid
    return row[..., layout.n_prefix : layout.n_prefix + gh * gw].reshape(*row.shape[:-1], gh, gw)


def _thumb(rec: Recording, sample: int) -> np.ndarray:
    return lru(rec, "thumb", sample, lambda: rec.thumbnail(sample), maxsize=64)


def _query_name(layout: TokenLayout, query: int) -> str:
    cell = query_cell(layout, query)
    if cell is None:
        return layout.prefix_names[query] if query < len(layout.prefix_names) else f"prefix token {query}"
    return f"patch ({cell[0]}, {cell[1]})"


def _prefix_note(row: np.ndarray, layout: TokenLayout) -> str | None:
    if not layout.n_prefix:
        return None
    share = float(row[: layout.n_prefix].sum())
    return f"{share:.1%} of the attention goes to {'+'.join(n.upper() for n in layout.prefix_names) or 'prefix tokens'}"


def rows_refusal(rec: Recording, what: str) -> str | None:
    """Why ``what`` (a view of query rows) cannot be shown: None on full and ``--store rows`` recordings."""
    return store_refusal(rec, what, allowed=(STORE_FULL, STORE_ROWS))


def stored_query(rec: Recording, sample: int, query: int, kind: str | None = None) -> tuple[int, str | None]:
    """The query whose row can be shown for ``query``, and a note when it is another one: on a ``--store rows``
    recording the stored query nearest to it (on the patch grid; prefix tokens only for themselves), else itself."""
    if rec.store != STORE_ROWS:
        return query, None
    layout = rec.layout(kind)
    stored = rec.row_positions(sample, kind)
    n_stored = len(stored)
    if query in stored:
        return query, f"one of the {n_stored} stored query rows of this image (--store rows)"
    cell = query_cell(layout, query)
    patches = [int(p) for p in stored if query_cell(layout, int(p)) is not None]
    if cell is None or not patches:
        choice = int(stored[0])
    else:
        choice = min(patches, key=lambda p: (query_cell(layout, p)[0] - cell[0]) ** 2 + (query_cell(layout, p)[1] - cell[1]) ** 2)
    return choice, (f"{_query_name(layout, query)} is not stored: showing the nearest of the {n_stored} stored query "
                    f"rows of this image (--store rows)")


def _join(*notes: str | None) -> str | None:
    parts = [n for n in notes if n]
    return "; ".join(parts) if parts else None


def query_overlay(rec: Recording, sample: int, layer: int, head: int, query: int | None, kind: str | None = None) -> go.Figure:
    """Attention of one query (default: the centre patch) of one head over the image; on a ``--store rows``
    recording the nearest stored query."""
    kind = kind or explorer_kind(rec)
    problem = rows_refusal(rec, "the query view")
    if problem:
        return fig_message(problem)
    layout = rec.layout(kind)
    q = default_query(layout) if query is None else query
    q, note = stored_query(rec, sample, q, kind)
    row = rec.attention_query(sample, layer, q, kind=kind, head=head)
    title = f"L{layer} H{head}: query {_query_name(layout, q)}"
    return fig_query_overlay(_thumb(rec, sample), _patch_heat(row, layout), patch_size=layout.patch_size,
                             query_cell=query_cell(layout, q), title=title,
                             subtitle=_join(_prefix_note(row, layout), note))


def head_multiples(rec: Recording, sample: int, layer: int, head: int, query: int | None,
                   kind: str | None = None) -> go.Figure:
    """The same query for every head of the layer, one figure."""
    kind = kind or explorer_kind(rec)
    problem = rows_refusal(rec, "the every-head view of a query")
    if problem:
        return fig_message(problem)
    layout = rec.layout(kind)
    q = default_query(layout) if query is None else query
    q, note = stored_query(rec, sample, q, kind)
    rows = rec.attention_query(sample, layer, q, kind=kind)  # [head, key]
    return fig_head_multiples(_patch_heat(rows, layout), selected_head=head, query_cell=query_cell(layout, q),
                              title=f"Layer {layer}, every head: query {_query_name(layout, q)}",
                              subtitle=note if note and "not stored" in note else None)


def cls_overlay(rec: Recording, sample: int, layer: int, head: int, kind: str | None = None) -> go.Figure:
    """Attention of the first prefix token (CLS) of one head over the image."""
    kind = kind or explorer_kind(rec)
    layout = rec.layout(kind)
    if not layout.n_prefix:
        return fig_message("This model has no CLS token.")
    problem = rows_refusal(rec, "CLS attention")
    if problem:
        return fig_message(problem)
    row = rec.attention_query(sample, layer, 0, kind=kind, head=head)  # a --store rows file keeps every prefix row
    name = layout.prefix_names[0] if layout.prefix_names else "CLS"
    return fig_query_overlay(_thumb(rec, sample), _patch_heat(row, layout), patch_size=layout.patch_size,
                             title=f"{name.upper()} attention, L{layer} H{head}", subtitle=_prefix_note(row, layout),
                             colorbar_title=name, height=380)


def _rollout_grid(rec: Recording, sample: int, kind: str) -> tuple[np.ndarray, str]:
    stored = "rollout" in rec.attribution_methods() and kind == rec.main_kind
    if stored:
        return rec.attribution(sample, "rollout").astype(np.float64), "rollout"

    problem = store_refusal(rec, "rollout")
    if problem:
        raise RecordingError(problem)

    def make() -> np.ndarray:
        from attnviz.analysis.rollout import attention_rollout, rollout_to_grid

        layout = rec.layout(kind)
        n_layers, _ = rec.stack_shape(kind)
        maps = np.stack([rec.attention_heads(sample, layer, kind=kind) for layer in range(n_layers)])
        return rollout_to_grid(attention_rollout(maps), n_prefix=layout.n_prefix, grid=layout.grid)

    return lru(rec, f"rollout/{kind}", sample, make, maxsize=16), "rollout (computed)"


def attribution_panels(rec: Recording, sample: int, kind: str | None = None,
                       methods: Sequence[str] | None = None) -> go.Figure:
    """Rollout and the stored attributions as overlays, beside the input with its object mask."""
    kind = kind or explorer_kind(rec)
    layout = rec.layout(kind)
    panels: list[tuple[str, np.ndarray]] = []
    try:
        grid, name = _rollout_grid(rec, sample, kind)
        panels.append((name, grid))
    except RecordingError:  # --store rows|summary without a stored rollout: no maps to compute it from
        panels.append((f"rollout not stored (--store {rec.store})", np.zeros(layout.grid)))
    except Exception as e:  # noqa: BLE001 - a rollout problem must not hide the stored attributions
        panels.append((f"rollout unavailable ({type(e).__name__})", np.zeros(layout.grid)))
    for m in methods if methods is not None else rec.attribution_methods():
        if m != "rollout":
            panels.append((m, rec.attribution(sample, m)))
    mask = rec.mask(sample)
    image_size = layout.image_size or (layout.grid[0] * layout.patch_size[0], layout.grid[1] * layout.patch_size[1])
    return fig_attribution_panels(_thumb(rec, sample), panels, image_size=image_size, mask=mask,
                                  title=f"Attributions, sample {sample} (each scaled to its max |value|)")


def token_matrix(rec: Recording, sample: int, layer: int, head: int, kind: str | None = None) -> go.Figure:
    """The raw query x key matrix of one head."""
    kind = kind or explorer_kind(rec) or rec.main_kind
    problem = rows_refusal(rec, "the raw attention matrix")
    if problem:
        return fig_message(problem)
    layout = rec.layout(kind)
    positions, m = rec.attention_rows(sample, layer, head, kind=kind)
    labels = token_labels(m.shape[1], layout.n_prefix, layout.prefix_names, layout.grid)
    partial = rec.store == STORE_ROWS
    what = f"the {m.shape[0]} stored query rows (--store rows)" if partial else f"{m.shape[0]} queries"
    return fig_token_matrix(m, labels=labels, query_labels=[labels[int(p)] for p in positions] if partial else None,
                            title=f"Raw attention, L{layer} H{head}, sample {sample} ({what} x {m.shape[1]} keys)")


# -- overview -------------------------------------------------------------------------------------

def model_card(rec: Recording) -> list[tuple[str, str]]:
    """(key, value) rows: family, model, heads, samples, accuracy, classes, stored results."""
    acc = rec.accuracy
    n_classes = len(rec.class_names())
    rows = [
        ("model", rec.model_name),
        ("class", rec.model_class or "—"),
        ("family", rec.family),
        ("layers × heads", f"{rec.n_layers} × {rec.n_heads}"),
    ]
    for kind in rec.kinds():
        lay = rec.layout(kind)
        shape = rec.stack_shape(kind)
        extra = f", {lay.grid[0]}×{lay.grid[1]} patches of {lay.patch_size[0]}×{lay.patch_size[1]} px" if lay.grid else ""
        pre = f", prefix: {', '.join(lay.prefix_names)}" if lay.n_prefix else ""
        rows.append((f"attention '{kind}'", f"{shape[0]} × {shape[1]}{extra}{pre}"))
    rows.append(("stored", store_text(rec)))
    rows += [
        ("samples", f"{rec.n_samples}" + ("" if rec.complete else f" of {rec.n_planned} (incomplete)")),
        ("accuracy", _accuracy_text(rec, acc)),
        ("classes", (f"{n_classes}: " + ", ".join(rec.class_names()[:12]) + (" …" if n_classes > 12 else ""))
         if n_classes else "none"),
        ("attributions", ", ".join(rec.attribution_methods()) or "none"),
        ("head metrics", ", ".join(rec.head_metrics()) or "none (run `attnviz analyze`)"),
        ("recorded", rec.created),
    ]
    return rows


def store_text(rec: Recording) -> str:
    """What the recording keeps of the maps (``attnviz extract --store``), in words."""
    if rec.store == STORE_ROWS:
        n = len(rec.row_positions(0)) if rec.n_samples else 0
        return (f"query rows only (--store rows): {n} per image (prefix rows + sampled patches); views that need "
                "whole maps say so")
    if rec.store != STORE_FULL:
        return "per-head summaries only (--store summary): no attention maps; views that need them say so"
    return "every attention map"


def _accuracy_text(rec: Recording, acc: float | None) -> str:
    if rec.family == "s2t":
        return "none: a speech model writes text; its word error rate is on the Speech page"
    if not rec.has_predictions and rec.n_samples:
        out = rec.extraction_params.get("output", "")
        return "none: the model has no classification head" + (f" (its output: the pooled embedding, {out})"
                                                                  if out and out != "logits" else "")
    if acc is None:
        return "—"
    return f"{acc:.1%}" + ("" if rec.target_source == "label" else " (vs. predictions)")


def filter_samples(rec: Recording, classes: Sequence[int] | None = None, correctness: str = "all") -> np.ndarray:
    """Sample indices whose label (prediction where unlabelled) is in ``classes`` (None: any) and
    whose correctness is ``"all"``, ``"correct"`` or ``"incorrect"`` (unlabelled: neither)."""
    labels, preds = rec.labels(), rec.predictions()
    keep = np.ones(rec.n_samples, bool)
    if classes:
        cls = np.where(labels >= 0, labels, preds)
        keep &= np.isin(cls, np.asarray(list(classes), dtype=cls.dtype))
    if correctness == "correct":
        keep &= (labels >= 0) & (labels == preds)
    elif correctness == "incorrect":
        keep &= (labels >= 0) & (labels != preds)
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class ThumbPage:
    figure: go.Figure
    n_matching: int
    n_pages: int
    page: int


def _colours(rec: Recording, idx: np.ndarray, colour_by: str) -> tuple[list[str], list[tuple[str, str]]]:
    labels, preds, names = rec.labels()[idx], rec.predictions()[idx], rec.class_names()
    if colour_by == "correctness":
        cols = [UNKNOWN if l < 0 else (CORRECT if l == p else WRONG) for l, p in zip(labels, preds)]
        legend = [("correct", CORRECT), ("incorrect", WRONG)] + ([("no label", UNKNOWN)] if (labels < 0).any() else [])
        return cols, legend
    vals = labels if colour_by == "label" else preds
    cols = [class_colour(int(v)) for v in vals]
    present = sorted({int(v) for v in vals})
    legend = [(names[v] if 0 <= v < len(names) else "no label", class_colour(v)) for v in present[:12]]
    return cols, legend


def thumbnail_page(rec: Recording, *, colour_by: str = "correctness", classes: Sequence[int] | None = None,
                   correctness: str = "all", page: int = 0, per_page: int = 160, cols: int = 16,
                   selected: int | None = None, tile: int = 48, title: str | None = None) -> ThumbPage:
    """One page of the thumbnail grid (only that page's thumbnails are read).

    The page's mosaic is cached per recording (a few pages), so selecting another sample only
    redraws the figure around the cached image.
    """
    if not rec.has_predictions:  # a backbone without a classification head: labels are all there is
        colour_by, correctness = "label", "all"
    key = (colour_by, tuple(sorted(classes)) if classes else None, correctness, page, per_page, cols, tile)
    base = lru(rec, "thumb_page", key, lambda: _thumbnail_page(rec, colour_by, classes, correctness, page, per_page,
                                                                cols, tile), maxsize=8)
    if base.mosaic is None:
        return ThumbPage(fig_message("No sample matches the filters."), 0, 1, 0)
    fig = fig_thumbnail_mosaic(base.mosaic, base.samples, cols=base.cols, tile=tile, hover=base.hover,
                               selected=selected, legend=base.legend, title=title)
    return ThumbPage(fig, base.n_matching, base.n_pages, base.page)


@dataclass(frozen=True)
class _BasePage:
    mosaic: np.ndarray | None
    samples: list[int]
    hover: list[str]
    legend: list[tuple[str, str]]
    cols: int
    n_matching: int
    n_pages: int
    page: int


def _thumbnail_page(rec: Recording, colour_by: str, classes: Sequence[int] | None, correctness: str, page: int,
                    per_page: int, cols: int, tile: int) -> _BasePage:
    idx = filter_samples(rec, classes, correctness)
    n_pages = max(1, math.ceil(len(idx) / per_page))
    page = min(max(page, 0), n_pages - 1)
    shown = [int(s) for s in idx[page * per_page : (page + 1) * per_page]]
    if not shown:
        return _BasePage(None, [], [], [], cols, 0, 1, 0)
    thumbs = np.stack([rec.thumbnail(s) for s in shown])
    colours, legend = _colours(rec, np.asarray(shown), colour_by)
    names, ids = rec.class_names(), rec.sample_ids()

    def cname(c: int) -> str:
        return names[c] if 0 <= c < len(names) else "—"

    hover = [f"#{s} {ids[s]}<br>label: {cname(int(rec.labels()[s]))}<br>prediction: {cname(int(rec.predictions()[s]))}"
             for s in shown]
    cols = max(1, min(cols, len(shown)))
    mosaic = tile_mosaic(thumbs, colours, cols=cols, tile=tile)
    return _BasePage(mosaic, shown, hover, legend, cols, int(len(idx)), n_pages, page)
