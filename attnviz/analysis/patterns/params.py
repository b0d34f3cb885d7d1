"""Parameters of the pattern atlas (the cache key) and the names of its analysis."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from attnviz.errors import InputError

__all__ = ["ANALYSIS_NAME", "ALGORITHM_VERSION", "Progress", "PatternParams"]

ANALYSIS_NAME = "patterns"


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
