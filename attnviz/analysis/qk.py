"""The joint query-key embedding of AttentionViz (Yeh, Chen, Wu, Chen, Viégas & Wattenberg, "AttentionViz: A
Global View of Transformer Attention", IEEE VIS 2023, arXiv:2305.03210).

For one head ``h`` of a stack, the query vectors ``q_i = W_Q,h x_i`` and key vectors ``k_j = W_K,h x_j`` of
many tokens (the outputs of the head's query and key projections, stored by ``attnviz extract
--store-qk``) are projected *together* into 2-D, so that the geometry of attention shows: the attention
logit of query i on key j is ``q_i . k_j / sqrt(d)``, and ``||q_i - k_j||^2 = ||q_i||^2 + ||k_j||^2 -
2 q_i . k_j``, so a query lies near the keys it attends to once the two sets share a centre and a scale.
Two transformations that leave every attention map unchanged give them that (AttentionViz's vector
normalisation):

1. **Scaling**: ``q' = a q``, ``k' = k / a``: every dot product ``q' . k'`` equals ``q . k``.
2. **Key translation**: ``k'' = k' - mean(k') + mean(q')``, so keys and queries share their centre. For a
   fixed query every logit moves by the same ``q'_i . (mean(q') - mean(k'))``, and a softmax is invariant
   to a constant added to all its inputs.

``a > 0`` is chosen so that afterwards both sets have the same mean norm, ``mean_i ||q'_i|| =
mean_j ||k''_j||`` (found by bisection; a root exists because the left side grows like ``a`` and the
right side like ``1/a`` near 0). Applied in the other order, translating and then scaling, the two
centres would drift apart by the factor ``a^2``; this way both properties hold at once.

The normalised vectors of both sets are then reduced to 2-D with one reducer (UMAP, McInnes et al.
2018; t-SNE, van der Maaten & Hinton 2008, scikit-learn; or PCA), so queries and keys share the plane.

Which tokens: one selection of (sample, position) pairs for every head, so that a point means the same
token in every head's plot: up to ``max_points`` tokens, spread evenly over the samples, drawn at random
among each sample's stored positions (prefix tokens included).

A check of each projection, ``neighbour_agreement[l, h]``: the fraction of the selected queries whose
nearest key in the 2-D plane, among the keys of the same image, is the key it attends to most
(largest ``q . k`` among that image's selected keys). Chance level is ``1 / keys per image``
(``chance_agreement``).

Cached at ``analyses/qk_embedding`` with its parameters. Streaming: the vectors are read one batch of
samples at a time and only the selected tokens are kept (``[layer, head, n, head_dim]``, float32).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from attnviz.errors import InputError
from attnviz.store.reader import Recording

__all__ = [
    "ANALYSIS_NAME",
    "ALGORITHM_VERSION",
    "METHODS",
    "QKParams",
    "QKEmbedding",
    "normalize_qk",
    "project_joint",
    "select_tokens",
    "nearest_key_agreement",
    "compute_qk_embedding",
    "load_qk_embedding",
    "analyze_step",
]

ANALYSIS_NAME = "qk_embedding"
ALGORITHM_VERSION = 1
METHODS = ("umap", "tsne", "pca")


@dataclass(frozen=True)
class QKParams:
    """Parameters of the joint embedding (with the recording's size, the cache key).

    Attributes:
        method: "umap", "tsne" or "pca".
        max_points: tokens per head (each gives one query and one key point).
        kind: attention kind (default: the recording's first stack that stores vectors).
        seed: seeds the token selection and the reducer.
        umap_neighbors / umap_min_dist / tsne_perplexity: the reducers' settings.
    """

    method: str = "umap"
    max_points: int = 1000
    kind: str | None = None
    seed: int = 0
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    tsne_perplexity: float = 30.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--qk-method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.max_points < 4:
            raise InputError(f"--qk-points must be at least 4, not {self.max_points}")

    def cache_key(self, kind: str, n_samples: int) -> dict[str, Any]:
        d = asdict(self)
        d.update(kind=kind, n_samples=int(n_samples), algorithm=ALGORITHM_VERSION)
        return d


def normalize_qk(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AttentionViz's normalisation (module docstring): queries scaled by ``a``, keys by ``1/a`` and then
    translated onto the queries' centre, with ``a`` such that both sets end with the same mean norm;
    every attention map is unchanged.

    Args:
        queries: float ``[n_q, head_dim]``; keys: float ``[n_k, head_dim]``.

    Returns:
        (queries, keys), float64, same shapes: equal means and equal mean norms.
    """
    q = np.asarray(queries, np.float64)
    k = np.asarray(keys, np.float64)
    q_norm = float(np.linalg.norm(q, axis=1).mean())
    q_mean = q.mean(0)
    k_centred = k - k.mean(0)

    def gap(log_a: float) -> float:  # mean ||q'|| - mean ||k''||, increasing from -inf
        a = np.exp(log_a)
        return a * q_norm - float(np.linalg.norm(k_centred / a + a * q_mean, axis=1).mean())

    if q_norm > 0 and np.abs(k_centred).max(initial=0.0) > 0 and gap(60.0) > 0:
        lo, hi = -60.0, 60.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if gap(mid) > 0:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-12:
                break
        a = float(np.exp(0.5 * (lo + hi)))
    else:  # all queries equal, or all keys equal: only the centres can be matched
        a = 1.0
    q2 = q * a
    return q2, k_centred / a + q2.mean(0)


def project_joint(queries: np.ndarray, keys: np.ndarray, method: str = "umap", *, seed: int = 0,
                  umap_neighbors: int = 15, umap_min_dist: float = 0.1,
                  tsne_perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Normalise (:func:`normalize_qk`) and reduce queries and keys together to 2-D.

    Returns:
        (query coordinates float32 ``[n_q, 2]``, key coordinates float32 ``[n_k, 2]``).
    """
    q, k = normalize_qk(queries, keys)
    x = np.concatenate([q, k]).astype(np.float32)
    n = len(x)
    if method == "pca":
        from sklearn.decomposition import PCA

        comps = min(2, x.shape[1], n)
        xy = PCA(n_components=comps, random_state=seed).fit_transform(x)
        if comps < 2:
            xy = np.concatenate([xy, np.zeros((n, 2 - comps))], 1)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=min(tsne_perplexity, max(2.0, (n - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(x)
    elif method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(umap_neighbors, n - 1)), min_dist=umap_min_dist,
                            random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", numba notices
            xy = reducer.fit_transform(x)
    else:
        raise InputError(f"unknown projection {method!r}; choose one of {', '.join(METHODS)}")
    xy = np.asarray(xy, np.float32)
    return xy[: len(q)], xy[len(q):]


def select_tokens(positions: list[np.ndarray], max_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One selection of (sample, position) pairs for every head.

    Args:
        positions: per sample, its stored token positions (int ``[n_s]``).
        max_points: at most this many pairs, spread evenly over the samples (+-1 per sample; a sample with
            fewer stored tokens than its share gives them all and the others share the rest).

    Returns:
        (sample int ``[n]``, position int ``[n]``), sorted by sample then position.
    """
    rng = np.random.default_rng(seed)
    n_s = len(positions)
    total = sum(len(p) for p in positions)
    if total <= max_points:
        pairs = [(s, int(p)) for s in range(n_s) for p in positions[s]]
    else:
        # water-filling: samples with fewer stored tokens than an even share give them all, the others
        # share the rest evenly (+-1)
        caps = np.array([len(p) for p in positions], np.int64)
        quota = np.zeros(n_s, np.int64)
        remaining = int(max_points)
        order = np.argsort(caps, kind="stable")
        for i, s in enumerate(order):
            quota[s] = min(caps[s], remaining // (n_s - i))
            remaining -= int(quota[s])
        for s in rng.permutation(n_s):
            if remaining == 0:
                break
            if quota[s] < caps[s]:
                quota[s] += 1
                remaining -= 1
        pairs = [(int(s), int(p)) for s in range(n_s) for p in rng.choice(positions[s], int(quota[s]), replace=False)]
    pairs.sort()
    arr = np.asarray(pairs, np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def nearest_key_agreement(q_xy: np.ndarray, k_xy: np.ndarray, queries: np.ndarray, keys: np.ndarray,
                          sample: np.ndarray) -> float:
    """Fraction of queries whose nearest key in 2-D, among the keys of the same sample, is the key with
    the largest ``q . k`` among them (NaN when no sample has two keys)."""
    hits, n = 0, 0
    for s in np.unique(sample):
        rows = np.flatnonzero(sample == s)
        if len(rows) < 2:
            continue
        logits = queries[rows] @ keys[rows].T                       # [m, m]
        d = ((q_xy[rows, None, :] - k_xy[None, rows, :]) ** 2).sum(-1)
        hits += int((d.argmin(1) == logits.argmax(1)).sum())
        n += len(rows)
    return hits / n if n else float("nan")


@dataclass
class QKEmbedding:
    """A computed (or cached) joint embedding, n tokens, L x H heads:

    - ``sample``, ``position`` int ``[n]``: which token each point pair is;
    - ``row``, ``col`` int ``[n]``: its patch (-1 for prefix tokens); ``in_mask`` int8 ``[n]``: 1 when the
      object mask covers at least half of its patch, 0 when not, -1 without a mask or for prefix tokens;
    - ``query_xy``, ``key_xy`` float32 ``[L, H, n, 2]``: the 2-D coordinates;
    - ``agreement`` float32 ``[L, H]``: :func:`nearest_key_agreement`; ``chance`` its chance level.
    """

    params: dict[str, Any]
    summary: dict[str, Any]
    sample: np.ndarray
    position: np.ndarray
    row: np.ndarray
    col: np.ndarray
    in_mask: np.ndarray
    query_xy: np.ndarray
    key_xy: np.ndarray
    agreement: np.ndarray
    reused: bool = False

    @property
    def kind(self) -> str:
        return str(self.params["kind"])

    @property
    def method(self) -> str:
        return str(self.params["method"])

    @property
    def n_points(self) -> int:
        return len(self.sample)

    @property
    def chance(self) -> float:
        return float(self.summary.get("chance_agreement", float("nan")))


_ARRAYS = ("sample", "position", "row", "col", "in_mask", "query_xy", "key_xy", "agreement")


def _qk_kind(rec: Recording, kind: str | None) -> str:
    if kind is not None:
        if kind not in rec.kinds():
            raise InputError(f"this {rec.family} recording has no {kind!r} attention; it has: {', '.join(rec.kinds())}")
        if not rec.has_qk(kind):
            raise InputError(f"{rec.path.name}: the {kind!r} attention stores no query/key vectors; record with "
                             "`attnviz extract --store-qk 0.25` (or another fraction)")
        return kind
    for k in rec.kinds():
        if rec.has_qk(k):
            return k
    raise InputError(f"{rec.path.name} stores no query/key vectors; record with `attnviz extract --store-qk 0.25` "
                     "(or another fraction of the tokens)")


def _mask_cover(rec: Recording, sample: int, kind: str) -> np.ndarray | None:
    """Fraction of each patch covered by the sample's object mask, ``[gh, gw]`` (None without masks)."""
    lay = rec.layout(kind)
    if not rec.has_masks or lay.grid is None:
        return None
    m = np.asarray(rec.mask(sample)) > 0
    gh, gw = lay.grid
    ys = np.linspace(0, m.shape[0], gh + 1).round().astype(int)
    xs = np.linspace(0, m.shape[1], gw + 1).round().astype(int)
    return np.array([[m[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].mean() if ys[r + 1] > ys[r] and xs[c + 1] > xs[c] else 0.0
                      for c in range(gw)] for r in range(gh)])


def compute_qk_embedding(path: str | os.PathLike, params: QKParams | None = None, *, force: bool = False,
                         show_bar: bool = False, progress: Callable[[float, str], None] | None = None) -> QKEmbedding:
    """Compute the joint query-key embedding of every head and cache it in the recording (or reuse it).

    Raises:
        InputError: the recording stores no query/key vectors, or too few.
        RecordingError: not a complete recording.
    """
    import attnviz
    from attnviz.store import schema as S
    from attnviz.store.cache import save_analysis

    params = params or QKParams()
    report = progress or (lambda frac, msg: None)
    t0 = time.perf_counter()
    with attnviz.open(path) as rec:
        kind = _qk_kind(rec, params.kind)
        key = params.cache_key(kind, rec.n_samples)
        group = rec.analysis_group(ANALYSIS_NAME)
        if not force and group is not None and group.attrs.get("params") == S.dumps(key):
            cached = load_qk_embedding(rec)
            if cached is not None:
                cached.reused = True
                return cached
        if not rec.complete:
            from attnviz.errors import RecordingError

            raise RecordingError(f"{rec.path}: the recording is incomplete; finish it with `attnviz extract --resume` first")
        n_layers, n_heads = rec.stack_shape(kind)
        lay = rec.layout(kind)
        stored = [rec.qk_positions(s, kind) for s in range(rec.n_samples)]
        sample, position = select_tokens(stored, params.max_points, params.seed)
        if len(sample) < 4:
            raise InputError(f"{rec.path.name}: only {len(sample)} stored tokens; the joint embedding needs at least 4")
        n = len(sample)
        dim = rec.h5[S.qk_path(kind, S.QUERIES)].shape[-1]
        queries = np.zeros((n_layers, n_heads, n, dim), np.float32)
        keys = np.zeros_like(queries)
        row = np.full(n, -1, np.int64)
        col = np.full(n, -1, np.int64)
        in_mask = np.full(n, -1, np.int8)
        wanted = np.unique(sample)
        for idx, pos, q, k in rec.iter_qk(kind, samples=wanted, batch_size=8):
            for j, s in enumerate(idx):
                rows = np.flatnonzero(sample == s)
                slot = {int(p): t for t, p in enumerate(pos[j]) if p >= 0}
                cols = np.array([slot[int(p)] for p in position[rows]])
                queries[:, :, rows] = q[j][:, :, cols].astype(np.float32)
                keys[:, :, rows] = k[j][:, :, cols].astype(np.float32)
                cover = _mask_cover(rec, int(s), kind)
                for r in rows:
                    p = int(position[r]) - lay.n_prefix
                    if lay.grid is not None and p >= 0:
                        row[r], col[r] = divmod(p, lay.grid[1])
                        if cover is not None:
                            in_mask[r] = int(cover[row[r], col[r]] >= 0.5)
        rec_path = rec.path
    report(0.0, f"projecting {n_layers * n_heads} heads ({params.method})")
    bar = None
    if show_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers * n_heads, desc=f"query-key {params.method}", unit="head", leave=False)
    query_xy = np.zeros((n_layers, n_heads, n, 2), np.float32)
    key_xy = np.zeros_like(query_xy)
    agreement = np.zeros((n_layers, n_heads), np.float32)
    try:
        for layer in range(n_layers):
            for head in range(n_heads):
                qx, kx = project_joint(queries[layer, head], keys[layer, head], params.method, seed=params.seed,
                                       umap_neighbors=params.umap_neighbors, umap_min_dist=params.umap_min_dist,
                                       tsne_perplexity=params.tsne_perplexity)
                query_xy[layer, head], key_xy[layer, head] = qx, kx
                agreement[layer, head] = nearest_key_agreement(qx, kx, queries[layer, head], keys[layer, head], sample)
                if bar is not None:
                    bar.update(1)
                report((layer * n_heads + head + 1) / (n_layers * n_heads), f"L{layer} H{head}")
    finally:
        if bar is not None:
            bar.close()
    per_sample = np.bincount(sample)
    per_sample = per_sample[per_sample > 1]
    chance = float(np.mean(1.0 / per_sample)) if len(per_sample) else float("nan")
    summary = {"n_points": int(n), "n_samples_used": int(len(wanted)), "head_dim": int(dim),
               "chance_agreement": chance, "mean_agreement": float(np.nanmean(agreement)),
               "seconds": round(time.perf_counter() - t0, 2), "grid": list(lay.grid) if lay.grid else None}
    arrays = {"sample": sample.astype(np.int32), "position": position.astype(np.int32), "row": row.astype(np.int16),
              "col": col.astype(np.int16), "in_mask": in_mask, "query_xy": query_xy, "key_xy": key_xy,
              "agreement": agreement}
    save_analysis(rec_path, ANALYSIS_NAME, key, arrays, attrs={"summary": summary})
    return QKEmbedding(params=key, summary=summary, **{k: np.asarray(arrays[k]) for k in _ARRAYS})


def load_qk_embedding(rec: Recording) -> QKEmbedding | None:
    """The cached joint embedding of an open recording (whatever parameters made it), or None."""
    from attnviz.store import schema as S

    g = rec.analysis_group(ANALYSIS_NAME)
    if g is None or "params" not in g.attrs:
        return None
    params = S.loads(g.attrs["params"])
    if not isinstance(params, dict) or params.get("algorithm") != ALGORITHM_VERSION or any(k not in g for k in _ARRAYS):
        return None
    return QKEmbedding(params=params, summary=S.loads(g.attrs.get("summary", "{}")),
                       **{k: np.asarray(g[k][()]) for k in _ARRAYS})


def analyze_step(path: str | os.PathLike, *, method: str = "umap", max_points: int = 1000,
                 show_bar: bool = True) -> list[str]:
    """The ``attnviz analyze --qk`` step: compute (or reuse) the joint embedding; one line per result."""
    emb = compute_qk_embedding(path, QKParams(method=method, max_points=max_points), show_bar=show_bar)
    how = "cached, unchanged" if emb.reused else f"computed in {emb.summary['seconds']:.0f} s"
    return [f"query-key embedding ({emb.kind}, {emb.method}, {emb.n_points} tokens per head, {how}): a query's "
            f"nearest key is the one it attends to most for {emb.summary['mean_agreement']:.0%} of queries "
            f"(chance {emb.chance:.0%})"]
