"""Step 2: which maps enter the atlas (a stratified sample) and reading them by streaming (numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from attnviz.analysis.patterns.centring import normalise, query_centre
from attnviz.errors import InputError

__all__ = ["MapSample", "stratified_sample", "pattern_kind", "collect_maps"]

@dataclass(frozen=True)
class MapSample:
    """Which maps are in the atlas, sorted by sample: int arrays ``[n]`` each.

    ``query`` is the query *patch* (row-major on the grid, prefix tokens not counted).
    """

    sample: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    query: np.ndarray

    def __len__(self) -> int:
        return len(self.sample)


def stratified_sample(n_samples: int, n_layers: int, n_heads: int, n_queries: int, max_maps: int,
                      seed: int = 0) -> MapSample:
    """A stratified sample of (sample, layer, head, query) maps.

    All ``n_samples * n_layers * n_heads * n_queries`` maps when they are at most ``max_maps``.
    Otherwise exactly ``max_maps``: each head gets ``max_maps / (L*H)`` maps (+-1); the slots are dealt
    to the images cyclically over one random permutation of the images, so each head's maps cover its
    images evenly and each image gets ``max_maps / n_samples`` maps (+-1); a head that visits an image
    several times takes distinct query patches.

    Returns:
        :class:`MapSample` sorted by (sample, layer, head, query).
    """
    rng = np.random.default_rng(seed)
    n_head_total = n_layers * n_heads
    total = n_samples * n_head_total * n_queries
    if total <= max_maps:
        s, j, q = np.meshgrid(np.arange(n_samples), np.arange(n_head_total), np.arange(n_queries), indexing="ij")
        s, j, q = s.ravel(), j.ravel(), q.ravel()
    else:
        per_head = np.full(n_head_total, max_maps // n_head_total, np.int64)
        per_head[rng.choice(n_head_total, max_maps % n_head_total, replace=False)] += 1
        images = rng.permutation(n_samples)
        j = np.repeat(np.arange(n_head_total), per_head)
        starts = np.concatenate([[0], np.cumsum(per_head)[:-1]])
        t = np.arange(max_maps) - starts[j]                # slot within the head
        s = images[(starts[j] + t) % n_samples]
        visit = t // n_samples                             # how many times this head saw this image before
        # distinct queries per (head, image): a random permutation per head, offset per image
        sigma = np.argsort(rng.random((n_head_total, n_queries)), axis=1)
        a = rng.integers(1, 1 << 30, n_head_total)
        b = rng.integers(0, 1 << 30, n_head_total)
        offset = (a[j] * s + b[j]) % n_queries
        q = sigma[j, (offset + visit) % n_queries]
    layer, head = np.divmod(j, n_heads)
    order = np.lexsort((q, head, layer, s))
    return MapSample(sample=s[order].astype(np.int64), layer=layer[order].astype(np.int64),
                     head=head[order].astype(np.int64), query=q[order].astype(np.int64))


def pattern_kind(rec: Any, kind: str | None) -> str:
    """The attention kind to analyse: ``kind`` checked, or the first kind whose tokens form a patch grid."""
    if kind is not None:
        if kind not in rec.kinds():
            raise InputError(f"this {rec.family} recording has no {kind!r} attention; it has: {', '.join(rec.kinds())}")
        if rec.layout(kind).grid is None:
            raise InputError(f"the {kind!r} attention of this recording is not over an image patch grid; "
                             "the pattern atlas needs one")
        return kind
    for k in rec.kinds():
        if rec.layout(k).grid is not None:
            return k
    raise InputError(f"this {rec.family} recording has no attention over an image patch grid; "
                     "the pattern atlas needs one")


def collect_maps(rec: Any, selection: MapSample, kind: str, mode: str = "centred", scale: str = "peak",
                 progress: Callable[[float], None] | None = None,
                 batch_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Read the selected maps by streaming over the recording, one batch of samples at a time.

    Args:
        rec: an open :class:`~attnviz.store.reader.Recording`.
        selection: which maps (sorted by sample, as :func:`stratified_sample` returns them).
        kind: attention kind (over a patch grid).
        mode, scale: see :class:`PatternParams`.
        progress: called with the fraction of samples read.
        batch_bytes: about how many bytes of maps to hold at once.

    Returns:
        (values float32 ``[n, H, W]`` — query-centred ``(2gh-1, 2gw-1)`` or absolute ``(gh, gw)``,
        0 at invalid positions, scaled —, prefix float32 ``[n]``: the scaled attention mass on prefix tokens).
    """
    layout = rec.layout(kind)
    gh, gw = layout.grid
    n_prefix = layout.n_prefix
    n_patch = gh * gw
    shape = (2 * gh - 1, 2 * gw - 1) if mode == "centred" else (gh, gw)
    n = len(selection)
    values = np.zeros((n, *shape), np.float32)
    prefix = np.zeros(n, np.float32)
    samples = np.unique(selection.sample)
    n_layers, n_heads = rec.stack_shape(kind)
    t = n_prefix + n_patch
    per_sample = n_layers * n_heads * t * t * 2
    batch = int(max(1, min(256, batch_bytes // max(per_sample, 1))))
    done = 0
    for idx, maps in rec.iter_attention(kind, samples=samples, batch_size=batch):
        lo = np.searchsorted(selection.sample, idx[0], "left")
        hi = np.searchsorted(selection.sample, idx[-1], "right")
        where = np.searchsorted(idx, selection.sample[lo:hi])
        rows = maps[where, selection.layer[lo:hi], selection.head[lo:hi], n_prefix + selection.query[lo:hi], :t]
        rows = rows.astype(np.float32)
        prefix[lo:hi] = rows[:, :n_prefix].sum(1)
        grid_maps = rows[:, n_prefix:].reshape(-1, gh, gw)
        values[lo:hi] = query_centre(grid_maps, selection.query[lo:hi], (gh, gw)) if mode == "centred" else grid_maps
        done += len(idx)
        if progress is not None:
            progress(done / len(samples))
    normalise(values, prefix, scale)
    return values, prefix
