"""Deterministic procedural "shapes" image dataset for the attnviz demo model.

Every image shows one *target* shape (circle, square, triangle, cross or ring) with a jittered,
textured colour fill at a random position, size (circumradius 20-34% of the image side, 13-22 px
at 64: 3-6 patches of 8 px across) and rotation, on a textured noisy background (stripes,
checkerboard, smooth colour noise or a gradient, plus pixel noise). Optionally a few small
*distractor* shapes of random kinds (25-40% of the target's size) are drawn first, placed clear of
the target and of each other; the target is drawn last and is always the largest object. The
label is the kind of the target shape, and the object mask marks the target's pixels (all of them
visible: nothing overlaps the target).

The colours carry no class information, so the class can only be read from the outline of the
target, which spans several 8x8 patches: a model has to combine neighbouring patches.

Everything is vectorised numpy and is a pure function of ``(n, seed, size, ...)``: 10,000 images
of 64x64 take a few seconds on one core. Seeds used by the demo (see ``scripts/README.md``):
train 0, test 1, demo recording 2.

Example::

    from shapes import make_shapes
    data = make_shapes(256, seed=2)     # held-out images for a recording
    data.images.shape                   # (256, 64, 64, 3) uint8
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
"""Class index -> name of the target shape."""

#: Seeds of the three disjoint splits used for the demo model and its recording.
TRAIN_SEED, TEST_SEED, DEMO_SEED = 0, 1, 2

#: Target circumradius range as a fraction of the image side, and distractor size relative to the target.
TARGET_RADIUS: tuple[float, float] = (0.20, 0.34)
DISTRACTOR_SCALE: tuple[float, float] = (0.25, 0.40)

_TRIES = 8  # candidate positions per distractor
_CHUNK = 1024  # images per vectorised block (bounds peak memory at ~ _CHUNK * size^2 * 60 B)


@dataclass(frozen=True)
class ShapesData:
    """A batch of procedural images.

    Attributes:
        images: uint8 array (n, size, size, 3), RGB.
        labels: int64 array (n,), index into ``CLASS_NAMES`` of the target shape.
        masks: bool array (n, size, size), visible pixels of the target shape.
        centers: float32 array (n, 2), target centre as (x, y) in pixels.
        radii: float32 array (n,), target circumradius in pixels.
        seed: the seed the batch was made with.
        CLASS_NAMES: class names, index-aligned with the labels.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    seed: int
    CLASS_NAMES: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _shape_masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray,
                 theta: np.ndarray, size: int) -> np.ndarray:
    """Rasterise one shape per image.

    Args:
        kind: int (m,) class indices; cx, cy, r, theta: float (m,) centre, circumradius, rotation.
        size: image side in pixels.

    Returns:
        bool (m, size, size) masks.
    """
    m = kind.shape[0]
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None].astype(np.float32)   # (m, 1, size)
    dy = coords[None, :, None] - cy[:, None, None].astype(np.float32)   # (m, size, 1)
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u = c * dx + s * dy                                                 # (m, size, size)
    v = -s * dx + c * dy
    rr = r.astype(np.float32)[:, None, None]
    out = np.zeros((m, size, size), dtype=bool)
    for k in range(len(CLASS_NAMES)):
        idx = np.nonzero(kind == k)[0]
        if idx.size == 0:
            continue
        uk, vk, rk = u[idx], v[idx], rr[idx]
        name = CLASS_NAMES[k]
        if name == "circle":
            mk = uk * uk + vk * vk <= (0.85 * rk) ** 2
        elif name == "square":
            mk = np.maximum(np.abs(uk), np.abs(vk)) <= 0.72 * rk
        elif name == "triangle":
            # equilateral triangle with circumradius r: three half-planes at distance r/2
            mk = np.ones_like(uk, dtype=bool)
            for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
                mk &= uk * np.cos(a) + vk * np.sin(a) <= 0.5 * rk
        elif name == "cross":
            w = 0.3 * rk
            au, av = np.abs(uk), np.abs(vk)
            mk = ((au <= w) & (av <= rk)) | ((av <= w) & (au <= rk))
        else:  # ring
            d2 = uk * uk + vk * vk
            mk = (d2 <= rk * rk) & (d2 >= (0.55 * rk) ** 2)
        out[idx] = mk
    return out


def _smooth_noise(rng: np.random.Generator, m: int, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1]: float32 (m, size, size, channels)."""
    low = rng.random((m, channels, cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    w = np.zeros((size, cells + 1), dtype=np.float32)   # bilinear interpolation matrix
    w[np.arange(size), i0] = 1 - f
    w[np.arange(size), i0 + 1] = f
    return np.ascontiguousarray((w @ low @ w.T).transpose(0, 2, 3, 1))


def _texture(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """A random scalar texture per image in [0, 1]: float32 (m, size, size).

    Kinds: stripes (random angle, period, phase), checkerboard (random cell, rotation),
    smooth noise, linear gradient.
    """
    coords = np.arange(size, dtype=np.float32)
    x = coords[None, None, :]
    y = coords[None, :, None]
    kind = rng.integers(0, 4, m)
    ang = rng.uniform(0, np.pi, m).astype(np.float32)[:, None, None]
    period = rng.uniform(4.0, 14.0, m).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, m).astype(np.float32)[:, None, None]
    ca, sa = np.cos(ang), np.sin(ang)
    proj = x * ca + y * sa
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + phase)
    ortho = -x * sa + y * ca
    checker = ((np.floor(proj / period + phase) + np.floor(ortho / period)) % 2).astype(np.float32)
    noise = _smooth_noise(rng, m, size, 6, 1)[..., 0]
    gradient = (proj - proj.min(axis=(1, 2), keepdims=True)) / (np.ptp(proj, axis=(1, 2), keepdims=True) + 1e-6)
    tex = np.select([kind[:, None, None] == 0, kind[:, None, None] == 1, kind[:, None, None] == 2],
                    [stripes, checker, noise], gradient)
    return tex.astype(np.float32)


def _random_colours(rng: np.random.Generator, m: int, saturated: bool) -> np.ndarray:
    """float32 (m, 3) RGB in [0, 1]; saturated colours for objects, muted ones for backgrounds."""
    if saturated:
        c = rng.random((m, 3), dtype=np.float32)
        # push one channel high and one low so objects are vivid
        order = np.argsort(rng.random((m, 3)), axis=1)
        rows = np.arange(m)
        c[rows, order[:, 0]] = rng.uniform(0.75, 1.0, m)
        c[rows, order[:, 1]] = rng.uniform(0.0, 0.3, m)
        return c
    grey = rng.uniform(0.2, 0.8, (m, 1)).astype(np.float32)
    return np.clip(grey + rng.normal(0, 0.15, (m, 3)).astype(np.float32), 0, 1)


def _make_chunk(rng: np.random.Generator, m: int, size: int, n_distractors: int,
                min_radius: float, max_radius: float, distractor_scale: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """One vectorised block; see ``make_shapes``."""
    # background: two muted colours mixed by a texture, plus smooth colour noise
    tex = _texture(rng, m, size)[..., None]
    c0, c1 = _random_colours(rng, m, False), _random_colours(rng, m, False)
    img = c0[:, None, None, :] * (1 - tex) + c1[:, None, None, :] * tex
    img += (_smooth_noise(rng, m, size, 4, 3) - 0.5) * 0.3

    # the target first (it is drawn last, on top), so that distractors can be kept clear of it
    radius = rng.uniform(min_radius, max_radius, m).astype(np.float32)
    labels = rng.integers(0, len(CLASS_NAMES), m)
    margin = radius * 0.9
    cx = rng.uniform(margin, size - margin).astype(np.float32)
    cy = rng.uniform(margin, size - margin).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, m)

    ndis = rng.integers(0, n_distractors + 1, m) if n_distractors > 0 else np.zeros(m, np.int64)
    placed: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = [(cx, cy, radius, np.ones(m, bool))]
    lo_s, hi_s = distractor_scale
    for d in range(n_distractors):
        k = rng.integers(0, len(CLASS_NAMES), m)
        rd = (radius * rng.uniform(lo_s, hi_s, m)).astype(np.float32)
        # up to _TRIES candidate centres per image; keep the first whose circumcircle (plus a 2-px gap)
        # is clear of the target and of the distractors placed so far; no free spot: no distractor
        ux = rng.uniform(0, 1, (_TRIES, m))
        uy = rng.uniform(0, 1, (_TRIES, m))
        ox = rd + ux * (size - 2 * rd)
        oy = rd + uy * (size - 2 * rd)
        free = np.ones((_TRIES, m), bool)
        for px, py, pr, pa in placed:
            free &= ~pa | ((ox - px) ** 2 + (oy - py) ** 2 >= (pr + rd + 2.0) ** 2)
        first = np.argmax(free, axis=0)
        rows = np.arange(m)
        ok = free[first, rows] & (ndis > d)
        dx, dy = ox[first, rows].astype(np.float32), oy[first, rows].astype(np.float32)
        mk = _shape_masks(k, dx, dy, rd, rng.uniform(0, 2 * np.pi, m), size) & ok[:, None, None]
        col = _random_colours(rng, m, True)
        img = np.where(mk[..., None], col[:, None, None, :], img)
        placed.append((dx, dy, rd, ok))

    mask = _shape_masks(labels, cx, cy, radius, theta, size)
    # textured fill: object colour modulated by its own stripes/noise texture
    ftex = _texture(rng, m, size)[..., None]
    col = _random_colours(rng, m, True)[:, None, None, :]
    fill = col * (0.7 + 0.3 * ftex)
    img = np.where(mask[..., None], fill, img)

    img += 0.04 * rng.standard_normal(img.shape, dtype=np.float32)
    images = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    centers = np.stack([cx, cy], axis=1).astype(np.float32)
    return images, labels.astype(np.int64), mask, centers, radius


def make_shapes(n: int, seed: int, size: int = 64, n_distractors: int = 2,
                min_radius: float | None = None, max_radius: float | None = None,
                distractor_scale: tuple[float, float] = DISTRACTOR_SCALE) -> ShapesData:
    """Make ``n`` images deterministically from ``seed``.

    Args:
        n: number of images.
        seed: seed of ``numpy.random.default_rng``; the same ``(n, seed, size, ...)`` always
            gives the same arrays. Different seeds give independent images.
        size: image side in pixels.
        n_distractors: at most this many small distractor shapes (uniform 0..n_distractors per
            image) of random kinds, placed clear of the target and of each other (an image where
            no free spot is found gets fewer). 0 gives one object per image.
        min_radius, max_radius: target circumradius range in pixels; default
            ``TARGET_RADIUS`` = 20%-34% of ``size`` (13-22 px at 64: the target spans 3-6 patches of 8 px).
        distractor_scale: distractor circumradius as a fraction of the target's, uniform in this range.

    Returns:
        ShapesData with images uint8 (n, size, size, 3), labels int64 (n,), masks bool
        (n, size, size), centers float32 (n, 2), radii float32 (n,).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    lo = TARGET_RADIUS[0] * size if min_radius is None else float(min_radius)
    hi = TARGET_RADIUS[1] * size if max_radius is None else float(max_radius)
    # one independent stream per chunk so the result does not depend on memory limits
    seq = np.random.SeedSequence(seed)
    n_chunks = max(1, -(-n // _CHUNK))
    streams = seq.spawn(n_chunks)
    parts = []
    for i in range(n_chunks):
        m = min(_CHUNK, n - i * _CHUNK)
        if m <= 0:
            break
        parts.append(_make_chunk(np.random.default_rng(streams[i]), m, size, n_distractors, lo, hi,
                                 (float(distractor_scale[0]), float(distractor_scale[1]))))
    if not parts:
        parts = [(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64),
                  np.zeros((0, size, size), bool), np.zeros((0, 2), np.float32), np.zeros(0, np.float32))]
    images, labels, masks, centers, radii = (np.concatenate(p) for p in zip(*parts))
    return ShapesData(images=images, labels=labels, masks=masks, centers=centers, radii=radii, seed=seed)


def save_preview(path: str, data: ShapesData, cols: int = 8, rows: int = 4) -> None:
    """Write a grid of the first ``cols*rows`` images to ``path`` (PNG, needs Pillow)."""
    from PIL import Image

    k = min(len(data), cols * rows)
    s = data.images.shape[1]
    grid = np.full((rows * (s + 2), cols * (s + 2), 3), 255, np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        grid[r * (s + 2):r * (s + 2) + s, c * (s + 2):c * (s + 2) + s] = data.images[i]
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    import argparse
    import time

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--preview", help="write a PNG grid of the first images here")
    a = p.parse_args()
    t = time.perf_counter()
    d = make_shapes(a.n, a.seed, a.size)
    print(f"{len(d)} images {d.images.shape} in {time.perf_counter() - t:.2f} s; "
          f"class counts {np.bincount(d.labels, minlength=len(CLASS_NAMES)).tolist()}; "
          f"mean object fraction {d.masks.mean():.3f}")
    if a.preview:
        save_preview(a.preview, d)
