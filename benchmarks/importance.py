"""Benchmark: single-head ablations batched (replicated batch, per-row head mask) vs one forward per head.

Both evaluate the same ablations (every head alone, zeroed at the output-projection input) on the
same model and data and must give the same accuracy/loss/KL; the script checks that, then reports
ablations per second of each and the speed-up. Run by hand (not a test)::

    python benchmarks/importance.py                      # demo-sized ViT (64x64, patch 8, 6x4 heads)
    python benchmarks/importance.py --model DIR          # a save_pretrained ViT/DeiT instead
    python benchmarks/importance.py --device cuda --images 256 --max-rows 4096

The model is a random-weight ViT built from a config unless ``--model`` is given (the speed does not
depend on the weights). ``--full`` also times a whole ``compute_importance`` run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(args: argparse.Namespace):
    from transformers import ViTConfig, ViTForImageClassification

    if args.model:
        from extractor.adapters import load_model

        adapter = load_model(args.model, device=args.device)
        size = adapter.input_size
        return adapter.model, size, adapter.arch.stack("self").pattern("output_projection")
    cfg = ViTConfig(image_size=args.image, patch_size=args.patch, hidden_size=args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                    num_labels=5, initializer_range=0.2)
    torch.manual_seed(0)
    model = ViTForImageClassification._from_config(cfg, attn_implementation="eager").eval().to(args.device)
    return model, (args.image, args.image), r"layers\.(\d+)\.attention\.o_proj$"


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a save_pretrained ViT directory (default: a demo-sized random ViT)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-rows", type=int, default=None, help="rows per forward (default: 64 CPU, 2048 GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also time a whole compute_importance run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from extractor.hooks import find_output_projections
    from extractor.importance import (
        ImportanceOptions,
        compute_importance,
        evaluate_ablations,
        evaluate_ablations_loop,
        prepare_eval_data,
        single_head_masks,
    )

    model, (h, w), pattern = build_model(args)
    sites = find_output_projections(model, pattern)
    gen = torch.Generator().manual_seed(1)
    px = torch.randn(args.images, 3, h, w, generator=gen)
    batches = [{"pixel_values": px[i:i + args.batch_size]} for i in range(0, args.images, args.batch_size)]
    data = prepare_eval_data(model, batches, None)
    masks = single_head_masks(sites.shape)
    n = len(masks)

    from extractor.importance import auto_max_rows

    max_rows = args.max_rows or auto_max_rows(torch.device(args.device))
    # warm-up (allocator, kernels)
    evaluate_ablations(model, sites, data, masks[:2], max_rows=max_rows)
    evaluate_ablations_loop(model, sites, data, masks[:1])

    # alternate the two so that a change of machine load hits both alike; report medians
    t_loops, t_batches = [], []
    for _ in range(args.repeat):
        t, loop = timed(lambda: evaluate_ablations_loop(model, sites, data, masks), 1)
        t_loops.append(t)
        t, batched = timed(lambda: evaluate_ablations(model, sites, data, masks, max_rows=max_rows), 1)
        t_batches.append(t)
    t_loop, t_batch = statistics.median(t_loops), statistics.median(t_batches)
    np.testing.assert_allclose(batched.accuracy, loop.accuracy)
    np.testing.assert_allclose(batched.loss, loop.loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(batched.kl, loop.kl, rtol=1e-3, atol=1e-6)

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; model: {sites.n_layers} layers x {sites.n_heads} heads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, input {h}x{w}")
    print(f"data: {args.images} images in batches of {args.batch_size}; {n} single-head ablations; "
          f"max_rows {max_rows}; median of {args.repeat} alternating runs")
    print(f"  one forward per head : {t_loop:8.3f} s  {n / t_loop:8.1f} ablations/s")
    print(f"  batched (per-row mask): {t_batch:8.3f} s  {n / t_batch:8.1f} ablations/s")
    print(f"  speed-up              : {t_loop / t_batch:8.2f}x   (results equal: yes)")

    if args.full:
        t0 = time.perf_counter()
        res = compute_importance(model, sites, data, ImportanceOptions(max_rows=max_rows, progress=False))
        t = time.perf_counter() - t0
        n_eval = n * len(res.curves.partial_fractions) + len(res.curves.pruning_metrics) * 11
        print(f"  full compute_importance (single + gradient + partial + curves, ~{n_eval} evaluations): {t:.2f} s")


if __name__ == "__main__":
    main()
