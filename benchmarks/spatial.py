"""Spatial attention profiles at ViT-B/16 scale: time and peak memory, streaming (run by hand).

Builds (or reuses) a synthetic recording of ``--images`` images (default 1,000) of a 12-layer x
12-head model on a 14x14 grid with CLS (197 tokens; 1000 x 144 x 197 x 197 float16 = 11.2 GB of
maps before compression) through the real ``RecordingWriter`` (lzf), then, in a fresh subprocess
per run, times :func:`attnviz.analysis.spatial.compute_spatial` over the first N images and records
its peak memory (tracemalloc peak of Python/numpy allocations, and the process's peak RSS), to show
that memory stays at one batch of maps whatever N is. Then times the cache write/read and the
Spatial page's callbacks on the result.

    python benchmarks/spatial.py                          # 1,000 images in /tmp/attnviz-bench
    python benchmarks/spatial.py --images 200 --dir /data # smaller / elsewhere
    python benchmarks/spatial.py --keep                   # keep the recording for a rerun

The maps look like a ViT's: each head is a softmax over keys of a Gaussian of the patch distance
(width growing with depth and differing between heads, some heads global from layer 0) plus a CLS
logit, and each image multiplies the keys by its own random gains (log-normal) before
renormalising, so every map is different. float16 mantissas of such maps compress little with lzf,
like real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = (14, 14)
PATCH = 16
LAYERS = HEADS = 12
TOKENS = 1 + GRID[0] * GRID[1]


def base_maps(rng: np.random.Generator) -> np.ndarray:
    """float32 ``[layer, head, T, T]``: the shared structure of every image's maps."""
    y, x = np.divmod(np.arange(GRID[0] * GRID[1]), GRID[1])
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    out = np.empty((LAYERS, HEADS, TOKENS, TOKENS), np.float32)
    for layer in range(LAYERS):
        for head in range(HEADS):
            width = 0.7 + 0.6 * layer * rng.uniform(0.5, 1.5)
            if rng.random() < 0.25:  # some heads look far even early on
                width = 30.0
            cls_logit = rng.normal(-1.0 + 0.4 * layer, 1.0)
            logits = np.empty((TOKENS, TOKENS))
            logits[1:, 1:] = -d2 / (2 * width**2)
            logits[1:, 0] = cls_logit
            logits[0, :] = rng.normal(0, 1, TOKENS)  # the CLS query: anywhere
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            out[layer, head] = p / p.sum(1, keepdims=True)
    return out


def build(path: Path, n_images: int, batch_size: int) -> float:
    from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout

    rng = np.random.default_rng(0)
    base = base_maps(rng)
    size = (GRID[0] * PATCH, GRID[1] * PATCH)
    layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=GRID, patch_size=(PATCH, PATCH), image_size=size)
    t0 = time.perf_counter()
    w = RecordingWriter.create(
        path, family="vit", model_name="synthetic-vit-b16", model_class="ViTForImageClassification",
        sample_ids=[f"img_{i:05d}.png" for i in range(n_images)],
        stacks=[StackSpec("self", LAYERS, HEADS, TOKENS, TOKENS, layout)], class_names=["a", "b"],
        labels=np.zeros(n_images, int), thumbnail_shape=(32, 32), batch_size=batch_size, compression="lzf",
        overwrite=True)
    with w:
        for start in range(0, n_images, batch_size):
            b = min(batch_size, n_images - start)
            gains = rng.lognormal(0.0, 0.7, (b, LAYERS, 1, 1, TOKENS)).astype(np.float32)
            maps = base[None] * gains
            maps /= maps.sum(-1, keepdims=True)
            w.write(SampleBatch(start=start, attention={"self": maps.astype(np.float16)},
                                predictions=np.zeros(b, int), logits=np.zeros((b, 2), np.float32),
                                thumbnails=np.zeros((b, 32, 32, 3), np.uint8)))
            print(f"\rwriting {start + b}/{n_images}", end="", file=sys.stderr, flush=True)
        w.finish()
    print(file=sys.stderr)
    return time.perf_counter() - t0


def _peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM: reset at exec, unlike getrusage's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str, n_images: int, batch_size: int) -> dict:
    """One streaming run in this (fresh) process: time, tracemalloc peak, peak RSS."""
    import tracemalloc

    import attnviz
    from attnviz.analysis import spatial as sp

    read_s = 0.0
    compute_s = 0.0
    with attnviz.open(path) as rec:
        geom = sp.PatchGeometry.from_layout(rec.layout("self"))
        rss_before = _peak_rss_mb()
        tracemalloc.start()
        t0 = time.perf_counter()
        acc = sp._Accumulator(geom, LAYERS, HEADS)
        it = rec.iter_attention("self", samples=np.arange(n_images), batch_size=batch_size)
        while True:
            t = time.perf_counter()
            try:
                idx, maps = next(it)
            except StopIteration:
                break
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            acc.add(idx, maps)
            del maps  # as compute_spatial does: the next read must not overlap this batch
            compute_s += time.perf_counter() - t
        result = acc.result("self")
        total = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # the public entry point gives the same numbers (checked on the first images)
        check = sp.compute_spatial(rec, batch_size=batch_size, max_samples=min(n_images, 16))
        np.testing.assert_allclose(check.image_mean_distance, result.image_mean_distance[: check.n_samples], rtol=1e-6)
    batch_bytes = batch_size * LAYERS * HEADS * TOKENS * TOKENS * 2
    return {"images": n_images, "batch_size": batch_size, "seconds": total, "read_seconds": read_s,
            "compute_seconds": compute_s, "tracemalloc_peak_mb": peak / 2**20, "batch_of_maps_mb": batch_bytes / 2**20,
            "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before,
            "mean_distance_layer0_px": float(result.mean_distance[0].mean()),
            "mean_distance_layer11_px": float(result.mean_distance[-1].mean())}


def page_timings(path: Path) -> dict:
    """Cache write/read and the Spatial page's callbacks on the big recording."""
    from attnviz.analysis.spatial import analyze_spatial

    t = time.perf_counter()
    _, computed = analyze_spatial(path, max_samples=None)  # computes and caches (or reuses)
    analyze_s = time.perf_counter() - t
    t = time.perf_counter()
    _, again = analyze_spatial(path)
    reuse_s = time.perf_counter() - t
    assert computed and not again
    from attnviz.app import create_app

    create_app([path])
    from attnviz.app.pages import spatial as page

    data = {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None}
    calls = {
        "trends": lambda d: page.trends(d, "mean", "raw"),
        "head_views": lambda d: page.head_views(d, "mean", [], "raw"),
        "layer_views": lambda d: page.layer_views(d, "mean", "chebyshev", "strength"),
        "image_vs_mean": lambda d: page.image_vs_mean(d, "raw"),
        "head_views_selected_image": lambda d: page.head_views(d, "image", [], "raw"),
    }
    out: dict = {"analyze_with_cache_write_s": analyze_s, "analyze_reusing_cache_s": reuse_s}
    rng = np.random.default_rng(1)
    for name, fn in calls.items():
        fn(data)  # warm-up (first figure of its kind, memoised cache read)
        times = []
        for _ in range(20):
            d = dict(data, sample=int(rng.integers(1000 if "image" not in name else 20)),
                     layer=int(rng.integers(LAYERS)), head=int(rng.integers(HEADS)))
            t = time.perf_counter()
            fn(d)
            times.append(time.perf_counter() - t)
        out[f"{name}_ms_p50"] = 1e3 * float(np.median(times))
        out[f"{name}_ms_max"] = 1e3 * float(np.max(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/attnviz-bench")
    ap.add_argument("--keep", action="store_true", help="keep the recording afterwards")
    ap.add_argument("--measure", nargs=3, metavar=("FILE", "N", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the subprocess
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), int(args.measure[2]))))
        return

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"spatial_{args.images}.h5"
    if not path.exists():
        need = args.images * LAYERS * HEADS * TOKENS * TOKENS * 2
        free = shutil.disk_usage(folder).free
        if free < 1.1 * need:
            sys.exit(f"{folder}: {free / 2**30:.1f} GB free, the recording may need up to {need / 2**30:.1f} GB; "
                     "use --images or --dir")
        write_s = build(path, args.images, args.batch_size)
        print(f"built {path}: {os.path.getsize(path) / 2**30:.2f} GB on disk "
              f"({args.images * LAYERS * HEADS * TOKENS * TOKENS * 2 / 2**30:.2f} GB of maps raw) in {write_s:.0f} s")
    runs = []
    for n in sorted({max(1, args.images // 10), args.images}):
        # a fresh process per run: peak RSS then belongs to that run alone; the OS page cache is warm
        # after the first pass, so run the small one first and report both
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), str(n), str(args.batch_size)],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['images']:>5} images: {r['seconds']:.1f} s ({r['read_seconds']:.1f} s reading + decompressing, "
              f"{r['compute_seconds']:.1f} s computing; {r['images'] / r['seconds']:.1f} img/s); "
              f"tracemalloc peak {r['tracemalloc_peak_mb']:.0f} MB "
              f"(one batch of maps = {r['batch_of_maps_mb']:.0f} MB), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_before_mb']:.0f} MB); "
              f"mean distance layer 0 {r['mean_distance_layer0_px']:.1f} px -> layer 11 "
              f"{r['mean_distance_layer11_px']:.1f} px")
    pt = page_timings(path)
    print("page / cache:", json.dumps({k: round(v, 3) for k, v in pt.items()}))
    print(json.dumps({"runs": runs, "page": pt}))
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
