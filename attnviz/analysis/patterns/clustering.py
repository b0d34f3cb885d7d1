"""Steps 5 and 7: clusters of the latent codes, and per-head pattern mixes and their ordering."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Clustering", "cluster_latents", "nearest_to_centroids", "head_mixes", "order_heads"]

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
