"""Write and read speed of the recording format, lzf vs gzip vs none (run by hand).

Writes a ViT-B/16-sized recording (default 64 samples x 12 layers x 12 heads x 197 x 197 float16
maps, 715 MB before compression) through the real ``RecordingWriter`` (background thread, batches of
8), then reads single maps back through ``attnviz.open``: one (sample, layer, head) map each, in
random order, never the same chunk twice (so HDF5's chunk cache never helps; the OS page cache does,
as it would for a file just written or read before).

    python benchmarks/store_io.py                     # all three compressions
    python benchmarks/store_io.py --samples 16 --compression lzf

"MB/s" is wall-clock throughput, "CPU MB/s" per CPU second (the cost on a core: meaningful also on a
busy machine). "read" is one ``rec.attention(s, l, h)``: float32 [197, 197].

The maps are softmax rows of Gaussian scores (scale 2 by default; ``--scale 5`` gives sharper maps
with many near-zero weights, which compress better), like real attention: noisy float16 mantissas
that compress little. One batch of maps is generated and written for every
batch (each chunk is compressed on its own, so repeating content across chunks changes nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import attnviz
from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout


def softmax_maps(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 2.0) -> np.ndarray:
    """float16 softmax rows of Gaussian scores times ``scale`` (larger: sharper maps, more near-zeros)."""
    x = rng.standard_normal(shape, dtype=np.float32) * scale
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x.astype(np.float16)


def write(path: Path, maps: np.ndarray, n: int, compression: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process: caller and writer thread)."""
    b, L, H, T, _ = maps.shape
    layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(14, 14), patch_size=(16, 16), image_size=(224, 224))
    t0, c0 = time.perf_counter(), time.process_time()
    w = RecordingWriter.create(path, family="vit", model_name="bench", model_class="ViTForImageClassification",
                               sample_ids=[str(i) for i in range(n)], stacks=[StackSpec("self", L, H, T, T, layout)],
                               class_names=[str(c) for c in range(10)], thumbnail_shape=(32, 32), batch_size=b,
                               compression=compression, overwrite=True)
    with w:
        for start in range(0, n, b):
            k = min(b, n - start)
            w.write(SampleBatch(start=start, attention={"self": maps[:k]}, predictions=np.zeros(k, np.int32),
                                logits=np.zeros((k, 10), np.float32), thumbnails=np.zeros((k, 32, 32, 3), np.uint8)))
        w.finish()
    return time.perf_counter() - t0, time.process_time() - c0


def read_maps(path: Path, n_reads: int, seed: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    rec = attnviz.open(path)
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    n, L, H = rec.n_samples, rec.n_layers, rec.n_heads
    picks = rng.choice(n * L * H, size=min(n_reads, n * L * H), replace=False)
    times = []
    with rec:
        for p in picks:
            s, rest = divmod(int(p), L * H)
            layer, head = divmod(rest, H)
            t = time.perf_counter()
            rec.attention(s, layer, head)
            times.append(time.perf_counter() - t)
    return times, t_open


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--scale", type=float, default=2.0, help="score scale: 2 = diffuse maps, 5 = sharp maps")
    ap.add_argument("--compression", nargs="*", default=["lzf", "gzip", "none"])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    maps = softmax_maps(rng, (args.batch_size, args.layers, args.heads, args.tokens, args.tokens), args.scale)
    raw = args.samples * args.layers * args.heads * args.tokens**2 * 2
    print(f"{args.samples} samples x {args.layers} layers x {args.heads} heads x {args.tokens}x{args.tokens} "
          f"float16 = {raw / 1e6:.0f} MB of maps (score scale {args.scale}); {os.cpu_count()} CPUs")
    print(f"{'compression':<12}{'write s':>9}{'MB/s':>8}{'CPU MB/s':>10}{'file MB':>9}{'ratio':>7}"
          f"{'open ms':>9}{'read median ms':>16}{'p95 ms':>8}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for comp in args.compression:
            path = Path(tmp) / f"bench_{comp}.h5"
            t_write, cpu = write(path, maps, args.samples, comp)
            size = path.stat().st_size
            times, t_open = read_maps(path, args.reads, seed=1)
            ms = sorted(t * 1e3 for t in times)
            print(f"{comp:<12}{t_write:>9.2f}{raw / 1e6 / t_write:>8.0f}{raw / 1e6 / cpu:>10.0f}"
                  f"{size / 1e6:>9.0f}{raw / size:>7.2f}"
                  f"{t_open * 1e3:>9.1f}{statistics.median(ms):>16.2f}{ms[int(0.95 * (len(ms) - 1))]:>8.2f}")
            path.unlink()


if __name__ == "__main__":
    main()
