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
3. **Autoencoder** (:mod:`attnviz.analysis.patterns.autoencoder`, torch): a small convolutional network with a
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

Where each step lives (one file per step; importing the package imports neither torch nor umap):

    params.py          PatternParams (the cache key), ANALYSIS_NAME, ALGORITHM_VERSION
    centring.py        step 1: query-centred maps, validity masks, peak scaling
    sampling.py        step 2: the stratified sample, reading the maps by streaming
    autoencoder.py     step 3: the convolutional autoencoder (torch; imported only to train)
    reconstruction.py  step 8: masked reconstruction error and the mean-map baseline
    clustering.py      steps 5 and 7: KMeans/HDBSCAN of the codes, per-head mixes and their order
    prototypes.py      step 6: readable facts about a cluster's prototype
    atlas.py           the whole pipeline with UMAP (step 4), the cache, loading, reading maps in full,
                       ``attnviz analyze --patterns``
    __main__.py        ``python -m attnviz.analysis.patterns FILE`` (the dashboard's compute button)
"""

from __future__ import annotations

from attnviz.analysis.patterns.atlas import (
    MapDetail,
    PatternAtlas,
    analyze_step,
    compute_patterns,
    load_atlas,
    map_detail,
)
from attnviz.analysis.patterns.centring import centred_masks, mask_table, normalise, query_centre, query_uncentre
from attnviz.analysis.patterns.clustering import (
    Clustering,
    cluster_latents,
    head_mixes,
    nearest_to_centroids,
    order_heads,
)
from attnviz.analysis.patterns.params import ALGORITHM_VERSION, ANALYSIS_NAME, PatternParams, Progress
from attnviz.analysis.patterns.prototypes import describe_prototype
from attnviz.analysis.patterns.reconstruction import masked_errors, mean_map_error
from attnviz.analysis.patterns.sampling import MapSample, collect_maps, pattern_kind, stratified_sample

__all__ = [
    "ANALYSIS_NAME",
    "ALGORITHM_VERSION",
    "PatternParams",
    "PatternAtlas",
    "MapDetail",
    "Progress",
    "query_centre",
    "query_uncentre",
    "centred_masks",
    "mask_table",
    "stratified_sample",
    "MapSample",
    "collect_maps",
    "normalise",
    "masked_errors",
    "mean_map_error",
    "Clustering",
    "cluster_latents",
    "head_mixes",
    "order_heads",
    "nearest_to_centroids",
    "pattern_kind",
    "compute_patterns",
    "load_atlas",
    "map_detail",
    "describe_prototype",
    "analyze_step",
]
