"""Dashboard responsiveness on a large recording (run by hand; no timing assertions in tests).

Builds (or takes) a ViT-B-sized recording of at least ``--size-gb`` GB (12 layers x 12 heads,
14x14 patches + CLS, 224 px thumbnails; random row-stochastic maps written through the real
writer), starts the app in-process, and calls the server-side callbacks that fire when the
selection changes, exactly as Dash would (including JSON serialisation of their outputs):

* head switch   (explorer page: overlay, small multiples, CLS map, head grid, sliders, banner)
* sample switch (explorer page: the same plus the attribution/rollout panel)
* query switch  (explorer page: click on a patch -> query callbacks)
* sample switch on the overview page (thumbnail page with outline, sample card, head grid)

Reports p50/p95 per switch type over ``--switches`` random switches, and the process RSS before
and after (memory must not grow with the file size: caches are bounded per recording).

    python benchmarks/dashboard.py --build /tmp/big.h5 --size-gb 2
    python benchmarks/dashboard.py --file /tmp/big.h5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(path: Path, size_gb: float, *, layers: int = 12, heads: int = 12, grid: int = 14, patch: int = 16,
          batch: int = 8, seed: int = 0) -> Path:
    from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout

    t = 1 + grid * grid
    size = grid * patch
    per_sample = layers * heads * t * t * 2  # float16; random maps barely compress with lzf
    n = max(batch, int(math.ceil(size_gb * 1e9 / per_sample / batch)) * batch)
    rng = np.random.default_rng(seed)
    layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(grid, grid), patch_size=(patch, patch),
                         image_size=(size, size))
    labels = np.arange(n) % 10
    w = RecordingWriter.create(
        path, family="vit", model_name="synthetic-vit-b16", model_class="ViTForImageClassification",
        sample_ids=[f"img_{i:05d}.png" for i in range(n)], stacks=[StackSpec("self", layers, heads, t, t, layout)],
        class_names=[f"class{i}" for i in range(10)], labels=labels, thumbnail_shape=(size, size),
        mask_shape=(size, size), attributions=[AttributionSpec("saliency", (size, size), "pixel"),
                                               AttributionSpec("rollout", (grid, grid), "patch")],
        batch_size=batch, compression="lzf", extraction_params={"benchmark": True},
    )
    t0 = time.perf_counter()
    with w:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            x = rng.random((b, layers, heads, t, t), dtype=np.float32) ** 8
            x /= x.sum(-1, keepdims=True)
            preds = labels[start : start + b].copy()
            preds[rng.random(b) < 0.2] += 1
            preds %= 10
            logits = rng.standard_normal((b, 10)).astype(np.float32)
            logits[np.arange(b), preds] += 4
            masks = np.zeros((b, size, size), np.uint8)
            masks[:, size // 4 : size // 2, size // 4 : size // 2] = 1
            w.write(SampleBatch(
                start=start, attention={"self": x}, predictions=preds, logits=logits,
                thumbnails=rng.integers(0, 255, (b, size, size, 3), dtype=np.uint8), masks=masks,
                attributions={"saliency": rng.standard_normal((b, size, size)).astype(np.float32),
                              "rollout": rng.random((b, grid, grid)).astype(np.float32)}))
            print(f"\rbuilding {path}: {start + b}/{n} samples", end="", file=sys.stderr, flush=True)
        w.finish()
    print(f"\nbuilt {path} ({path.stat().st_size / 1e9:.2f} GB, {n} samples) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return path


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, help="an existing recording")
    ap.add_argument("--build", type=Path, help="build a synthetic recording here (reused if it exists)")
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--switches", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.file is None and args.build is None:
        ap.error("give --file or --build")
    path = args.file or (args.build if args.build.exists() else build(args.build, args.size_gb))

    import plotly.io as pio

    from attnviz.app import create_app

    app = create_app([path])
    from attnviz.app.pages import explorer, overview
    from attnviz.app.registry import get_recording
    from attnviz.app.shell import banner

    rec = get_recording(path.name)
    n_layers, n_heads = rec.stack_shape()
    lay = rec.layout()
    size_gb = path.stat().st_size / 1e9
    print(f"{path} {size_gb:.2f} GB: {rec.n_samples} samples, {n_layers}x{n_heads} heads, "
          f"{lay.n_tokens} tokens", flush=True)

    def serialise(out):
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if hasattr(o, "to_plotly_json"):
                pio.to_json(o, validate=False) if hasattr(o, "layout") else None
        return outs

    def explorer_callbacks(data, *, sample_changed: bool):
        serialise(explorer.overlay(data))
        serialise(explorer.multiples(data))
        serialise(explorer.cls_map(data))
        serialise(explorer.sliders_from_selection(data))
        serialise(explorer.grid.options(data, "entropy"))
        serialise(explorer.grid.figure(data, "entropy"))
        serialise(banner(data))
        serialise(explorer.raw(data, []))
        if sample_changed:
            serialise(explorer.attributions(data))

    def overview_callbacks(data):
        serialise(overview.thumbs(data, "correctness", None, "all", 1))
        serialise(overview.sample_card(data))
        serialise(overview.card(data))
        serialise(overview.grid.figure(data, "entropy"))

    rng = np.random.default_rng(args.seed)
    sel = {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": None}
    # warm-up: first request of each kind (imports, live head stats on 8 samples, first thumbnail page)
    t0 = time.perf_counter()
    explorer_callbacks(sel, sample_changed=True)
    overview_callbacks(sel)
    warm = time.perf_counter() - t0
    before = rss_mb()
    print(f"warm-up (first page loads, live head statistics): {warm:.2f} s; RSS {before:.0f} MB", flush=True)

    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def run(name, change, fn):
        times, cpus = [], []
        for _ in range(args.switches):
            change(sel)
            t, c = time.perf_counter(), time.thread_time()
            fn(sel)
            cpus.append(time.thread_time() - c)
            times.append(time.perf_counter() - t)
        results[name] = times
        cpu[name] = cpus

    def new_head(d):
        d["layer"], d["head"] = int(rng.integers(n_layers)), int(rng.integers(n_heads))

    def new_sample(d):
        d["sample"] = int(rng.integers(rec.n_samples))

    def new_query(d):
        cell = (int(rng.integers(lay.grid[0])), int(rng.integers(lay.grid[1])))
        click = {"points": [{"x": (cell[1] + 0.5) * lay.patch_size[1], "y": (cell[0] + 0.5) * lay.patch_size[0]}]}
        p = explorer.query_from_click(click, d)
        d["query"] = p.to_plotly_json()["operations"][0]["params"]["value"]

    run("head switch (explorer)", new_head, lambda d: explorer_callbacks(d, sample_changed=False))
    run("query switch (explorer)", new_query, lambda d: explorer_callbacks(d, sample_changed=False))
    run("sample switch (explorer)", new_sample, lambda d: explorer_callbacks(d, sample_changed=True))
    run("sample switch (overview)", new_sample, overview_callbacks)
    after = rss_mb()

    print(f"\n{'switch':28s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s} {'cpu p50':>8s} {'cpu p95':>8s}"
          f"   (n={args.switches} each; all callbacks of the page incl. JSON; cpu = this thread's CPU time,"
          f" what an idle machine would take)")
    for name, t in results.items():
        a = np.asarray(t) * 1e3
        c = np.asarray(cpu[name]) * 1e3
        print(f"{name:28s} {np.percentile(a, 50):8.1f} {np.percentile(a, 95):8.1f} {a.max():8.1f} "
              f"{np.percentile(c, 50):8.1f} {np.percentile(c, 95):8.1f}")
    print(f"\nRSS before {before:.0f} MB, after {after:.0f} MB (+{after - before:.0f} MB) on a {size_gb:.2f} GB file")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
