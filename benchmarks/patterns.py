"""The pattern atlas end to end: 50,000 query-centred maps of 27x27 (run by hand).

Builds (or reuses) a synthetic recording of a 12-layer x 12-head model on a 14x14 patch grid with CLS
(197 tokens) through the real ``RecordingWriter``, then, in a fresh subprocess (so the numbers are
those of ``attnviz analyze --patterns``: imports, numba compilation of UMAP and all), runs
:func:`attnviz.analysis.patterns.compute_patterns` with ``--max-maps`` maps (default 50,000: the
stratified sample reads every image and keeps 347 maps per head) and reports the time of each stage
(reading, autoencoder training, encoding, UMAP, clustering) in wall and CPU seconds, the totals,
the peak RSS of the process, and how loaded the machine was (load average before and after, threads
used). On a shared machine the CPU seconds are the steadier number: wall time grows with the load.

    python benchmarks/patterns.py                      # 50,000 maps, recording in /tmp/attnviz-bench
    python benchmarks/patterns.py --maps 20000 --keep  # smaller; keep the recording for a rerun
    python benchmarks/patterns.py --device cuda        # train on a GPU

Target (issue 6): <= 3 minutes for 50,000 maps on a 2-core CPU.

The maps are built to have patterns to find: each head is one of six families (local Gaussian of a
head-specific width, a fixed offset, uniform, CLS, a row band, a column band) or a blend of two, a
softmax over keys; each image multiplies the keys by its own log-normal gains before renormalising,
so every map differs.
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

GRID = (14, 14)
PATCH = 16
LAYERS = HEADS = 12
TOKENS = 1 + GRID[0] * GRID[1]


def head_logits(rng: np.random.Generator, family: str) -> np.ndarray:
    """float ``[T, T]`` logits of one head of ``family`` (query rows, key columns, CLS first)."""
    y, x = np.divmod(np.arange(GRID[0] * GRID[1]), GRID[1])
    dy = y[None, :] - y[:, None]
    dx = x[None, :] - x[:, None]
    lg = np.full((TOKENS, TOKENS), -4.0)
    patches = lg[1:, 1:]
    if family == "local":
        width = rng.uniform(0.6, 2.0)
        patches[:] = -(dy**2 + dx**2) / (2 * width**2)
    elif family == "offset":
        oy, ox = rng.integers(-2, 3, 2)
        patches[:] = np.where((dy == oy) & (dx == ox), 6.0, 0.0)
    elif family == "uniform":
        patches[:] = 0.0
    elif family == "cls":
        lg[1:, 0] = 6.0
        patches[:] = 0.0
    elif family == "row":
        patches[:] = np.where(dy == 0, 4.0, 0.0)
    elif family == "column":
        patches[:] = np.where(dx == 0, 4.0, 0.0)
    lg[0] = rng.normal(0, 1, TOKENS)  # the CLS query looks anywhere
    return lg


def base_logits(rng: np.random.Generator) -> np.ndarray:
    """float32 ``[layer, head, T, T]``: each head a family or a blend of two."""
    families = ("local", "offset", "uniform", "cls", "row", "column")
    out = np.empty((LAYERS, HEADS, TOKENS, TOKENS), np.float32)
    for layer in range(LAYERS):
        for head in range(HEADS):
            a = head_logits(rng, families[rng.integers(len(families))])
            if rng.random() < 0.3:
                b = head_logits(rng, families[rng.integers(len(families))])
                a = np.logaddexp(a, b)
            out[layer, head] = a
    return out


def build(path: Path, n_images: int, seed: int = 0) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout

    rng = np.random.default_rng(seed)
    logits = base_logits(rng)
    size = (GRID[0] * PATCH, GRID[1] * PATCH)
    layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=GRID, patch_size=(PATCH, PATCH), image_size=size)
    w = RecordingWriter.create(
        path, family="vit", model_name="synthetic-vit-b16", model_class="ViTForImageClassification",
        sample_ids=[f"img_{i:04d}.png" for i in range(n_images)],
        stacks=[StackSpec("self", LAYERS, HEADS, TOKENS, TOKENS, layout)], class_names=("a", "b"),
        labels=np.arange(n_images) % 2, thumbnail_shape=size, batch_size=4, compression="lzf",
        extraction_params={"synthetic": True, "benchmark": "patterns"})
    t0 = time.perf_counter()
    with w:
        for start in range(0, n_images, 4):
            b = min(4, n_images - start)
            gains = rng.normal(0, 0.5, (b, 1, 1, 1, TOKENS)).astype(np.float32)
            lg = logits[None] + gains
            lg -= lg.max(-1, keepdims=True)
            maps = np.exp(lg)
            maps /= maps.sum(-1, keepdims=True)
            w.write(SampleBatch(start=start, attention={"self": maps.astype(np.float16)},
                                predictions=np.zeros(b, np.int64), logits=np.zeros((b, 2), np.float32),
                                thumbnails=np.zeros((b, *size, 3), np.uint8)))
        w.finish()
    print(f"built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s", flush=True)


CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
from attnviz.analysis.patterns import PatternParams, compute_patterns
from attnviz.analysis.threads import default_threads
threads = default_threads()
params = PatternParams(max_maps=int(sys.argv[2]))
atlas = compute_patterns(sys.argv[1], params, device=sys.argv[3], force=True, show_bar=sys.stderr.isatty())
ru = resource.getrusage(resource.RUSAGE_SELF)
out = {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024,
       "threads": threads, "summary": atlas.summary}
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", type=int, default=50_000, help="maps in the atlas (default 50,000)")
    ap.add_argument("--images", type=int, default=48, help="images in the synthetic recording (default 48)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/attnviz-bench"), help="where the recording goes")
    ap.add_argument("--device", default="cpu", help="autoencoder device (default cpu)")
    ap.add_argument("--keep", action="store_true", help="keep the recording (reused by the next run)")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"patterns_{args.images}img.h5"
    if not path.exists():
        build(path, args.images)
    load_before = os.getloadavg()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.maps), args.device], env=env,
                          stdout=subprocess.PIPE, text=True, check=True, timeout=args.timeout)
    load_after = os.getloadavg()
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    s = res["summary"]
    sec, cpu = s["seconds"], s["cpu_seconds"]
    print(f"{s['n_maps']} maps of {s['map_shape'][0]}x{s['map_shape'][1]} ({LAYERS}x{HEADS} heads, {args.images} images), "
          f"autoencoder on {s['device']} with {res['threads']} thread(s)")
    print(f"  wall (CPU) seconds: read {sec['read']:.1f} ({cpu['read']:.1f}) | train {sec['train']:.1f} "
          f"({cpu['train']:.1f}; {s['epochs_run']} epochs on {s['n_train_maps']} maps, best {s['best_epoch'] + 1}) | "
          f"encode {sec['encode']:.1f} ({cpu['encode']:.1f}) | UMAP {sec['umap']:.1f} ({cpu['umap']:.1f}) | "
          f"clusters {sec['cluster']:.1f} ({cpu['cluster']:.1f}; {s['n_clusters']}, {s['clusters_chosen_by']})")
    print(f"  compute_patterns {sec['total']:.1f} s wall, {cpu['total']:.1f} s CPU; whole process (imports, save) "
          f"{res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU; peak RSS {res['peak_rss_mib']:.0f} MiB")
    print(f"  reconstruction error {s['reconstruction_error']:.4g} ({s['explained']:.0%} of the mean-map error explained)")
    print(f"  load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min; {os.cpu_count()} cores)")
    print(json.dumps({"result": res, "load_before": load_before, "load_after": load_after}))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True) if args.dir.name == "attnviz-bench" else path.unlink()


if __name__ == "__main__":
    main()
