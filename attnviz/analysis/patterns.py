"""The attention pattern atlas: every pattern the heads learned, summarised (numpy side).

Method (after Li et al. 2023, the seed system, which uses "an autoencoder-based learning solution" to
"summarize all possible attention patterns that individual heads could learn"):

1. **Inputs.** For a query patch at grid position ``(qy, qx)``, its attention row over the patch keys,
   reshaped to the grid ``[gh, gw]``, is re-centred on the query: the *query-centred map*
   ``C`` of shape ``(2*gh - 1, 2*gw - 1)`` with ``C[gh-1+dy, gw-1+dx] = A[qy+dy, qx+dx]``, so "attends to
   its left neighbour" looks the same wherever the query is. Offsets that fall outside the image for
   that query are invalid (a validity mask, 0 in the map). The attention mass on prefix tokens
   (CLS, registers) is kept as one extra value. ``mode="absolute"`` uses the ``[gh, gw]`` map as is.
   ``scale="peak"`` divides map and prefix mass by their largest value (the peak is 1, so patterns
   of grids of any size and of any sharpness share one scale); ``scale="none"`` keeps probabilities.
2. **Sample.** A stratified sample of (layer, head, image, query) up to ``max_maps``: every head gets
   the same number of maps (+-1), the images are dealt to the heads cyclically so every image gets the
   same number (+-1), and each (head, image) pair takes distinct query positions.
   Maps are read by streaming over :meth:`Recording.iter_attention`, one batch of samples at a time.
3. **Autoencoder** (:mod:`attnviz.analysis.autoencoder`, torch): a small convolutional network with a
   ``latent``-dimensional code, trained with the masked reconstruction loss, early stopping, fixed seed.
4. **UMAP** (McInnes, Healy & Melville 2018) of the latent codes to 2-D, for display.
5. **Clusters** of the latent codes: KMeans with K chosen by the mean silhouette
   ``s(i) = (b(i) - a(i)) / max(a(i), b(i))`` (Rousseeuw 1987; ``a``: mean distance to the own cluster,
   ``b``: to the nearest other cluster) over ``k_range``, or a given K, or HDBSCAN (Campello, Moulavi &
   Sander 2013; label -1 = noise). Clusters are numbered by size, largest first.
6. **Per cluster**: the prototype (the decoder applied to the centroid of the cluster's codes) and
   the ``n_nearest`` real maps whose codes are nearest the centroid.
7. **Per head**: its pattern mix ``mix[l, h, k]`` = fraction of the head's maps in cluster k; heads
   ordered by average-linkage hierarchical clustering of their mixes under the Hellinger distance
   ``H(p, q) = ||sqrt(p) - sqrt(q)||_2 / sqrt(2)`` with optimal leaf ordering (Bar-Joseph et al. 2001).
8. **Reconstruction error**: the masked mean squared error per map,
   ``(sum_valid (r - x)^2 + (r_prefix - x_prefix)^2) / (n_valid + 1)``, and its mean per head and overall.

Everything is cached in the recording at ``analyses/patterns`` with the parameters that made it
(:mod:`attnviz.store.cache`); the dashboard reads the cache with :func:`load_atlas` and never trains.
Importing this module imports neither torch nor umap.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from attnviz.errors import InputError

__all__ = [
    "ANALYSIS_NAME",
    "ALGORITHM_VERSION",
    "PatternParams",
    "PatternAtlas",
    "MapDetail",
    "query_centre",
    "query_uncentre",
    "centred_masks",
    "stratified_sample",
    "MapSample",
    "collect_maps",
    "normalise",
    "masked_errors",
    "cluster_latents",
    "head_mixes",
    "order_heads",
    "nearest_to_centroids",
    "pattern_kind",
    "compute_patterns",
    "load_atlas",
    "map_detail",
    "describe_prototype",
    "default_threads",
    "analyze_step",
]

ANALYSIS_NAME = "patterns"
# Bump when the computation changes so that caches made by an older attnviz are recomputed.
ALGORITHM_VERSION = 1

Progress = Callable[[str, float, str], None]
"""progress(stage, fraction_done, message); stages: maps, autoencoder, umap, clusters, save."""


@dataclass(frozen=True)
class PatternParams:
    """Parameters of the pattern atlas (all of them are the cache key, plus the recording's size).

    Attributes:
        kind: attention kind to analyse; None: the first kind over a patch grid (ViT: "self",
            LVLM: "vision").
        mode: "centred" (query-centred ``(2gh-1, 2gw-1)`` maps with a validity mask) or "absolute"
            (the ``(gh, gw)`` map as the model computed it).
        scale: "peak" (divide each map and its prefix mass by their maximum) or "none" (probabilities).
        max_maps: size of the stratified sample of (layer, head, image, query) maps.
        latent: size of the autoencoder's code.
        channels: channels of the two convolution layers.
        train_maps: the autoencoder trains on a random subset of at most this many maps (all maps
            are encoded); tens of thousands of small maps teach a network this size nothing more.
        epochs / patience: at most ``epochs``; stop after ``patience`` epochs without improvement.
        batch_size / lr: Adam minibatch and learning rate.
        clusters: "auto" (K by silhouette over ``k_range``) or a number K (KMeans); ignored by HDBSCAN.
        k_range: (smallest, largest) K tried by "auto", inclusive.
        method: "kmeans" or "hdbscan".
        min_cluster_size: HDBSCAN's smallest cluster; None: max(5, 1% of the maps).
        umap_neighbors / umap_min_dist: UMAP's ``n_neighbors`` and ``min_dist``.
        n_nearest: real maps kept per cluster (nearest its centroid).
        seed: seeds the sample, the network, KMeans and UMAP.
    """

    kind: str | None = None
    mode: str = "centred"
    scale: str = "peak"
    max_maps: int = 50_000
    latent: int = 16
    channels: tuple[int, int] = (8, 16)
    train_maps: int = 20_000
    epochs: int = 30
    patience: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    clusters: str | int = "auto"
    k_range: tuple[int, int] = (2, 12)
    method: str = "kmeans"
    min_cluster_size: int | None = None
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    n_nearest: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("centred", "absolute"):
            raise InputError(f"pattern mode must be 'centred' or 'absolute', not {self.mode!r}")
        if self.scale not in ("peak", "none"):
            raise InputError(f"pattern scale must be 'peak' or 'none', not {self.scale!r}")
        if self.method not in ("kmeans", "hdbscan"):
            raise InputError(f"clustering method must be 'kmeans' or 'hdbscan', not {self.method!r}")
        if isinstance(self.clusters, str) and self.clusters != "auto":
            try:
                object.__setattr__(self, "clusters", int(self.clusters))
            except ValueError:
                raise InputError(f"--clusters must be 'auto' or a number, not {self.clusters!r}") from None
        if isinstance(self.clusters, int) and self.clusters < 2:
            raise InputError(f"--clusters must be at least 2, not {self.clusters}")
        lo, hi = self.k_range
        if not 2 <= lo <= hi:
            raise InputError(f"k_range must be 2 <= low <= high, not {self.k_range}")
        if self.max_maps < 20:
            raise InputError(f"--max-maps must be at least 20, not {self.max_maps}")
        if self.train_maps < 20:
            raise InputError(f"train_maps must be at least 20, not {self.train_maps}")
        if not 1 <= self.latent <= 512:
            raise InputError(f"--latent must be between 1 and 512, not {self.latent}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "k_range", (int(lo), int(hi)))

    def cache_key(self, kind: str, n_samples: int) -> dict[str, Any]:
        """What the cached result depends on: these parameters, the resolved kind, the recording's size."""
        d = asdict(self)
        d.update(kind=kind, n_samples=int(n_samples), algorithm=ALGORITHM_VERSION)
        d["channels"] = list(self.channels)
        d["k_range"] = list(self.k_range)
        return d


# -- query-centring ------------------------------------------------------------------------


def query_centre(maps: np.ndarray, query: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Re-centre attention maps on their query patch.

    Args:
        maps: float ``[n, gh, gw]``: each row's attention over the patch keys, on the grid.
        query: int ``[n]``: the query patch, row-major index ``qy * gw + qx`` (prefix tokens not counted).
        grid: (gh, gw).

    Returns:
        float ``[n, 2*gh - 1, 2*gw - 1]`` with ``out[i, gh-1+dy, gw-1+dx] = maps[i, qy+dy, qx+dx]``;
        0 where ``(qy+dy, qx+dx)`` lies outside the grid (see :func:`centred_masks`).
    """
    gh, gw = grid
    maps = np.asarray(maps)
    n = len(maps)
    qy, qx = np.divmod(np.asarray(query, np.int64), gw)
    out = np.zeros((n, 2 * gh - 1, 2 * gw - 1), maps.dtype)
    rows = (gh - 1 - qy)[:, None] + np.arange(gh)[None, :]
    cols = (gw - 1 - qx)[:, None] + np.arange(gw)[None, :]
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = maps
    return out


def query_uncentre(centred: np.ndarray, query: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`query_centre`: ``[n, 2gh-1, 2gw-1]`` -> ``[n, gh, gw]`` (valid part only)."""
    gh, gw = grid
    centred = np.asarray(centred)
    n = len(centred)
    qy, qx = np.divmod(np.asarray(query, np.int64), gw)
    rows = (gh - 1 - qy)[:, None] + np.arange(gh)[None, :]
    cols = (gw - 1 - qx)[:, None] + np.arange(gw)[None, :]
    return centred[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def centred_masks(grid: tuple[int, int]) -> np.ndarray:
    """Validity masks of query-centred maps: float32 ``[gh*gw, 2gh-1, 2gw-1]``, row q for query patch q."""
    gh, gw = grid
    q = np.arange(gh * gw)
    return query_centre(np.ones((gh * gw, gh, gw), np.float32), q, grid)


def mask_table(grid: tuple[int, int], mode: str) -> np.ndarray:
    """``[gh*gw, H, W]`` validity masks of the model inputs of ``mode`` (all ones for absolute maps)."""
    if mode == "centred":
        return centred_masks(grid)
    return np.ones((grid[0] * grid[1], *grid), np.float32)


def normalise(values: np.ndarray, prefix: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale maps ``[n, ...]`` and prefix masses ``[n]`` (in place for float32 input).

    ``"peak"``: divide both by ``max(max(map), prefix)`` (maps that are all zero stay zero);
    ``"none"``: unchanged.
    """
    if scale == "none":
        return values, prefix
    peak = np.maximum(values.reshape(len(values), -1).max(1, initial=0.0), prefix)
    peak = np.where(peak > 0, peak, 1.0).astype(values.dtype)
    values /= peak.reshape(-1, *([1] * (values.ndim - 1)))
    prefix /= peak
    return values, prefix


# -- sampling and reading ------------------------------------------------------------------


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


def masked_errors(values: np.ndarray, prefix: np.ndarray, recon: np.ndarray, recon_prefix: np.ndarray,
                  masks: np.ndarray, mask_index: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Per-map masked mean squared error float32 ``[n]``:
    ``(sum_valid (recon - values)^2 + (recon_prefix - prefix)^2) / (n_valid + 1)``.

    Args:
        values, recon: ``[n, H, W]``; prefix, recon_prefix: ``[n]``; masks: ``[n_queries, H, W]``;
        mask_index: int ``[n]`` (each map's row of ``masks``).
    """
    out = np.empty(len(values), np.float32)
    for i in range(0, len(values), chunk):
        sl = slice(i, i + chunk)
        m = masks[mask_index[sl]]
        d = (recon[sl].astype(np.float32) - values[sl]) ** 2 * m
        se = d.reshape(len(d), -1).sum(1) + (recon_prefix[sl] - prefix[sl]) ** 2
        out[sl] = se / (m.reshape(len(m), -1).sum(1) + 1.0)
    return out


# -- clustering and per-head summaries -----------------------------------------------------


@dataclass
class Clustering:
    """Cluster labels ``[n]`` (-1: HDBSCAN noise) numbered by size, centroids ``[K, d]``, and the
    silhouette scan (``k_candidates`` ``[m]``, ``silhouette`` ``[m]``; empty when K was given)."""

    labels: np.ndarray
    centroids: np.ndarray
    k_candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    silhouette: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    chosen_by: str = "given"

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)


def cluster_latents(latent: np.ndarray, *, method: str = "kmeans", clusters: str | int = "auto",
                    k_range: tuple[int, int] = (2, 12), min_cluster_size: int | None = None, seed: int = 0,
                    silhouette_sample: int = 4000, scan_sample: int = 10000) -> Clustering:
    """Cluster latent codes ``[n, d]`` (scikit-learn).

    ``kmeans`` with ``clusters="auto"``: KMeans for every K in ``k_range`` (capped at n-1) on a random
    subsample of ``scan_sample`` codes, keeping the K with the highest mean silhouette (Rousseeuw 1987)
    on ``silhouette_sample`` of them; then KMeans with that K on all codes. With a number: KMeans with
    that K. ``hdbscan``: sklearn's HDBSCAN (Campello et al. 2013),
    noise labelled -1, centroids the mean code of each cluster. Labels are renumbered by cluster size.
    """
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.metrics import silhouette_score

    latent = np.asarray(latent, np.float32)
    n = len(latent)
    ks = np.zeros(0, np.int32)
    scores = np.zeros(0, np.float32)
    chosen_by = "given"
    if method == "hdbscan":
        mcs = min_cluster_size or max(5, n // 100)
        labels = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(latent)
        chosen_by = "hdbscan"
        if labels.max() < 0:  # all noise: one cluster, so that every view still has something to show
            labels = np.zeros(n, np.int64)
    else:
        if clusters == "auto":
            lo, hi = k_range
            hi = min(hi, n - 1)
            lo = min(lo, hi)
            ks = np.arange(lo, hi + 1, dtype=np.int32)
            rng = np.random.default_rng(seed)
            scan = latent[np.sort(rng.choice(n, scan_sample, replace=False))] if n > scan_sample else latent
            fits = []
            for k in ks:
                labels_k = KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit_predict(scan)
                s = silhouette_score(scan, labels_k, sample_size=min(len(scan), silhouette_sample),
                                     random_state=seed) if len(np.unique(labels_k)) > 1 else -1.0
                fits.append(float(s))
            scores = np.asarray(fits, np.float32)
            k_best = int(ks[int(np.argmax(scores))])
            chosen_by = "silhouette"
        else:
            k_best = min(int(clusters), n)
        km = KMeans(n_clusters=k_best, n_init=3, random_state=seed).fit(latent)
        labels = km.labels_
    labels = np.asarray(labels, np.int64)
    present = np.unique(labels[labels >= 0])
    sizes = np.array([(labels == c).sum() for c in present])
    rank = present[np.argsort(-sizes, kind="stable")]
    remap = np.full(int(labels.max()) + 2, -1, np.int64)
    remap[rank] = np.arange(len(rank))
    new = np.where(labels >= 0, remap[np.maximum(labels, 0)], -1)
    centroids = np.stack([latent[new == c].mean(0) for c in range(len(rank))]).astype(np.float32)
    return Clustering(labels=new.astype(np.int32), centroids=centroids, k_candidates=ks, silhouette=scores,
                      chosen_by=chosen_by)


def nearest_to_centroids(latent: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n_nearest: int) -> np.ndarray:
    """Indices int32 ``[K, n_nearest]`` of each cluster's members nearest its centroid (Euclidean in
    the latent space), nearest first; -1 pads clusters with fewer members."""
    out = np.full((len(centroids), n_nearest), -1, np.int32)
    for c, mu in enumerate(centroids):
        members = np.flatnonzero(labels == c)
        d = ((latent[members] - mu) ** 2).sum(1)
        take = members[np.argsort(d, kind="stable")[:n_nearest]]
        out[c, : len(take)] = take
    return out


def head_mixes(layer: np.ndarray, head: np.ndarray, labels: np.ndarray, n_layers: int, n_heads: int,
               n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Pattern mix per head.

    Returns:
        (mix float32 ``[n_layers, n_heads, n_clusters]``: fraction of the head's maps in each cluster;
        noise float32 ``[n_layers, n_heads]``: fraction labelled -1). ``mix.sum(-1) + noise == 1``
        for every head that has maps.
    """
    counts = np.zeros((n_layers, n_heads, n_clusters + 1), np.float64)
    np.add.at(counts, (layer, head, np.where(labels >= 0, labels, n_clusters)), 1.0)
    total = counts.sum(-1, keepdims=True)
    frac = counts / np.where(total > 0, total, 1.0)
    return frac[..., :n_clusters].astype(np.float32), frac[..., n_clusters].astype(np.float32)


def order_heads(mix: np.ndarray, noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical clustering of heads by their pattern mix (scipy).

    Args:
        mix: ``[n_layers, n_heads, K]``; noise: ``[n_layers, n_heads]`` (HDBSCAN) or None.

    Returns:
        (linkage float64 ``[L*H - 1, 4]`` in scipy's format over the flat head index ``l * n_heads + h``,
        leaf order int32 ``[L*H]``). Average linkage on the Hellinger distance between mixes, with optimal
        leaf ordering so that neighbours in the order are as similar as possible.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import pdist

    L, H, K = mix.shape
    feats = mix.reshape(L * H, K).astype(np.float64)
    if noise is not None:
        feats = np.concatenate([feats, noise.reshape(L * H, 1)], 1)
    if L * H < 2:
        return np.zeros((0, 4)), np.zeros(L * H, np.int32)
    d = pdist(np.sqrt(np.clip(feats, 0, None)), "euclidean") / np.sqrt(2.0)
    z = linkage(d, method="average")
    if L * H > 2:
        z = optimal_leaf_ordering(z, d)
    return z, leaves_list(z).astype(np.int32)


def describe_prototype(proto: np.ndarray, prefix: float, mode: str) -> dict[str, Any]:
    """Readable facts about a prototype map ``[H, W]``: where it peaks (offset (dy, dx) from the query
    for centred maps, grid position for absolute ones), its peak value and prefix mass, its flatness
    (mean / peak: 1 for a flat map, about 1/(H*W) for a single spot); centred mode only: its spread
    (the mean Chebyshev offset in patches, weighted by the map) and the shares of its mass in the
    peak cell, the query's row and its column (``peak_share``, ``row_share``, ``column_share``)."""
    h, w = proto.shape
    py, px = np.unravel_index(int(np.argmax(proto)), proto.shape)
    peak = float(proto[py, px])
    out: dict[str, Any] = {"peak_value": peak, "prefix": float(prefix),
                           "flatness": float(proto.mean() / peak) if peak > 0 else 1.0}
    if mode == "centred":
        cy, cx = h // 2, w // 2
        out["peak_offset"] = (int(py - cy), int(px - cx))
        yy, xx = np.mgrid[:h, :w]
        cheb = np.maximum(abs(yy - cy), abs(xx - cx))
        tot = float(proto.sum())
        out["spread"] = float((proto * cheb).sum() / tot) if tot > 0 else 0.0
        out["peak_share"] = float(peak / tot) if tot > 0 else 0.0
        out["row_share"] = float(proto[cy].sum() / tot) if tot > 0 else 0.0
        out["column_share"] = float(proto[:, cx].sum() / tot) if tot > 0 else 0.0
    else:
        out["peak_position"] = (int(py), int(px))
    return out


# -- the pipeline --------------------------------------------------------------------------


@dataclass
class PatternAtlas:
    """A computed (or cached) pattern atlas. Arrays, with N maps, K clusters, L x H heads:

    - ``sample``, ``layer``, ``head``, ``query`` int ``[N]``: which map each point is (query = patch index);
    - ``embedding`` float32 ``[N, 2]``: UMAP of the latent codes; ``latent`` float32 ``[N, d]``;
    - ``cluster`` int32 ``[N]`` (-1 = noise); ``error`` float32 ``[N]``: masked MSE of the reconstruction;
    - ``prototypes`` float32 ``[K, H, W]`` and ``prototype_prefix`` ``[K]``: decoded centroids;
      ``cluster_size`` int ``[K]``; ``nearest`` int32 ``[K, n_nearest]`` (indices into the N maps, -1 pad);
    - ``mix`` float32 ``[L, H, K]``, ``noise`` float32 ``[L, H]``, ``dominant`` int32 ``[L, H]``,
      ``head_error`` float32 ``[L, H]``;
    - ``linkage`` float64 ``[L*H-1, 4]``, ``head_order`` int32 ``[L*H]`` (flat head index l*H+h);
    - ``k_candidates``, ``silhouette`` ``[m]``; ``train_loss``, ``val_loss`` ``[epochs]``.

    ``params`` is the cache key; ``summary`` holds sizes, timings and overall errors.
    """

    params: dict[str, Any]
    summary: dict[str, Any]
    sample: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    query: np.ndarray
    embedding: np.ndarray
    latent: np.ndarray
    cluster: np.ndarray
    error: np.ndarray
    prototypes: np.ndarray
    prototype_prefix: np.ndarray
    cluster_size: np.ndarray
    nearest: np.ndarray
    mix: np.ndarray
    noise: np.ndarray
    dominant: np.ndarray
    head_error: np.ndarray
    linkage: np.ndarray
    head_order: np.ndarray
    k_candidates: np.ndarray
    silhouette: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    reused: bool = False

    @property
    def n_maps(self) -> int:
        return len(self.sample)

    @property
    def n_clusters(self) -> int:
        return len(self.prototypes)

    @property
    def kind(self) -> str:
        return str(self.params["kind"])

    @property
    def mode(self) -> str:
        return str(self.params["mode"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.summary["grid"])  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return int(self.mix.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.mix.shape[1])

    def prototype_facts(self) -> list[dict[str, Any]]:
        """:func:`describe_prototype` of every cluster, plus its size and share of the maps."""
        out = []
        for k in range(self.n_clusters):
            d = describe_prototype(self.prototypes[k], float(self.prototype_prefix[k]), self.mode)
            d.update(cluster=k, size=int(self.cluster_size[k]), share=float(self.cluster_size[k] / max(self.n_maps, 1)))
            out.append(d)
        return out


_SMALL_ARRAYS = ("sample", "layer", "head", "query", "embedding", "latent", "cluster", "error", "prototypes",
                 "prototype_prefix", "cluster_size", "nearest", "mix", "noise", "dominant", "head_error", "linkage",
                 "head_order", "k_candidates", "silhouette", "train_loss", "val_loss")


def compute_patterns(path: str | os.PathLike, params: PatternParams | None = None, *, device: str = "auto",
                     threads: int | None = None, force: bool = False, progress: Progress | None = None,
                     show_bar: bool = False) -> PatternAtlas:
    """Compute the pattern atlas of a recording and cache it in the file (or return the cached one).

    Args:
        path: a complete recording with attention over a patch grid.
        params: :class:`PatternParams` (defaults if None). The cache is reused when they (and the
            recording's size) equal the cached ones; otherwise everything is recomputed and replaced.
        device: where the autoencoder trains: "auto", "cpu", "cuda".
        threads: CPU threads for torch (default: all cores this process may use).
        force: recompute even when a matching cache exists.
        progress: ``progress(stage, fraction, message)``, for a UI.
        show_bar: tqdm progress bars on stderr (the CLI).

    Returns:
        the :class:`PatternAtlas` (``reused`` tells whether it came from the cache).
    """
    import attnviz
    from attnviz.store import schema as S
    from attnviz.store.cache import save_analysis

    params = params or PatternParams()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise InputError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {device!r}")
    report = progress or (lambda stage, frac, msg: None)
    clock = _Clock()
    with attnviz.open(path) as rec:
        kind = pattern_kind(rec, params.kind)
        key = params.cache_key(kind, rec.n_samples)
        group = rec.analysis_group(ANALYSIS_NAME)
        if not force and group is not None and group.attrs.get("params") == S.dumps(key):
            atlas = load_atlas(rec)
            if atlas is not None:
                atlas.reused = True
                report("save", 1.0, "cached result reused")
                return atlas
        if not rec.complete:
            from attnviz.errors import RecordingError

            raise RecordingError(f"{rec.path}: the recording is incomplete; finish it with `attnviz extract --resume` first")
        layout = rec.layout(kind)
        grid = tuple(int(g) for g in layout.grid)
        n_layers, n_heads = rec.stack_shape(kind)
        n_queries = grid[0] * grid[1]
        if rec.n_samples == 0:
            raise InputError(f"{rec.path}: the recording has no samples")
        sel = stratified_sample(rec.n_samples, n_layers, n_heads, n_queries, params.max_maps, params.seed)
        n_images = len(np.unique(sel.sample))
        bar = _bar(show_bar, n_images, "reading maps", "image")
        seen = [0]

        def read_progress(frac: float) -> None:
            report("maps", frac, f"read {frac:.0%} of the images")
            if bar is not None:
                n_now = int(round(frac * n_images))
                bar.update(n_now - seen[0])
                seen[0] = n_now

        with clock("read"):
            values, prefix = collect_maps(rec, sel, kind, params.mode, params.scale, progress=read_progress)
        if bar is not None:
            bar.close()
        n_prefix = layout.n_prefix
        rec_path = rec.path
    if len(values) < 20:
        raise InputError(f"{path}: only {len(values)} maps; the pattern atlas needs at least 20")
    masks = mask_table(grid, params.mode)

    # autoencoder (torch, imported only here)
    from attnviz.analysis import autoencoder as ae

    report("autoencoder", 0.0, "training the autoencoder")
    config = ae.AutoencoderConfig(height=values.shape[1], width=values.shape[2], latent=params.latent,
                                  channels=params.channels)
    n_train = min(len(values), params.train_maps)
    train = np.sort(np.random.default_rng(params.seed).choice(len(values), n_train, replace=False)) \
        if n_train < len(values) else slice(None)
    try:
        clock.start("train")
        net = ae.train_autoencoder(
            values[train], prefix[train], masks, sel.query[train], config=config, epochs=params.epochs, patience=params.patience,
            batch_size=params.batch_size, lr=params.lr, seed=params.seed, device=device, threads=threads,
            progress=lambda e, E, tl, vl: report("autoencoder", e / E, f"epoch {e}: loss {tl:.4g}, validation {vl:.4g}"),
            show_bar=show_bar)
    except RuntimeError as e:
        if "CUDA" in str(e):
            raise InputError(str(e).splitlines()[0]) from None
        raise
    clock.stop("train")
    with clock("encode"):
        latent = net.encode(values, prefix, masks, sel.query)
        recon, recon_prefix = net.decode(latent)
        error = masked_errors(values, prefix, recon, recon_prefix, masks, sel.query)
        baseline = _mean_map_error(values, prefix, masks, sel.query)

    # UMAP (imported only here; its first call compiles with numba)
    report("umap", 0.0, "UMAP of the latent codes (the first run in a process compiles it with numba: up to a minute)")
    with clock("umap"):
        embedding = _umap(latent, params)
    report("umap", 1.0, "UMAP done")

    report("clusters", 0.0, "clustering")
    clock.start("cluster")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads or default_threads()):
        cl = cluster_latents(latent, method=params.method, clusters=params.clusters, k_range=params.k_range,
                             min_cluster_size=params.min_cluster_size, seed=params.seed)
    prototypes, proto_prefix = net.decode(cl.centroids)
    nearest = nearest_to_centroids(latent, cl.labels, cl.centroids, params.n_nearest)
    sizes = np.bincount(cl.labels[cl.labels >= 0], minlength=cl.n_clusters).astype(np.int32)
    mix, noise = head_mixes(sel.layer, sel.head, cl.labels, n_layers, n_heads, cl.n_clusters)
    dominant = np.argmax(mix, -1).astype(np.int32)
    z, order = order_heads(mix, noise if params.method == "hdbscan" else None)
    head_error = _per_head_mean(error, sel.layer, sel.head, n_layers, n_heads)
    clock.stop("cluster")
    report("clusters", 1.0, f"{cl.n_clusters} clusters")

    summary = {
        "n_maps": int(len(values)), "grid": list(grid), "map_shape": list(values.shape[1:]), "n_prefix": n_prefix,
        "n_layers": n_layers, "n_heads": n_heads, "n_samples_used": int(len(np.unique(sel.sample))),
        "n_clusters": cl.n_clusters, "clusters_chosen_by": cl.chosen_by,
        "reconstruction_error": float(error.mean()), "mean_map_error": baseline,
        "explained": float(1 - error.mean() / baseline) if baseline > 0 else 1.0,
        "n_train_maps": int(n_train), "epochs_run": len(net.train_loss), "best_epoch": net.best_epoch,
        "stopped_early": net.stopped_early,
        "device": net.device, "autoencoder": config.as_dict(),
        "seconds": clock.wall, "cpu_seconds": clock.cpu,
    }
    arrays: dict[str, np.ndarray] = {
        "sample": sel.sample.astype(np.int32), "layer": sel.layer.astype(np.int16), "head": sel.head.astype(np.int16),
        "query": sel.query.astype(np.int32), "embedding": embedding.astype(np.float32), "latent": latent,
        "cluster": cl.labels, "error": error, "recon": recon.astype(np.float16),
        "recon_prefix": recon_prefix.astype(np.float16), "prototypes": prototypes,
        "prototype_prefix": proto_prefix, "cluster_size": sizes, "nearest": nearest, "mix": mix, "noise": noise,
        "dominant": dominant, "head_error": head_error, "linkage": z, "head_order": order,
        "k_candidates": cl.k_candidates, "silhouette": cl.silhouette,
        "train_loss": np.asarray(net.train_loss, np.float32), "val_loss": np.asarray(net.val_loss, np.float32),
    }
    for name, w in net.weights().items():
        arrays[f"weights/{name}"] = w
    clock.total()
    report("save", 0.0, "saving into the recording")
    save_analysis(rec_path, ANALYSIS_NAME, key, arrays, attrs={"summary": summary})
    report("save", 1.0, "saved")
    return PatternAtlas(params=key, summary=summary, reused=False,
                        **{k: arrays[k] for k in _SMALL_ARRAYS})


def load_atlas(rec: Any) -> PatternAtlas | None:
    """The cached atlas of an open recording, whatever parameters made it; None when there is none
    (or it was made by an older version of the computation). Reconstructions stay on disk
    (see :func:`map_detail`)."""
    from attnviz.store import schema as S

    g = rec.analysis_group(ANALYSIS_NAME)
    if g is None:
        return None
    params = S.loads(g.attrs.get("params"))
    if not isinstance(params, dict) or params.get("algorithm") != ALGORITHM_VERSION:
        return None
    if any(k not in g for k in _SMALL_ARRAYS):
        return None
    return _atlas_from_group(g, {k: g[k][()] for k in _SMALL_ARRAYS})


def _atlas_from_group(g: Any, arrays: dict[str, np.ndarray]) -> PatternAtlas:
    from attnviz.store import schema as S

    return PatternAtlas(params=S.loads(g.attrs["params"]), summary=S.loads(g.attrs["summary"]),
                        **{k: np.asarray(arrays[k]) for k in _SMALL_ARRAYS})


@dataclass(frozen=True)
class MapDetail:
    """Selected atlas maps in full, for display. With n maps, grid (gh, gw), model input H x W:

    - ``index`` int ``[n]`` (into the atlas), ``sample``/``layer``/``head``/``query`` int ``[n]``;
    - ``raw`` float32 ``[n, gh, gw]``: the map as the model computed it (probabilities over patches),
      ``raw_prefix`` float32 ``[n]``: its mass on prefix tokens;
    - ``inputs`` float32 ``[n, H, W]`` and ``input_prefix`` ``[n]``: what the autoencoder saw (centred, scaled);
    - ``recon`` float32 ``[n, H, W]``, ``recon_prefix`` ``[n]``: its reconstruction;
    - ``masks`` float32 ``[n, H, W]``: validity; ``error`` ``[n]``; ``cluster`` ``[n]``.
    """

    index: np.ndarray
    sample: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    query: np.ndarray
    raw: np.ndarray
    raw_prefix: np.ndarray
    inputs: np.ndarray
    input_prefix: np.ndarray
    recon: np.ndarray
    recon_prefix: np.ndarray
    masks: np.ndarray
    error: np.ndarray
    cluster: np.ndarray


def map_detail(rec: Any, atlas: PatternAtlas, indices: Any) -> MapDetail:
    """Read a few atlas maps in full: the raw map from the recording (one chunk each), the model's input
    recomputed from it, and the stored reconstruction. ``indices``: int ``[n]`` into the atlas."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    kind = atlas.kind
    layout = rec.layout(kind)
    gh, gw = layout.grid
    n_prefix = layout.n_prefix
    raw = np.zeros((len(idx), gh, gw), np.float32)
    raw_prefix = np.zeros(len(idx), np.float32)
    for i, j in enumerate(idx):
        row = rec.attention_query(int(atlas.sample[j]), int(atlas.layer[j]), n_prefix + int(atlas.query[j]),
                                  kind=kind, head=int(atlas.head[j]))
        raw_prefix[i] = row[:n_prefix].sum()
        raw[i] = row[n_prefix : n_prefix + gh * gw].reshape(gh, gw)
    q = atlas.query[idx]
    inputs = query_centre(raw, q, (gh, gw)) if atlas.mode == "centred" else raw.copy()
    input_prefix = raw_prefix.copy()
    normalise(inputs, input_prefix, atlas.params["scale"])
    g = rec.analysis_group(ANALYSIS_NAME)
    order = np.argsort(idx, kind="stable")
    recon = np.zeros_like(inputs)
    recon_prefix = np.zeros(len(idx), np.float32)
    if len(idx):
        uniq, inv = np.unique(idx[order], return_inverse=True)
        recon[order] = g["recon"][uniq][inv].astype(np.float32)
        recon_prefix[order] = g["recon_prefix"][uniq][inv].astype(np.float32)
    return MapDetail(index=idx, sample=atlas.sample[idx], layer=atlas.layer[idx], head=atlas.head[idx], query=q,
                     raw=raw, raw_prefix=raw_prefix, inputs=inputs, input_prefix=input_prefix, recon=recon,
                     recon_prefix=recon_prefix, masks=mask_table((gh, gw), atlas.mode)[q], error=atlas.error[idx],
                     cluster=atlas.cluster[idx])


# -- helpers -------------------------------------------------------------------------------


def default_threads() -> int:
    """CPU threads for training: the cores this process may use, minus those other processes keep busy
    (1-minute load average, not counting this process), at least 1. On a shared machine more threads
    than free cores make torch's OpenMP workers wait on each other (measured here: 10x slower steps)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        busy = 0.0
    return int(max(1, min(cores, round(cores - busy))))


class _Clock:
    """Wall and CPU seconds (all threads of this process) per stage; ``total()`` adds both totals."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = (time.perf_counter(), time.process_time())
        self._open: dict[str, tuple[float, float]] = {}

    def start(self, stage: str) -> None:
        self._open[stage] = (time.perf_counter(), time.process_time())

    def stop(self, stage: str) -> None:
        w, c = self._open.pop(stage)
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - w
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c

    def __call__(self, stage: str) -> "_Clock":
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self.start(self._stage)

    def __exit__(self, *exc: object) -> None:
        self.stop(self._stage)

    def total(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0[0]
        self.cpu["total"] = time.process_time() - self._t0[1]


def _umap(latent: np.ndarray, params: PatternParams) -> np.ndarray:
    import umap

    n = len(latent)
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(params.umap_neighbors, n - 1)),
                        min_dist=params.umap_min_dist, random_state=params.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", numba notices
        return np.asarray(reducer.fit_transform(latent), np.float32)


def _mean_map_error(values: np.ndarray, prefix: np.ndarray, masks: np.ndarray, mask_index: np.ndarray) -> float:
    """Error of the trivial model that predicts the mean map everywhere (a baseline for the autoencoder)."""
    m = masks[mask_index[: min(len(values), 20000)]]
    v = values[: len(m)]
    mean = (v * m).sum(0) / np.maximum(m.sum(0), 1)
    mean_prefix = np.full(len(m), prefix.mean(), np.float32)
    recon = np.broadcast_to(mean, v.shape)
    return float(masked_errors(v, prefix[: len(m)], recon, mean_prefix, masks, mask_index[: len(m)]).mean())


def _per_head_mean(x: np.ndarray, layer: np.ndarray, head: np.ndarray, n_layers: int, n_heads: int) -> np.ndarray:
    s = np.zeros((n_layers, n_heads))
    c = np.zeros((n_layers, n_heads))
    np.add.at(s, (layer, head), x)
    np.add.at(c, (layer, head), 1)
    return np.where(c > 0, s / np.maximum(c, 1), np.nan).astype(np.float32)


def _bar(show: bool, total: int, desc: str, unit: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def analyze_step(path: str | os.PathLike, *, max_maps: int = 50_000, latent: int = 16, clusters: str = "auto",
                 device: str = "auto", absolute: bool = False, show_bar: bool = True) -> list[str]:
    """The ``attnviz analyze --patterns`` step: compute (or reuse) the atlas; one line per result.

    ``clusters``: "auto" (KMeans, K by silhouette), a number K, or "hdbscan".
    """
    method = "hdbscan" if str(clusters).lower() == "hdbscan" else "kmeans"
    params = PatternParams(max_maps=max_maps, latent=latent, clusters="auto" if method == "hdbscan" else clusters,
                           method=method, mode="absolute" if absolute else "centred")
    t0 = time.perf_counter()
    atlas = compute_patterns(path, params, device=device, show_bar=show_bar)
    s = atlas.summary
    how = "cached, unchanged" if atlas.reused else (
        f"computed in {time.perf_counter() - t0:.0f} s: training {s['seconds']['train']:.0f} s "
        f"({s['epochs_run']} epochs on {s['device']}), UMAP {s['seconds']['umap']:.0f} s")
    by = {"silhouette": "K by silhouette", "given": "K given", "hdbscan": "HDBSCAN"}.get(s["clusters_chosen_by"], "")
    h, w = s["map_shape"]
    return [f"pattern atlas ({atlas.kind}, {atlas.n_maps} {atlas.mode} maps of {h}x{w}, {how}): "
            f"{atlas.n_clusters} clusters ({by}); reconstruction error {s['reconstruction_error']:.4g} "
            f"({s['explained']:.0%} of the mean-map error explained)"]


def _main(argv: list[str] | None = None) -> int:
    """``python -m attnviz.analysis.patterns FILE [--max-maps N] [--clusters auto|K|hdbscan] [--device D]``:
    compute the atlas, printing one JSON object per progress step on stdout (``{"stage", "fraction",
    "message"}``), then ``{"done": true, "reused": ..., "n_maps": ..., "n_clusters": ...}``. The dashboard's
    "compute" button runs this in a subprocess (the server itself never imports torch)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m attnviz.analysis.patterns")
    ap.add_argument("file")
    ap.add_argument("--max-maps", type=int, default=PatternParams.max_maps)
    ap.add_argument("--clusters", default="auto")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    def emit(stage: str, fraction: float, message: str) -> None:
        print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4), "message": message}), flush=True)

    method = "hdbscan" if args.clusters.lower() == "hdbscan" else "kmeans"
    try:
        params = PatternParams(max_maps=args.max_maps, method=method,
                               clusters="auto" if method == "hdbscan" else args.clusters)
        atlas = compute_patterns(args.file, params, device=args.device, progress=emit)
    except Exception as e:  # noqa: BLE001 - reported to the page as one line
        print(json.dumps({"error": str(e).splitlines()[0] if str(e) else type(e).__name__}), flush=True)
        return 2
    print(json.dumps({"done": True, "reused": atlas.reused, "n_maps": atlas.n_maps, "n_clusters": atlas.n_clusters}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
