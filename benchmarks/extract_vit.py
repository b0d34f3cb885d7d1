"""Benchmark of ``attnviz extract`` on a ViT of realistic shape, side by side in one run:

(a) the bare eager forward over the same batches (pixel tensors prepared beforehand; no attention
    outputs, nothing copied or written) -- the floor;
(b) ``attnviz extract`` (``extractor.pipeline.extract``, no attributions): image decoding, the input
    check, preprocessing, forward, one float16 host copy per batch, lzf compression and HDF5 writes
    in the writer thread, head statistics at the end -- the whole call, wall clock;
(c) the naive script a user would write: per image, ``output_attentions=True``, one h5py dataset
    written per (layer, head) map.

Targets: (b)/(a) <= 1.25 and (c)/(b) >= 3. Run by hand (never a test)::

    python benchmarks/extract_vit.py                      # ViT-S/16 shape, 48 images, CPU
    python benchmarks/extract_vit.py --images 256 --device cuda --hidden 768 --heads 12

The model has random weights (built from a config, saved with save_pretrained): speed does not
depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    cfg = ViTConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                    intermediate_size=4 * args.hidden, image_size=args.image, patch_size=args.patch, num_labels=10)
    torch.manual_seed(0)
    model_dir = tmp / "model"
    ViTForImageClassification(cfg).save_pretrained(model_dir)
    ViTImageProcessorPil(size={"height": args.image, "width": args.image}).save_pretrained(model_dir)
    img_dir = tmp / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        # smooth-ish content (PNG of pure noise is unusually slow to decode)
        small = rng.integers(0, 256, (args.image // 8, args.image // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((args.image, args.image), Image.Resampling.BILINEAR).save(img_dir / f"{i:04d}.png")
    return model_dir, img_dir


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time and CPU time (all threads of this process) of a block. CPU time counts the work done
    and hardly depends on other processes competing for the cores; wall time is what a user waits."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def bare_forward_setup(model_dir: Path, img_dir: Path, args: argparse.Namespace, device: torch.device):
    """(a) the model and the same batches, as pixel tensors on the device (prepared off the clock)."""
    from transformers import ViTForImageClassification, ViTImageProcessorPil

    model = ViTForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval().to(device)
    proc = ViTImageProcessorPil.from_pretrained(model_dir)
    files = sorted(img_dir.glob("*.png"))
    batches = []
    for s in range(0, len(files), args.batch_size):
        ims = [Image.open(f).convert("RGB") for f in files[s : s + args.batch_size]]
        batches.append(proc(ims, return_tensors="pt")["pixel_values"].to(device))
    with torch.no_grad():
        model(pixel_values=batches[0])  # warm-up
    return model, batches


def bare_forward(model, batches, device: torch.device) -> Clock:
    """(a) eager forward only, over the batches."""
    with torch.no_grad(), Clock() as clock:
        for px in batches:
            model(pixel_values=px)
        sync(device)
    return clock


def attnviz_extract(model_dir: Path, img_dir: Path, out: Path, args: argparse.Namespace):
    """(b) the whole extract() call; returns its Clock and the ExtractResult."""
    from extractor.pipeline import ExtractOptions, extract

    opts = ExtractOptions(model=str(model_dir), input=str(img_dir), out=str(out), device=args.device,
                          batch_size=args.batch_size, attributions=(), compression=args.compression,
                          overwrite=True, progress=False)
    with Clock() as clock:
        result = extract(opts)
    return clock, result


def naive(model_dir: Path, img_dir: Path, out: Path, device: torch.device) -> Clock:
    """(c) what a user would write: one image at a time, one h5py dataset per (layer, head) map."""
    from transformers import ViTForImageClassification, ViTImageProcessorPil

    model = ViTForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval().to(device)
    proc = ViTImageProcessorPil.from_pretrained(model_dir)
    with Clock() as clock, h5py.File(out, "w") as f, torch.no_grad():
        for path in sorted(img_dir.glob("*.png")):
            px = proc(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"].to(device)
            outputs = model(pixel_values=px, output_attentions=True)
            for layer, att in enumerate(outputs.attentions):
                for head in range(att.shape[1]):
                    f.create_dataset(f"{path.stem}/layer{layer}/head{head}", data=att[0, head].cpu().numpy())
            f.create_dataset(f"{path.stem}/logits", data=outputs.logits[0].cpu().numpy())
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compression", default="auto", help="as attnviz extract: auto = lzf on GPU, none on CPU")
    ap.add_argument("--repeat", type=int, default=3, help="(a) and (b) alternate this many times; best of each")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    n = args.images
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, img_dir = build(tmp, args)
        tokens = (args.image // args.patch) ** 2 + 1
        mb_per_image = args.layers * args.heads * tokens * tokens * 2 / 1e6
        print(f"ViT {args.layers} layers x {args.heads} heads, hidden {args.hidden}, {args.image} px / patch "
              f"{args.patch} ({tokens} tokens); {n} images, batch {args.batch_size}; device {device}, "
              f"torch threads {torch.get_num_threads()}; maps {mb_per_image:.1f} MB/image as float16; "
              f"best of {args.repeat}")
        model, batches = bare_forward_setup(model_dir, img_dir, args, device)
        a_runs, b_runs = [], []
        for _ in range(args.repeat):  # alternate, so that load from elsewhere hits both alike
            a_runs.append(bare_forward(model, batches, device))
            b_runs.append(attnviz_extract(model_dir, img_dir, tmp / "run.h5", args))
        del model, batches
        a = min(a_runs, key=lambda c: c.wall)
        b, res = min(b_runs, key=lambda cr: cr[0].wall)
        a_cpu = min(c.cpu for c in a_runs)
        b_cpu = min(c.cpu for c, _ in b_runs)
        size = (tmp / "run.h5").stat().st_size / 1e6
        print(f"(a) bare eager forward      wall {a.wall:7.2f} s  {n / a.wall:6.1f} img/s   cpu {a_cpu:7.2f} s")
        print(f"(b) attnviz extract         wall {b.wall:7.2f} s  {n / b.wall:6.1f} img/s   cpu {b_cpu:7.2f} s   "
              f"(per-batch loop {res.seconds:.2f} s, head stats {res.head_stats_seconds:.2f} s; file {size:.0f} MB, "
              f"{args.compression})")
        c = None
        if not args.skip_naive:
            c = naive(model_dir, img_dir, tmp / "naive.h5", device)
            naive_size = (tmp / "naive.h5").stat().st_size / 1e6
            print(f"(c) naive per-image script  wall {c.wall:7.2f} s  {n / c.wall:6.1f} img/s   cpu {c.cpu:7.2f} s   "
                  f"(file {naive_size:.0f} MB)")
        print(f"(b)/(a) = {b.wall / a.wall:.2f} wall, {b_cpu / a_cpu:.2f} cpu  (target <= 1.25; per-batch loop only: "
              f"{res.seconds / a.wall:.2f} wall)")
        if c is not None:
            print(f"(c)/(b) = {c.wall / b.wall:.2f} wall, {c.cpu / b_cpu:.2f} cpu  (target >= 3)")
        if args.json:
            args.json.write_text(json.dumps({
                "a_wall": a.wall, "a_cpu": a_cpu, "b_wall": b.wall, "b_cpu": b_cpu, "b_loop": res.seconds,
                "b_head_stats": res.head_stats_seconds, "c_wall": c.wall if c else None, "c_cpu": c.cpu if c else None,
                "device": str(device), "images": n, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "compression": args.compression},
                indent=2))


if __name__ == "__main__":
    main()
