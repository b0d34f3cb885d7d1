"""What ``--attributions`` costs: ``attnviz extract`` with no attributions, the default (rollout, saliency),
each method alone, and ``all``, side by side in one run on a ViT of realistic shape (random weights).

Reports wall and CPU seconds per image and the ratio to the attention-only run (CPU time: it counts the
work done and depends little on other jobs on a shared machine). Run by hand (never a test)::

    python benchmarks/attributions.py                     # ViT-S/16 shape, 224 px, 4 images, CPU
    python benchmarks/attributions.py --images 8 --hidden 768 --heads 12 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extract_vit import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from extractor.pipeline import ExtractOptions, extract, parse_attributions

    runs = [("none", "none"), ("default (rollout, saliency)", "default"), ("rollout", "rollout"),
            ("saliency", "saliency"), ("integrated_gradients", "integrated_gradients"), ("occlusion", "occlusion"),
            ("all", "all")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, img_dir = build(Path(tmp), args)
        rows = []
        for label, spec in runs:
            out = Path(tmp) / f"{spec}.h5"
            w0, c0 = time.perf_counter(), time.process_time()
            extract(ExtractOptions(model=str(model_dir), input=str(img_dir), out=str(out), device=args.device,
                                   batch_size=args.batch_size, attributions=parse_attributions(spec), progress=False))
            rows.append((label, time.perf_counter() - w0, time.process_time() - c0))
            out.unlink()
    base_wall, base_cpu = rows[0][1], rows[0][2]
    n = args.images
    print(f"ViT {args.layers}x{args.heads}, hidden {args.hidden}, {args.image} px / patch {args.patch}, {n} images, "
          f"batch {args.batch_size}, {args.device}")
    print(f"{'attributions':32s} {'wall s/img':>10s} {'cpu s/img':>10s} {'x attention-only (cpu)':>24s}")
    for label, wall, cpu in rows:
        print(f"{label:32s} {wall / n:10.2f} {cpu / n:10.2f} {cpu / base_cpu:24.1f}")
    print(f"(wall ratio of 'all': {rows[-1][1] / base_wall:.1f}x)")


if __name__ == "__main__":
    main()
