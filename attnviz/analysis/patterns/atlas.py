"""The whole atlas: compute (read, train, encode, UMAP, cluster, summarise), cache, load it, and read its maps
in full (:func:`map_detail`)."""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnviz.analysis.patterns.centring import mask_table, normalise, query_centre
from attnviz.analysis.patterns.clustering import cluster_latents, head_mixes, nearest_to_centroids, order_heads
from attnviz.analysis.patterns.params import ALGORITHM_VERSION, ANALYSIS_NAME, PatternParams, Progress
from attnviz.analysis.patterns.prototypes import describe_prototype
from attnviz.analysis.patterns.reconstruction import masked_errors, mean_map_error
from attnviz.analysis.patterns.sampling import collect_maps, pattern_kind, stratified_sample
from attnviz.analysis.threads import default_threads
from attnviz.errors import InputError
from attnviz.store.reader import store_refusal

__all__ = ["PatternAtlas", "MapDetail", "compute_patterns", "load_atlas", "map_detail", "analyze_step"]

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
        problem = store_refusal(rec, "the pattern atlas")
        if problem:
            from attnviz.errors import RecordingError

            raise RecordingError(f"{path}: {problem}")
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
    from attnviz.analysis.patterns import autoencoder as ae

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
        baseline = mean_map_error(values, prefix, masks, sel.query)

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
    import attnviz

    with attnviz.open(path) as rec:
        problem = store_refusal(rec, "the pattern atlas")
    if problem:
        return [f"pattern atlas skipped: {problem}"]
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
