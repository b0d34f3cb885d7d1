"""Localization scores: how much of a head's attention, or of an attribution, falls on the object.

Over the samples whose object mask is not empty (``samples/mask``, on the thumbnail's pixel grid):

* **Energy inside the mask** — the "energy-based pointing game" (Wang, Wang, Du, Yang, Zhang, Ding,
  Mardziel & Hu, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
  CVPR Workshops 2020, Sec. 5.2, there with bounding boxes): for a non-negative map ``L`` over the image,
  ``E = sum_{pixels in the mask} L / sum_{all pixels} L``.
* **Pointing game** (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by
  Excitation Backprop", IJCV 2018, Sec. 5.1): a hit when the map's maximum point lies on the object,
  with a tolerance of 15 pixels; the score is the hit rate ``hits / (hits + misses)``. Here the
  tolerance is 15 px at a 224-px image, scaled to the thumbnail (``15 * max(h, w) / 224``).

The map of a head: the attention of the first prefix token (CLS) over the patch keys, renormalised over
the patches (mass on prefix tokens has no position); for a stack without prefix tokens (SigLIP) the
attention each patch receives, averaged over all patch queries. A patch map is spread evenly over the
thumbnail pixels whose centres fall in the patch (nearest-neighbour upsampling), so its energy is
``sum_p a_p m_p`` with ``m_p`` the fraction of patch p's pixels on the object, and its maximum point is
the centre of the strongest patch. An attribution is compared at the thumbnail's resolution (pixel
maps box-averaged down, patch maps spread like attention); a signed attribution (integrated gradients,
occlusion) counts its positive part, the evidence for the target.

Baselines: a uniform map has energy equal to the object's area share, and a uniformly random point hits
with probability equal to the share of pixels within the tolerance of the object; both averaged over the
same samples (``baseline_energy``, ``baseline_pointing``).

Head metrics ``mask_energy`` and ``pointing_hit`` (float ``[n_layers, n_heads]`` of the patch stack) and
``analyses/localization`` (per attribution method and per sample) are stored by ``attnviz analyze``.
Streaming: one batch of samples' maps in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from attnviz.errors import RecordingError
from attnviz.store.reader import Recording, store_refusal
from attnviz.store.schema import STORE_FULL, STORE_ROWS
from attnviz.store.schema import HeadMetricInfo, TokenLayout

__all__ = [
    "ANALYSIS_NAME",
    "ALGORITHM_VERSION",
    "METRIC_INFO",
    "TOLERANCE_AT_224",
    "Localization",
    "patch_coverage",
    "tolerance_px",
    "near_mask",
    "patch_map_scores",
    "pixel_map_scores",
    "head_query_maps",
    "compute_localization",
    "load_localization",
    "analyze_localization",
    "analyze_step",
]

ANALYSIS_NAME = "localization"
ALGORITHM_VERSION = 1
TOLERANCE_AT_224 = 15.0

_WANG = ("Wang et al. (2020), Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks, "
         "CVPR Workshops, Sec. 5.2 (energy-based pointing game; here with object masks)")
_ZHANG = ("Zhang, Bargal, Lin, Brandt, Shen & Sclaroff (2018), Top-down Neural Attention by Excitation Backprop, "
          "IJCV, Sec. 5.1 (pointing game, 15-pixel tolerance)")

METRIC_INFO: dict[str, HeadMetricInfo] = {
    "mask_energy": HeadMetricInfo(
        name="mask_energy",
        definition="mean over images with an object mask of sum_p a_p m_p, a = the head's CLS attention over the "
                   "patches renormalised to sum 1 (no CLS: the attention each patch receives, averaged over patch "
                   "queries), m_p = share of patch p on the object",
        citation=_WANG, units="", higher_is_more_important=True),
    "pointing_hit": HeadMetricInfo(
        name="pointing_hit",
        definition="share of images with an object mask where the centre of the head's strongest patch (same map "
                   "as mask_energy) lies within 15 px (at 224 px) of the object",
        citation=_ZHANG, units="", higher_is_more_important=True),
}


def _patch_index(shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """int ``[h, w]``: the row-major patch whose area holds each thumbnail pixel's centre."""
    h, w = shape
    gh, gw = grid
    rows = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(np.int64), gh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(np.int64), gw - 1)
    return rows[:, None] * gw + cols[None, :]


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """float ``[gh * gw]``: the share of each patch's thumbnail pixels that are on the object."""
    idx = _patch_index(mask.shape, grid).ravel()
    on = (np.asarray(mask) > 0).ravel().astype(np.float64)
    n = grid[0] * grid[1]
    return np.bincount(idx, weights=on, minlength=n) / np.maximum(np.bincount(idx, minlength=n), 1)


def tolerance_px(shape: tuple[int, int]) -> float:
    """The pointing game's tolerance on a thumbnail of ``shape``: 15 px at 224, scaled."""
    return TOLERANCE_AT_224 * max(shape) / 224.0


def near_mask(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """bool ``[h, w]``: pixels within ``tolerance`` pixels (Euclidean, centre to centre) of the object."""
    from scipy.ndimage import distance_transform_edt

    on = np.asarray(mask) > 0
    if not on.any():
        return np.zeros(on.shape, bool)
    return distance_transform_edt(~on) <= tolerance


def _patch_centres(shape: tuple[int, int], grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail pixel (row, col) nearest each patch's centre, ``[gh * gw]`` each."""
    h, w = shape
    gh, gw = grid
    r = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(np.int64), h - 1)
    c = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(np.int64), w - 1)
    return np.repeat(r, gw), np.tile(c, gh)


def patch_map_scores(maps: np.ndarray, coverage: np.ndarray, hit_zone: np.ndarray,
                     grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Energy and pointing hit of patch maps.

    Args:
        maps: float ``[..., gh * gw]``, non-negative (need not sum to 1).
        coverage: ``[gh * gw]`` from :func:`patch_coverage`.
        hit_zone: bool ``[h, w]`` from :func:`near_mask`.

    Returns:
        (energy float ``[...]``, hit bool ``[...]``); energy is NaN for an all-zero map.
    """
    a = np.clip(np.asarray(maps, np.float64), 0.0, None)
    total = a.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        energy = np.where(total > 0, (a * coverage).sum(-1) / np.where(total > 0, total, 1.0), np.nan)
    rows, cols = _patch_centres(hit_zone.shape, grid)
    hit = hit_zone[rows, cols][a.argmax(-1)]
    return energy, hit


def pixel_map_scores(values: np.ndarray, mask: np.ndarray, hit_zone: np.ndarray) -> tuple[float, bool]:
    """Energy and pointing hit of one attribution at the thumbnail's resolution (``[h, w]``, its positive
    part). Energy is NaN for a map without positive values."""
    a = np.clip(np.asarray(values, np.float64), 0.0, None)
    total = a.sum()
    if total <= 0:
        return float("nan"), False
    energy = float(a[np.asarray(mask) > 0].sum() / total)
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    return energy, bool(hit_zone[r, c])


def head_query_maps(maps: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """The map each head is scored on: float ``[layer, head, gh * gw]`` from one sample's maps
    ``[layer, head, tokens, tokens]``: the CLS row over the patch keys (renormalised), or without prefix
    tokens the attention each patch key receives, averaged over the patch queries."""
    p0, n = layout.n_prefix, layout.n_patches
    a = np.asarray(maps, np.float64)
    if p0:
        rows = a[:, :, 0, p0 : p0 + n]
    else:
        rows = a[:, :, p0 : p0 + n, p0 : p0 + n].mean(2)
    total = rows.sum(-1, keepdims=True)
    return rows / np.where(total > 0, total, 1.0)


def _to_thumbnail(values: np.ndarray, shape: tuple[int, int], resolution: str, grid: tuple[int, int]) -> np.ndarray:
    """An attribution ``[H, W]`` (pixel, model input) or ``[gh, gw]`` (patch) on the thumbnail grid ``shape``."""
    v = np.asarray(values, np.float64)
    if resolution == "patch":
        return v.reshape(-1)[_patch_index(shape, grid)]
    if v.shape == tuple(shape):
        return v
    from PIL import Image

    pos = np.clip(v, 0.0, None).astype(np.float32)  # the positive part, box-averaged down
    return np.asarray(Image.fromarray(pos, mode="F").resize((shape[1], shape[0]), Image.Resampling.BOX), np.float64)


@dataclass
class Localization:
    """Localization scores of one recording (module docstring); ``n_images`` images had a non-empty mask.

    Attributes:
        kind: the attention stack scored.
        energy, hit: float ``[layer, head]``: mean energy, hit rate per head.
        method_energy, method_hit: attribution method -> float (mean over the same images).
        baseline_energy, baseline_pointing: what a uniform map / a random point scores.
        samples: int ``[n_images]``: the images used; image_energy float32 ``[n_images, layer, head]``.
    """

    kind: str
    n_images: int
    energy: np.ndarray
    hit: np.ndarray
    baseline_energy: float
    baseline_pointing: float
    method_energy: dict[str, float] = field(default_factory=dict)
    method_hit: dict[str, float] = field(default_factory=dict)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_energy: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))
    params: dict[str, Any] = field(default_factory=dict)


def _kind(rec: Recording, kind: str | None) -> str | None:
    if kind is not None:
        return kind
    return next((k for k in rec.kinds() if rec.layout(k).grid is not None), None)


def localization_refusal(rec: Recording, kind: str | None = None) -> str | None:
    """Why the scores cannot be computed from what ``rec`` stores (None: they can). A ``--store rows`` recording
    keeps every sample's CLS row, all a head's map needs here; without prefix tokens the map averages every patch
    query, which needs full maps; a summary keeps no rows."""
    kind = _kind(rec, kind)
    allowed = (STORE_FULL, STORE_ROWS) if kind is not None and rec.layout(kind).n_prefix else (STORE_FULL,)
    return store_refusal(rec, "the localization analysis" + ("" if STORE_ROWS in allowed else " (without a CLS token)"),
                         allowed)


def compute_localization(rec: Recording, kind: str | None = None, *, batch_size: int = 8,
                         progress: Callable[[int], None] | None = None) -> Localization | None:
    """Score every head and every stored attribution on the samples with an object mask.

    Returns:
        :class:`Localization`, or None when the recording has no masks, no patch stack, or no
        sample with a non-empty mask.
    """
    kind = _kind(rec, kind)
    if kind is None or not rec.has_masks or rec.n_samples == 0:
        return None
    lay = rec.layout(kind)
    grid = tuple(int(g) for g in lay.grid)
    n_layers, n_heads = rec.stack_shape(kind)
    methods = [m for m in rec.attribution_methods()]
    used: list[int] = []
    image_energy: list[np.ndarray] = []
    hits = np.zeros((n_layers, n_heads))
    base_e = base_p = 0.0
    m_energy = {m: [] for m in methods}
    m_hit = {m: [] for m in methods}
    resolutions = {m: rec.attribution_info(m).resolution for m in methods}
    problem = localization_refusal(rec, kind)
    if problem:
        raise RecordingError(f"{rec.path}: {problem}")
    if rec.store == STORE_ROWS:  # the CLS row is row 0 of every sample's stored rows: all head_query_maps reads
        batches = ((idx, rows) for idx, _, rows in rec.iter_rows(kind, batch_size=batch_size))
    else:
        batches = rec.iter_attention(kind, batch_size=batch_size)
    for idx, batch in batches:
        for j, s in enumerate(idx):
            s = int(s)
            mask = np.asarray(rec.mask(s)) > 0
            if progress is not None:
                progress(1)
            if not mask.any():
                continue
            tol = tolerance_px(mask.shape)
            zone = near_mask(mask, tol)
            cover = patch_coverage(mask, grid)
            q, k = rec.lengths(s, kind)
            energy, hit = patch_map_scores(head_query_maps(batch[j, :, :, :q, :k], lay), cover, zone, grid)
            used.append(s)
            image_energy.append(energy.astype(np.float32))
            hits += hit
            base_e += float(mask.mean())
            base_p += float(zone.mean())
            for m in methods:
                e, h = pixel_map_scores(_to_thumbnail(rec.attribution(s, m), mask.shape, resolutions[m], grid), mask, zone)
                m_energy[m].append(e)
                m_hit[m].append(h)
    n = len(used)
    if n == 0:
        return None
    ie = np.stack(image_energy)
    return Localization(
        kind=kind, n_images=n, energy=np.nanmean(ie, 0) if np.isfinite(ie).any() else np.full((n_layers, n_heads), np.nan),
        hit=hits / n, baseline_energy=base_e / n, baseline_pointing=base_p / n,
        method_energy={m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in m_energy.items()},
        method_hit={m: float(np.mean(v)) for m, v in m_hit.items()},
        samples=np.asarray(used, np.int64), image_energy=ie,
        params={"kind": kind, "n_samples": rec.n_samples, "tolerance_at_224": TOLERANCE_AT_224,
                "algorithm": ALGORITHM_VERSION, "methods": methods})


def save_localization(target: Any, loc: Localization) -> None:
    """Store the head metrics (with the baselines in their definitions) and ``analyses/localization``."""
    from attnviz.store.cache import save_analysis, write_head_metric

    notes = {"mask_energy": f"; uniform attention: {loc.baseline_energy:.3f} (the object's area share) on these "
                            f"{loc.n_images} images",
             "pointing_hit": f"; a random point: {loc.baseline_pointing:.3f} on these {loc.n_images} images"}
    for name, values in (("mask_energy", loc.energy), ("pointing_hit", loc.hit)):
        base = METRIC_INFO[name]
        info = HeadMetricInfo(name=name, kind=loc.kind, definition=base.definition + notes[name], citation=base.citation,
                              units=base.units, higher_is_more_important=True,
                              params={**loc.params, "n_images": loc.n_images, "baseline": loc.baseline_energy
                                      if name == "mask_energy" else loc.baseline_pointing})
        write_head_metric(target, info, values)
    methods = sorted(loc.method_energy)
    save_analysis(target, ANALYSIS_NAME, loc.params, {
        "energy": loc.energy.astype(np.float32), "hit": loc.hit.astype(np.float32),
        "samples": loc.samples.astype(np.int32), "image_energy": loc.image_energy.astype(np.float16),
        "methods": np.array(methods, dtype=object),
        "method_energy": np.array([loc.method_energy[m] for m in methods], np.float32),
        "method_hit": np.array([loc.method_hit[m] for m in methods], np.float32),
    }, attrs={"baseline_energy": loc.baseline_energy, "baseline_pointing": loc.baseline_pointing,
              "n_images": loc.n_images, "kind": loc.kind})


def load_localization(rec: Recording) -> Localization | None:
    """The stored scores of an open recording, or None (not computed, or by an older algorithm)."""
    from attnviz.store import schema as S

    g = rec.analysis_group(ANALYSIS_NAME)
    if g is None or "params" not in g.attrs:
        return None
    params = S.loads(g.attrs["params"])
    if not isinstance(params, dict) or params.get("algorithm") != ALGORITHM_VERSION:
        return None
    methods = [str(m.decode() if isinstance(m, bytes) else m) for m in g["methods"][()]]
    return Localization(
        kind=str(g.attrs["kind"]), n_images=int(g.attrs["n_images"]), energy=g["energy"][()].astype(np.float64),
        hit=g["hit"][()].astype(np.float64), baseline_energy=float(g.attrs["baseline_energy"]),
        baseline_pointing=float(g.attrs["baseline_pointing"]),
        method_energy=dict(zip(methods, g["method_energy"][()].astype(float).tolist())),
        method_hit=dict(zip(methods, g["method_hit"][()].astype(float).tolist())),
        samples=g["samples"][()].astype(np.int64), image_energy=g["image_energy"][()].astype(np.float32),
        params=params)


def analyze_localization(path: str | os.PathLike, *, show_bar: bool = False) -> tuple[Localization | None, bool]:
    """Compute and store the scores of a complete recording unless stored with the same parameters.

    Returns:
        (scores or None when the recording has no usable masks, whether they were computed now).
    """
    with Recording(path) as rec:
        cached = load_localization(rec)
        kind = _kind(rec, None)
        if cached is not None and cached.params.get("n_samples") == rec.n_samples and cached.kind == kind \
                and cached.params.get("methods") == rec.attribution_methods():
            return cached, False
        bar = None
        if show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=rec.n_samples, desc="localization", unit="img", leave=False)
        try:
            loc = compute_localization(rec, kind, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if loc is None:
            return None, False
        save_localization(rec, loc)
    return loc, True


def analyze_step(path: str | os.PathLike, *, show_bar: bool = True) -> list[str]:
    """The ``attnviz analyze`` step: localization scores when the recording has object masks."""
    with Recording(path) as rec:
        problem = localization_refusal(rec) if rec.has_masks else None
    if problem:
        return [f"localization scores skipped: {problem}"]
    loc, computed = analyze_localization(path, show_bar=show_bar)
    if loc is None:
        return ["localization scores skipped: no object masks"]
    best = np.unravel_index(int(np.nanargmax(loc.energy)), loc.energy.shape)
    methods = ", ".join(f"{m} {e:.2f}" for m, e in loc.method_energy.items())
    how = "computed" if computed else "cached, unchanged"
    return [f"localization ({loc.kind}, {loc.n_images} image(s) with masks, {how}): mask energy best head "
            f"L{best[0]} H{best[1]} {loc.energy[best]:.2f}, uniform {loc.baseline_energy:.2f}"
            + (f"; attributions {methods}" if methods else "")]
