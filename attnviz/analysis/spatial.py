"""Spatial attention profiles: where each head looks on the patch grid, and how that changes with depth.

Notation. A patch stack has ``n_prefix`` prefix tokens (CLS, distillation, registers) followed by
``P = gh * gw`` patch tokens in row-major order. Patch ``i`` sits at grid position
``(y_i, x_i) = divmod(i, gw)``; its centre is at pixel ``(y_i * ph, x_i * pw)`` relative to patch 0
(``(ph, pw)`` = patch size in pixels). For one image, one head, and a *patch* query ``q`` with
attention row ``a_q`` over all keys (rows sum to 1), the offset of key ``k`` is
``delta_qk = (y_k - y_q, x_k - x_q)``, its pixel distance ``d_qk = sqrt(((y_k-y_q) ph)^2 + ((x_k-x_q) pw)^2)``
and its Chebyshev ring ``c_qk = max(|y_k-y_q|, |x_k-x_q|)``.

Only patch queries enter these metrics (a prefix token has no position; the CLS query's map is
shown by the attention explorer). Every (image, patch query) pair weighs the same.

1. **Relative-offset profile** (Cordonnier, Loukas & Jaggi 2020, "On the Relationship between
   Self-Attention and Convolutional Layers", ICLR, Figs. 4-6, which show attention as a function of
   the key's offset from the query):
   ``profile(dy, dx) = 1 / (N_img * n(dy, dx)) * sum_img sum_{q,k: delta_qk = (dy, dx)} a_qk``, where
   ``n(dy, dx) = (gh - |dy|) (gw - |dx|)`` is the number of query-key pairs with that offset (pairs
   near the edge are fewer), so the value is the mean weight a query gives to the key at that
   offset where one exists. A ``(2 gh - 1) x (2 gw - 1)`` map, centre = offset (0, 0).
2. **Radial profile**: rings of offsets, Chebyshev ``r = max(|dy|, |dx|)`` (ring 1 = the 8 nearest
   neighbours) or Euclidean ``r = floor(sqrt(dy^2 + dx^2) + 1/2)`` (in patches). Two readings:
   ``strength(r) = sum_{(dy,dx) in r} n(dy,dx) profile(dy,dx) / sum_{(dy,dx) in r} n(dy,dx)`` (mean
   weight per query-key pair in the ring) and ``mass(r) = sum_{(dy,dx) in r} n(dy,dx) profile(dy,dx) / P``
   (the share of a query's attention that falls in the ring; sums over rings to the patch share).
3. **Mean attention distance** in pixels (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words",
   ICLR, Fig. 7 and Appendix D.7: "averaging the distance between the query pixel and all other
   pixels, weighted by the attention weight"; as in the common reproductions, e.g. Raghu et al.
   2021, "Do Vision Transformers See Like Convolutional Neural Networks?", NeurIPS, Sec. 4):
   ``MAD = mean_{img, q} sum_{k patch} a_qk d_qk`` with the **raw** attention weights: the mass a
   query puts on prefix tokens (which have no position) counts as no distance, it is *not*
   renormalised away. So a head that parks its attention on CLS has a small MAD, and the prefix
   share says why. The renormalised variant (the distance of the attention that does land on
   patches) is ``MAD_patches = sum_{img,q,k patch} a_qk d_qk / sum_{img,q,k patch} a_qk`` = ``MAD /
   patch_share`` (NaN when no mass lands on patches). Uniform attention over the patches gives the
   grid's mean pairwise distance :attr:`SpatialProfiles.uniform_mean_distance`.
4. **Shares** of a query's attention, averaged over images and queries, summing to 1:
   ``prefix = sum_{k < n_prefix} a_qk`` (CLS/registers; Darcet et al. 2024, "Vision Transformers Need
   Registers", ICLR), ``self = a_qq``, ``local = sum_{k: c_qk = 1} a_qk`` (the 3x3 neighbourhood
   without the query itself; the receptive field of a 3x3 convolution, Cordonnier et al. 2020), and
   ``rest = sum_{k: c_qk >= 2} a_qk``.
5. **Per query position**: ``sum_k a_qk d_qk`` averaged over images for each query patch (a
   ``gh x gw`` map: edge patches have farther keys available), with the patch mass and prefix share
   per query.
6. **Per image**: MAD and the four shares per (image, layer, head) are kept for every image; the full
   profiles of one image are computed on demand from its maps (:func:`spatial_for_sample`).

Everything streams over samples (one batch of maps in memory) and is vectorised: per-query sums are
one batched matrix product with a precomputed ``[query, key, column]`` weight tensor, offset sums are
one ``np.bincount`` over a precomputed query-key offset index (after summing the batch's maps, which
the offset sums are linear in).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from attnviz.errors import InputError, RecordingError
from attnviz.store.reader import Recording, store_refusal
from attnviz.store.schema import HeadMetricInfo, TokenLayout

__all__ = [
    "ANALYSIS_NAME",
    "ALGORITHM_VERSION",
    "SHARE_NAMES",
    "METRIC_INFO",
    "PatchGeometry",
    "RadialProfile",
    "SpatialProfiles",
    "spatial_profiles",
    "spatial_profiles_from_maps",
    "spatial_kinds",
    "default_spatial_kind",
    "compute_spatial",
    "spatial_for_sample",
    "spatial_params",
    "load_spatial",
    "save_spatial",
    "analyze_spatial",
    "analyze_step",
    "metric_name",
]

ANALYSIS_NAME = "spatial"
# Bump when the computation changes so cached results made by older code are recomputed.
ALGORITHM_VERSION = 1
SHARE_NAMES = ("prefix", "self", "local", "rest")

_DOSOVITSKIY = ("Dosovitskiy et al. (2021), An Image is Worth 16x16 Words: Transformers for Image Recognition at "
                "Scale, ICLR, Fig. 7 and Appendix D.7; as reproduced in Raghu et al. (2021), Do Vision Transformers "
                "See Like Convolutional Neural Networks?, NeurIPS, Sec. 4")
_CORDONNIER = ("Cordonnier, Loukas & Jaggi (2020), On the Relationship between Self-Attention and Convolutional "
               "Layers, ICLR (attention by relative offset; 3x3 neighbourhood = a 3x3 convolution's receptive field)")
_DARCET = ("Darcet, Oquab, Mairal & Bojanowski (2024), Vision Transformers Need Registers, ICLR "
           "(attention mass gathered by CLS/register tokens)")

METRIC_INFO: dict[str, HeadMetricInfo] = {
    "mean_attention_distance": HeadMetricInfo(
        name="mean_attention_distance",
        definition="mean over images and patch queries q of sum_{k patch} a_qk * d_qk, d_qk = pixel distance "
                   "between the centres of patches q and k; raw weights (mass on CLS/prefix tokens counts as "
                   "no distance, not renormalised)",
        citation=_DOSOVITSKIY, units="px", higher_is_more_important=False),
    "mean_attention_distance_patches": HeadMetricInfo(
        name="mean_attention_distance_patches",
        definition="sum_{img,q,k patch} a_qk d_qk / sum_{img,q,k patch} a_qk: the mean attention distance of "
                   "the attention mass that lands on patches (renormalised over patch keys); NaN if none does",
        citation=_DOSOVITSKIY, units="px", higher_is_more_important=False),
    "prefix_share": HeadMetricInfo(
        name="prefix_share",
        definition="mean over images and patch queries q of sum_{k < n_prefix} a_qk (attention of patches to "
                   "CLS/register tokens)",
        citation=_DARCET, units="", higher_is_more_important=False),
    "self_share": HeadMetricInfo(
        name="self_share", definition="mean over images and patch queries q of a_qq (attention to itself)",
        citation=_CORDONNIER, units="", higher_is_more_important=False),
    "local_share": HeadMetricInfo(
        name="local_share",
        definition="mean over images and patch queries q of sum_{k: max(|dy|,|dx|) = 1} a_qk (the 3x3 "
                   "neighbourhood of the query, without the query itself)",
        citation=_CORDONNIER, units="", higher_is_more_important=False),
}

# Columns of the per-query weight tensor W[q, key, column] (see PatchGeometry.query_weights).
_C_DIST, _C_PREFIX, _C_SELF, _C_LOCAL, _C_REST = range(5)

# float16 -> float32 through a 65,536-entry table: exact for every bit pattern and about twice as
# fast as ndarray.astype here, which matters because the cast is the largest cost per batch.
_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _as_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float16:
        return _F16_TABLE[x.view(np.uint16)]
    return np.asarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class PatchGeometry:
    """Offsets, distances and rings of a patch grid.

    Args:
        grid: (gh, gw) patches.
        patch_size: (ph, pw) pixels per patch (distances are between patch centres, in pixels).
        n_prefix: prefix tokens before the patches.
    """

    grid: tuple[int, int]
    patch_size: tuple[int, int] = (1, 1)
    n_prefix: int = 0

    def __post_init__(self) -> None:
        gh, gw = self.grid
        if gh < 1 or gw < 1:
            raise InputError(f"a patch grid needs at least one patch per side, got {self.grid}")

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def offset_shape(self) -> tuple[int, int]:
        """(2 gh - 1, 2 gw - 1): shape of an offset profile."""
        return 2 * self.grid[0] - 1, 2 * self.grid[1] - 1

    @cached_property
    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) grid position of each patch, int ``[P]`` each."""
        return np.divmod(np.arange(self.n_patches), self.grid[1])

    @cached_property
    def _deltas(self) -> tuple[np.ndarray, np.ndarray]:
        y, x = self.positions
        return y[None, :] - y[:, None], x[None, :] - x[:, None]  # [query, key]: key minus query

    @cached_property
    def offset_index(self) -> np.ndarray:
        """int64 ``[P, P]``: flat index into the offset profile of each (query, key) pair."""
        dy, dx = self._deltas
        gh, gw = self.grid
        return ((dy + gh - 1) * (2 * gw - 1) + (dx + gw - 1)).astype(np.int64)

    @cached_property
    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(dy, dx) of every cell of an offset profile, int ``[2gh-1, 2gw-1]`` each."""
        gh, gw = self.grid
        return np.meshgrid(np.arange(-(gh - 1), gh), np.arange(-(gw - 1), gw), indexing="ij")

    @cached_property
    def pair_count(self) -> np.ndarray:
        """int64 ``[2gh-1, 2gw-1]``: query-key pairs with each offset, ``(gh-|dy|)(gw-|dx|)``."""
        dy, dx = self.offsets
        return ((self.grid[0] - np.abs(dy)) * (self.grid[1] - np.abs(dx))).astype(np.int64)

    @cached_property
    def offset_distance(self) -> np.ndarray:
        """float64 ``[2gh-1, 2gw-1]``: pixel distance of each offset."""
        dy, dx = self.offsets
        return np.hypot(dy * float(self.patch_size[0]), dx * float(self.patch_size[1]))

    @cached_property
    def distance(self) -> np.ndarray:
        """float64 ``[P, P]``: pixel distance between the centres of query and key patches."""
        return self.offset_distance.ravel()[self.offset_index]

    def ring(self, metric: str = "chebyshev") -> np.ndarray:
        """int64 ``[2gh-1, 2gw-1]``: ring of each offset, in patches.

        ``"chebyshev"``: ``max(|dy|, |dx|)``; ``"euclidean"``: ``floor(sqrt(dy^2 + dx^2) + 1/2)``.
        """
        dy, dx = self.offsets
        if metric == "chebyshev":
            return np.maximum(np.abs(dy), np.abs(dx)).astype(np.int64)
        if metric == "euclidean":
            return np.floor(np.hypot(dy, dx) + 0.5).astype(np.int64)
        raise InputError(f"unknown ring metric {metric!r}; use 'chebyshev' or 'euclidean'")

    @cached_property
    def uniform_mean_distance(self) -> float:
        """Mean pixel distance over all ordered (query, key) patch pairs, self pairs included: the
        mean attention distance of attention spread uniformly over the patches."""
        return float((self.pair_count * self.offset_distance).sum() / self.n_patches**2)

    @cached_property
    def query_weights(self) -> np.ndarray:
        """float32 ``[P, n_tokens, 5]``: for patch query q and key token k the columns
        (distance in px, is prefix, is self, is in the 3x3 ring, is farther), so that
        ``a_q @ W[q]`` gives the five per-query sums in one batched matrix product."""
        p, t, n0 = self.n_patches, self.n_tokens, self.n_prefix
        w = np.zeros((p, t, 5), np.float32)
        cheb = self.ring("chebyshev").ravel()[self.offset_index]
        w[:, :n0, _C_PREFIX] = 1.0
        w[:, n0:, _C_DIST] = self.distance
        w[:, n0:, _C_SELF] = cheb == 0
        w[:, n0:, _C_LOCAL] = cheb == 1
        w[:, n0:, _C_REST] = cheb >= 2
        return w

    @classmethod
    def from_layout(cls, layout: TokenLayout, kind: str = "self") -> PatchGeometry:
        """Geometry of a recorded stack; raises :class:`InputError` if it has no patch grid."""
        if layout.grid is None:
            raise InputError(f"the {kind!r} attention has no patch grid (its keys are {layout.key_axis}); "
                             "spatial profiles need patches")
        patch = tuple(layout.patch_size) if layout.patch_size is not None else (1, 1)
        return cls(grid=(int(layout.grid[0]), int(layout.grid[1])), patch_size=(int(patch[0]), int(patch[1])),
                   n_prefix=int(layout.n_prefix))


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RadialProfile:
    """Attention by distance ring.

    Attributes:
        metric: "chebyshev" or "euclidean".
        radius: int ``[R]``: ring radius in patches (0 = the query itself).
        strength: float ``[..., R]``: mean attention weight per query-key pair in the ring.
        mass: float ``[..., R]``: share of a query's attention that falls in the ring.
        pair_count: int ``[R]``: query-key pairs in the ring.
    """

    metric: str
    radius: np.ndarray
    strength: np.ndarray
    mass: np.ndarray
    pair_count: np.ndarray


@dataclass(frozen=True)
class SpatialProfiles:
    """Spatial profiles of every head of one stack (see the module docstring for the definitions).

    Attributes:
        kind: attention kind ("self"; "vision" for the vision tower of an LVLM recording).
        geometry: the patch grid.
        samples: int ``[S]``: the images averaged over.
        image_mean_distance: float32 ``[S, layer, head]``: mean attention distance (px, raw weights)
            of each image.
        image_shares: float32 ``[S, layer, head, 4]``: shares (prefix, self, local, rest) of each image.
        offset_profile: float32 ``[layer, head, 2gh-1, 2gw-1]``: mean weight per query-key pair at each
            offset, averaged over images; centre = (0, 0), row = dy, column = dx.
        query_distance: float32 ``[layer, head, gh, gw]``: ``sum_k a_qk d_qk`` per query patch (px),
            averaged over images.
        query_patch_mass: float32 ``[layer, head, gh, gw]``: attention on patch keys per query patch.
        query_prefix_share: float32 ``[layer, head, gh, gw]``: attention on prefix keys per query patch.
    """

    kind: str
    geometry: PatchGeometry
    samples: np.ndarray
    image_mean_distance: np.ndarray
    image_shares: np.ndarray
    offset_profile: np.ndarray
    query_distance: np.ndarray
    query_patch_mass: np.ndarray
    query_prefix_share: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def n_samples(self) -> int:
        return int(len(self.samples))

    @property
    def n_layers(self) -> int:
        return int(self.offset_profile.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.offset_profile.shape[1])

    @property
    def uniform_mean_distance(self) -> float:
        """Mean attention distance (px) of attention spread uniformly over the patches."""
        return self.geometry.uniform_mean_distance

    # -- averages over images ------------------------------------------------------------------

    @property
    def mean_distance(self) -> np.ndarray:
        """float64 ``[layer, head]``: mean attention distance in px (raw weights)."""
        return self.image_mean_distance.mean(0, dtype=np.float64)

    @property
    def shares(self) -> np.ndarray:
        """float64 ``[layer, head, 4]``: (prefix, self, local, rest) shares, averaged over images."""
        return self.image_shares.mean(0, dtype=np.float64)

    @property
    def prefix_share(self) -> np.ndarray:
        return self.shares[..., 0]

    @property
    def self_share(self) -> np.ndarray:
        return self.shares[..., 1]

    @property
    def local_share(self) -> np.ndarray:
        return self.shares[..., 2]

    @property
    def rest_share(self) -> np.ndarray:
        return self.shares[..., 3]

    @property
    def patch_share(self) -> np.ndarray:
        """float64 ``[layer, head]``: attention on patch keys (self + local + rest)."""
        return self.shares[..., 1:].sum(-1)

    @property
    def mean_distance_patches(self) -> np.ndarray:
        """float64 ``[layer, head]``: mean attention distance of the mass on patches
        (``MAD / patch_share``; NaN where no mass lands on patches)."""
        return _ratio(self.mean_distance, self.patch_share)

    @property
    def image_mean_distance_patches(self) -> np.ndarray:
        """float64 ``[S, layer, head]``: per image, renormalised over patch keys."""
        return _ratio(self.image_mean_distance.astype(np.float64), self.image_shares[..., 1:].sum(-1, dtype=np.float64))

    @property
    def query_distance_patches(self) -> np.ndarray:
        """float64 ``[layer, head, gh, gw]``: per query patch, renormalised over patch keys."""
        return _ratio(self.query_distance.astype(np.float64), self.query_patch_mass.astype(np.float64))

    def head_metrics(self) -> dict[str, np.ndarray]:
        """The per-head averages stored as head metrics, name -> float64 ``[layer, head]``."""
        return {"mean_attention_distance": self.mean_distance,
                "mean_attention_distance_patches": self.mean_distance_patches,
                "prefix_share": self.prefix_share, "self_share": self.self_share, "local_share": self.local_share}

    def radial(self, metric: str = "chebyshev") -> RadialProfile:
        """Radial profile of every head: :class:`RadialProfile` with ``[layer, head, R]`` arrays."""
        ring = self.geometry.ring(metric).ravel()
        n_rings = int(ring.max()) + 1
        count = self.geometry.pair_count.ravel().astype(np.float64)
        sums = self.offset_profile.reshape(self.n_layers, self.n_heads, -1).astype(np.float64) * count
        ring_sum = np.zeros((self.n_layers, self.n_heads, n_rings))
        np.add.at(ring_sum, (slice(None), slice(None), ring), sums)  # small: (2gh-1)(2gw-1) columns
        ring_count = np.bincount(ring, weights=count, minlength=n_rings)
        keep = ring_count > 0  # euclidean rounding can skip a radius on small grids
        return RadialProfile(metric=metric, radius=np.arange(n_rings)[keep],
                             strength=(ring_sum / np.where(keep, ring_count, 1.0))[..., keep],
                             mass=(ring_sum / self.geometry.n_patches)[..., keep],
                             pair_count=ring_count[keep].astype(np.int64))

    # -- storage -----------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for :func:`attnviz.store.save_analysis` (see :meth:`from_arrays`)."""
        g = self.geometry
        return {
            "samples": np.asarray(self.samples, np.int64),
            "image_mean_distance": np.asarray(self.image_mean_distance, np.float32),
            "image_shares": np.asarray(self.image_shares, np.float32),
            "offset_profile": np.asarray(self.offset_profile, np.float32),
            "query_distance": np.asarray(self.query_distance, np.float32),
            "query_patch_mass": np.asarray(self.query_patch_mass, np.float32),
            "query_prefix_share": np.asarray(self.query_prefix_share, np.float32),
            "grid": np.asarray(g.grid, np.int64),
            "patch_size": np.asarray(g.patch_size, np.int64),
            "n_prefix": np.asarray(g.n_prefix, np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], kind: str,
                    params: dict[str, Any] | None = None) -> SpatialProfiles:
        geom = PatchGeometry(grid=tuple(int(v) for v in arrays["grid"]),  # type: ignore[arg-type]
                             patch_size=tuple(int(v) for v in arrays["patch_size"]),  # type: ignore[arg-type]
                             n_prefix=int(arrays["n_prefix"]))
        return cls(kind=kind, geometry=geom, samples=arrays["samples"],
                   image_mean_distance=arrays["image_mean_distance"], image_shares=arrays["image_shares"],
                   offset_profile=arrays["offset_profile"], query_distance=arrays["query_distance"],
                   query_patch_mass=arrays["query_patch_mass"], query_prefix_share=arrays["query_prefix_share"],
                   params=dict(params or {}))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# computation (pure: arrays in, arrays out)


class _Accumulator:
    """Streaming sums over batches of maps ``[b, layer, head, query, key]``."""

    def __init__(self, geometry: PatchGeometry, n_layers: int, n_heads: int) -> None:
        self.g = geometry
        self.n_layers, self.n_heads = n_layers, n_heads
        p = geometry.n_patches
        self.n_offsets = int(np.prod(geometry.offset_shape))
        self.offset_sums = np.zeros((n_layers, n_heads, self.n_offsets))
        self.query_sums = np.zeros((n_layers, n_heads, p, 5))
        self.image_stats: list[np.ndarray] = []  # per batch float32 [b, layer, head, 5]
        self.samples: list[np.ndarray] = []
        self.weights = geometry.query_weights
        # bincount index of a [head, P, P] block: head h's offsets land in h * n_offsets + offset
        self.bincount_index = (np.arange(n_heads)[:, None] * self.n_offsets
                               + geometry.offset_index.ravel()[None, :]).ravel()

    def add(self, indices: np.ndarray, maps: np.ndarray) -> None:
        g = self.g
        n0, t, p = g.n_prefix, g.n_tokens, g.n_patches
        if maps.ndim != 5 or maps.shape[1:3] != (self.n_layers, self.n_heads):
            raise InputError(f"maps must be [batch, {self.n_layers}, {self.n_heads}, query, key], got {maps.shape}")
        if maps.shape[3] < t or maps.shape[4] < t:
            raise InputError(f"maps of shape {maps.shape} are smaller than the layout's {t} tokens "
                             f"({n0} prefix + {g.grid[0]}x{g.grid[1]} patches)")
        b = maps.shape[0]
        stats = np.empty((b, self.n_layers, self.n_heads, 5), np.float32)
        for layer in range(self.n_layers):  # one layer at a time keeps the float32 copy small
            x = _as_float32(maps[:, layer, :, n0:t, :t])  # [b, head, P(query), T(key)]
            # per (image, head, query): a_q @ W[q] -> [P, b*head, 5]
            per_query = np.matmul(x.reshape(b * self.n_heads, p, t).transpose(1, 0, 2), self.weights)
            per_query = per_query.reshape(p, b, self.n_heads, 5)
            stats[:, layer] = per_query.mean(0)
            self.query_sums[layer] += per_query.sum(1, dtype=np.float64).transpose(1, 0, 2)
            # offset sums are linear in the maps: sum the batch first, then one bincount for all heads
            block = x[..., n0:].sum(0)  # [head, P, P]
            self.offset_sums[layer] += np.bincount(self.bincount_index, weights=block.ravel(),
                                                   minlength=self.n_heads * self.n_offsets).reshape(self.n_heads, -1)
        self.image_stats.append(stats)
        self.samples.append(np.asarray(indices, np.int64))

    def result(self, kind: str, params: dict[str, Any] | None = None) -> SpatialProfiles:
        g = self.g
        gh, gw = g.grid
        n = sum(len(s) for s in self.samples)
        if n == 0:
            raise InputError("no samples to compute spatial profiles from")
        stats = np.concatenate(self.image_stats)
        count = g.pair_count.ravel().astype(np.float64)
        profile = self.offset_sums / (n * count)
        q = self.query_sums / n
        shape = (self.n_layers, self.n_heads, gh, gw)
        return SpatialProfiles(
            kind=kind, geometry=g, samples=np.concatenate(self.samples),
            image_mean_distance=stats[..., _C_DIST].copy(),
            image_shares=stats[..., [_C_PREFIX, _C_SELF, _C_LOCAL, _C_REST]],
            offset_profile=profile.reshape(self.n_layers, self.n_heads, *g.offset_shape).astype(np.float32),
            query_distance=q[..., _C_DIST].reshape(shape).astype(np.float32),
            query_patch_mass=q[..., [_C_SELF, _C_LOCAL, _C_REST]].sum(-1).reshape(shape).astype(np.float32),
            query_prefix_share=q[..., _C_PREFIX].reshape(shape).astype(np.float32),
            params=dict(params or {}),
        )


def spatial_profiles(batches: Iterable[tuple[np.ndarray, np.ndarray]], geometry: PatchGeometry, *,
                     n_layers: int, n_heads: int, kind: str = "self",
                     progress: Callable[[int], None] | None = None) -> SpatialProfiles:
    """Spatial profiles of a stream of attention maps, one batch in memory at a time.

    Args:
        batches: iterable of (indices int ``[b]``, maps float16/float32
            ``[b, layer, head, query_pos, key_pos]``) with rows summing to 1; maps may be padded
            beyond ``geometry.n_tokens`` (the padding is ignored). E.g. ``rec.iter_attention(kind)``.
        geometry: the patch grid, patch size and number of prefix tokens.
        n_layers, n_heads: stack shape.
        kind: attention kind, recorded in the result.
        progress: called with the number of samples after each batch.

    Returns:
        :class:`SpatialProfiles` over every sample of the stream.
    """
    acc = _Accumulator(geometry, n_layers, n_heads)
    for indices, maps in batches:
        acc.add(indices, maps)
        del maps  # let the batch go before the next one is read: one batch in memory, not two
        if progress is not None:
            progress(len(indices))
    return acc.result(kind)


def spatial_profiles_from_maps(maps: np.ndarray, layout: TokenLayout | PatchGeometry, *,
                               kind: str = "self", batch_size: int = 16) -> SpatialProfiles:
    """Spatial profiles of in-memory maps float ``[sample, layer, head, query_pos, key_pos]``."""
    maps = np.asarray(maps)
    if maps.ndim == 4:  # [layer, head, query, key]: one image
        maps = maps[None]
    geom = layout if isinstance(layout, PatchGeometry) else PatchGeometry.from_layout(layout, kind)
    batches = ((np.arange(i, min(i + batch_size, len(maps))), maps[i : i + batch_size])
               for i in range(0, len(maps), batch_size))
    return spatial_profiles(batches, geom, n_layers=maps.shape[1], n_heads=maps.shape[2], kind=kind)


# ---------------------------------------------------------------------------------------------
# on a recording


def spatial_kinds(rec: Recording) -> list[str]:
    """Attention kinds of ``rec`` that have a patch grid (main kind first)."""
    return [k for k in rec.kinds() if rec.layout(k).grid is not None]


def default_spatial_kind(rec: Recording) -> str | None:
    """The kind spatial profiles are computed on by default (ViT: "self"; LVLM: "vision"), or None."""
    kinds = spatial_kinds(rec)
    return kinds[0] if kinds else None


def _resolve_kind(rec: Recording, kind: str | None) -> str:
    if kind is None:
        kind = default_spatial_kind(rec)
        if kind is None:
            raise InputError(f"{rec.path.name}: no attention kind with a patch grid ({', '.join(rec.kinds())}); "
                             "spatial profiles need patches")
        return kind
    if kind not in rec.kinds():
        raise InputError(f"{rec.path.name} has no {kind!r} attention; it has: {', '.join(rec.kinds())}")
    if rec.layout(kind).grid is None:
        raise InputError(f"the {kind!r} attention of {rec.path.name} has no patch grid; "
                         f"kinds with one: {', '.join(spatial_kinds(rec)) or 'none'}")
    return kind


def metric_name(base: str, kind: str, rec: Recording) -> str:
    """Head-metric name for ``base`` on ``kind``: plain for the recording's default spatial kind,
    ``<base>_<kind>`` for any other (so two stacks never overwrite each other's metrics)."""
    return base if kind == default_spatial_kind(rec) else f"{base}_{kind}"


def spatial_params(rec: Recording, kind: str | None = None, *, max_samples: int | None = None) -> dict[str, Any]:
    """The parameters a cached result is keyed by (equal parameters = the cache is reused)."""
    kind = _resolve_kind(rec, kind)
    n = rec.n_samples if max_samples is None else min(rec.n_samples, max(0, int(max_samples)))
    return {"algorithm_version": ALGORITHM_VERSION, "kind": kind, "n_samples": int(n)}


def _checked_batches(rec: Recording, kind: str, geom: PatchGeometry, samples: np.ndarray,
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for idx, maps in rec.iter_attention(kind, samples=samples, batch_size=batch_size):
        for s in idx:
            if rec.lengths(int(s), kind) != (geom.n_tokens, geom.n_tokens):
                raise InputError(f"sample {int(s)} of {rec.path.name} has {rec.lengths(int(s), kind)} "
                                 f"({kind!r}) tokens, the layout says {geom.n_tokens}")
        yield idx, maps
        del maps  # a generator's locals live on: drop the batch before reading the next


def _refuse_without_maps(rec: Recording) -> None:
    problem = store_refusal(rec, "the spatial-profile analysis")
    if problem:
        raise RecordingError(f"{rec.path}: {problem}")


def compute_spatial(rec: Recording, kind: str | None = None, *, batch_size: int = 8,
                    max_samples: int | None = None,
                    progress: Callable[[int], None] | None = None) -> SpatialProfiles:
    """Compute spatial profiles over the (first ``max_samples``) samples of an open recording.

    Streams ``rec.iter_attention(kind, batch_size=batch_size)``: at most one batch of maps
    (``batch_size x layers x heads x tokens x tokens`` float16) plus one layer of it in float32 is in
    memory. Nothing is cached; see :func:`analyze_spatial`.

    Args:
        rec: an open recording.
        kind: attention kind with a patch grid (default :func:`default_spatial_kind`).
        batch_size: samples per read.
        max_samples: use the first N samples (None: all).
        progress: called with the number of samples done after each batch.
    """
    _refuse_without_maps(rec)
    params = spatial_params(rec, kind, max_samples=max_samples)
    kind = params["kind"]
    geom = PatchGeometry.from_layout(rec.layout(kind), kind)
    n_layers, n_heads = rec.stack_shape(kind)
    acc = _Accumulator(geom, n_layers, n_heads)
    for idx, maps in _checked_batches(rec, kind, geom, np.arange(params["n_samples"]), batch_size):
        acc.add(idx, maps)
        del maps  # one batch in memory, not two (the next read would otherwise overlap this one)
        if progress is not None:
            progress(len(idx))
    return acc.result(kind, params)


def spatial_for_sample(rec: Recording, sample: int, kind: str | None = None) -> SpatialProfiles:
    """Full profiles of one image, computed from its maps (cheap: one sample's maps)."""
    _refuse_without_maps(rec)
    kind = _resolve_kind(rec, kind)
    if not 0 <= int(sample) < rec.n_samples:
        raise IndexError(f"sample {sample} out of range 0..{rec.n_samples - 1}")
    geom = PatchGeometry.from_layout(rec.layout(kind), kind)
    n_layers, n_heads = rec.stack_shape(kind)
    acc = _Accumulator(geom, n_layers, n_heads)
    for idx, maps in _checked_batches(rec, kind, geom, np.array([int(sample)]), 1):
        acc.add(idx, maps)
    return acc.result(kind, {"kind": kind, "sample": int(sample)})


def _cache_name(kind: str) -> str:
    return f"{ANALYSIS_NAME}/{kind}"


def load_spatial(rec: Recording, kind: str | None = None, *,
                 params: dict[str, Any] | None = None) -> SpatialProfiles | None:
    """The cached profiles of ``kind`` (``analyses/spatial/<kind>``), or None.

    Args:
        params: when given, only a result made with exactly these parameters is returned; when None
            (the dashboard), whatever this version of attnviz cached for ``kind`` is returned.
    """
    from attnviz.store.cache import load_analysis
    from attnviz.store.schema import loads

    try:
        kind = _resolve_kind(rec, kind)
    except InputError:
        return None
    if params is None:
        g = rec.analysis_group(_cache_name(kind))
        if g is None:
            return None
        params = loads(g.attrs.get("params"))
        if not isinstance(params, dict) or params.get("algorithm_version") != ALGORITHM_VERSION:
            return None
    arrays = load_analysis(rec, _cache_name(kind), params)
    if arrays is None:
        return None
    return SpatialProfiles.from_arrays(arrays, kind, params)


def save_spatial(path: str | os.PathLike, profiles: SpatialProfiles) -> None:
    """Cache ``profiles`` at ``analyses/spatial/<kind>`` and write its head metrics.

    Head metrics (``head_metrics/<name>``, ``[layer, head]`` of the stack, definitions and citations
    in :data:`METRIC_INFO`): ``mean_attention_distance`` (px), ``mean_attention_distance_patches``
    (px), ``prefix_share``, ``self_share``, ``local_share``; suffixed ``_<kind>`` for a kind that is
    not the recording's default spatial kind.
    """
    from attnviz.store.cache import open_for_update, save_analysis, write_head_metric

    with Recording(path) as rec:
        names = {base: metric_name(base, profiles.kind, rec) for base in METRIC_INFO}
    g = profiles.geometry
    f = open_for_update(path)
    try:
        save_analysis(f, _cache_name(profiles.kind), profiles.params, profiles.to_arrays(),
                      attrs={"kind": profiles.kind, "grid": list(g.grid), "patch_size": list(g.patch_size),
                             "n_prefix": g.n_prefix, "share_names": list(SHARE_NAMES)})
        for base, values in profiles.head_metrics().items():
            info = METRIC_INFO[base]
            write_head_metric(f, HeadMetricInfo(name=names[base], kind=profiles.kind, definition=info.definition,
                                                citation=info.citation, units=info.units,
                                                higher_is_more_important=info.higher_is_more_important,
                                                params=profiles.params), values)
    finally:
        f.close()


def analyze_spatial(path: str | os.PathLike, kind: str | None = None, *, batch_size: int = 8,
                    max_samples: int | None = None, force: bool = False,
                    progress: Callable[[int], None] | None = None) -> tuple[SpatialProfiles, bool]:
    """Spatial profiles of a recording file, from its cache when the parameters are equal.

    Computes (streaming) and stores them (:func:`save_spatial`) when the cache is missing, was made
    with other parameters, or ``force`` is set.

    Returns:
        (profiles, computed): ``computed`` is False when the cached result was reused.

    Raises:
        InputError: ``kind`` has no patch grid / does not exist. RecordingError: not a complete recording.
    """
    from attnviz.errors import RecordingError

    with Recording(path) as rec:
        if not rec.complete:
            raise RecordingError(f"{path}: the recording is incomplete; finish it with `attnviz extract --resume` "
                                 "before analysing it")
        params = spatial_params(rec, kind, max_samples=max_samples)
        if not force:
            cached = load_spatial(rec, params["kind"], params=params)
            if cached is not None:
                return cached, False
        profiles = compute_spatial(rec, params["kind"], batch_size=batch_size, max_samples=max_samples,
                                   progress=progress)
    save_spatial(path, profiles)
    return profiles, True


def analyze_step(path: str | os.PathLike, *, batch_size: int = 8, show_bar: bool = True) -> list[str]:
    """The ``attnviz analyze`` step: spatial profiles of every attention kind with a patch grid.

    Returns:
        One line per kind for the terminal (computed or reused, samples, time, the shallowest and
        deepest layer's mean distance).
    """
    import time

    with Recording(path) as rec:
        kinds = spatial_kinds(rec)
        n = rec.n_samples
        problem = store_refusal(rec, "the spatial-profile analysis")
    if not kinds:
        return ["spatial profiles skipped: no attention with a patch grid"]
    if problem:
        return [f"spatial profiles skipped: {problem}"]
    lines = []
    for kind in kinds:
        bar = None
        if show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"spatial ({kind})", unit="img", leave=False)
        t0 = time.perf_counter()
        try:
            prof, computed = analyze_spatial(path, kind, batch_size=batch_size,
                                             progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        d = prof.mean_distance.mean(1)
        how = f"computed in {time.perf_counter() - t0:.1f} s" if computed else "cached, unchanged"
        lines.append(f"spatial profiles ({kind}, {prof.n_samples} image(s), {how}): mean attention distance "
                     f"{d[0]:.1f} px in layer 0 -> {d[-1]:.1f} px in layer {len(d) - 1} "
                     f"(uniform attention: {prof.uniform_mean_distance:.1f} px)")
    return lines
