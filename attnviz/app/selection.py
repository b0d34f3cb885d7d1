"""The shared selection: which file, sample, layer, head and query position is selected.

It lives in one ``dcc.Store`` (id :data:`attnviz.app.ids.SELECTION`) in the top layout, so it
survives page changes and every page reads the same one. Its data is a plain dict::

    {"file": "run.h5", "sample": 0, "layer": 0, "head": 0, "query": None}

``file`` is a registry key (see :mod:`attnviz.app.registry`), ``query`` a token position in the
model's sequence order (CLS = 0 for a ViT) or None (pages pick a default, e.g. the centre patch).

Reading (in a callback with ``Input(ids.SELECTION, "data")``)::

    sel, rec, problem = resolve(data)      # validated and clamped to the recording
    if problem: return fig_message(problem)

Writing from any page (several callbacks write the store, hence ``allow_duplicate=True``)::

    @callback(Output(ids.SELECTION, "data", allow_duplicate=True), Input(..., "clickData"),
              prevent_initial_call=True)
    def pick(click):
        return patch(layer=2, head=5)      # a dash.Patch: changes only these keys
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from attnviz.errors import AttnvizError
from attnviz.store.reader import Recording

__all__ = ["Selection", "initial_selection", "resolve", "patch", "out_of_range"]

KEYS = ("file", "sample", "layer", "head", "query")


@dataclass(frozen=True)
class Selection:
    """The selection as typed values; ``from_store`` never raises on malformed data."""

    file: str | None = None
    sample: int = 0
    layer: int = 0
    head: int = 0
    query: int | None = None

    @classmethod
    def from_store(cls, data: Any) -> Selection:
        d = data if isinstance(data, dict) else {}
        f = d.get("file")
        return cls(file=f if isinstance(f, str) else None, sample=_int(d.get("sample"), 0),
                   layer=_int(d.get("layer"), 0), head=_int(d.get("head"), 0), query=_int(d.get("query"), None))

    def to_store(self) -> dict[str, Any]:
        return asdict(self)

    def clamp(self, rec: Recording, kind: str | None = None) -> Selection:
        """The same selection with sample/layer/head/query inside the recording's ranges."""
        n_layers, n_heads = rec.stack_shape(kind)
        sample = min(max(self.sample, 0), max(rec.n_samples - 1, 0))
        query = self.query
        if query is not None and rec.n_samples:
            q_len = rec.lengths(sample, kind)[0]
            query = query if 0 <= query < q_len else None
        return replace(self, sample=sample, layer=min(max(self.layer, 0), n_layers - 1),
                       head=min(max(self.head, 0), n_heads - 1), query=query)


def _int(v: Any, default: int | None) -> int | None:
    if isinstance(v, bool):
        return default
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return default
    return default


def initial_selection(file_key: str | None) -> dict[str, Any]:
    return Selection(file=file_key).to_store()


def resolve(data: Any, kind: str | None = None) -> tuple[Selection, Recording | None, str | None]:
    """Parse the store, open its file and clamp the indices.

    Returns:
        ``(selection, recording, None)``, or ``(selection, None, message)`` when nothing can be
        shown (no file, unknown file, unreadable file, no samples yet); ``message`` is one line
        for the page.
    """
    from attnviz.app.registry import get_recording

    sel = Selection.from_store(data)
    if sel.file is None:
        return sel, None, "No recording selected."
    try:
        rec = get_recording(sel.file)
        if rec.n_samples == 0:
            return sel, None, f"{sel.file}: no samples written yet."
        if kind is not None and kind not in rec.kinds():
            return sel, None, f"{sel.file}: this {rec.family} recording has no {kind!r} attention."
        problem = out_of_range(sel, rec)
        if problem:
            return sel, None, problem
        return sel.clamp(rec, kind), rec, None
    except AttnvizError as e:
        return sel, None, str(e)
    except OSError as e:
        return sel, None, f"{sel.file}: cannot be read ({e})"


def out_of_range(sel: Selection, rec: Recording) -> str | None:
    """A message when the selection names a sample, layer, head or query the recording does not have at all.

    Within the recording, a layer or head beyond the stack a page shows (a Whisper decoder vs its encoder,
    a LLaVA language model vs its vision tower) is brought to the nearest one (:meth:`Selection.clamp`);
    a value beyond every stack, or a sample or query that does not exist, can only come from a stale or
    crafted request, and is said so instead of being guessed."""
    if not 0 <= sel.sample < rec.n_samples:
        return f"{sel.file}: sample {sel.sample} is out of range; this recording has samples 0..{rec.n_samples - 1}."
    shapes = [rec.stack_shape(k) for k in rec.kinds()]
    max_layers, max_heads = max(s[0] for s in shapes), max(s[1] for s in shapes)
    if not 0 <= sel.layer < max_layers:
        return f"{sel.file}: layer {sel.layer} is out of range; its stacks have layers 0..{max_layers - 1}."
    if not 0 <= sel.head < max_heads:
        return f"{sel.file}: head {sel.head} is out of range; its stacks have heads 0..{max_heads - 1}."
    if sel.query is not None:
        longest = max(rec.lengths(sel.sample, k)[0] for k in rec.kinds())
        if not 0 <= sel.query < longest:
            return f"{sel.file}: query position {sel.query} is out of range for sample {sel.sample} (0..{longest - 1})."
    return None


def patch(**changes: Any):
    """A ``dash.Patch`` of the selection store that sets only ``changes`` (keys of :data:`KEYS`)."""
    from dash import Patch

    unknown = set(changes) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown selection key(s) {sorted(unknown)}; the store has {KEYS}")
    p = Patch()
    for k, v in changes.items():
        p[k] = None if v is None else (v if k == "file" else int(v))
    return p
