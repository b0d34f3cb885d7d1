"""Build ``sample_data/shapes-demo.h5``: the demo ViT recorded on held-out procedural shapes.

Makes ``--n`` images with :func:`shapes.make_shapes` and the demo seed (``DEMO_SEED`` = 2, disjoint
from training seed 0 and test seed 1; see ``scripts/README.md``), writes them with their object
masks as PNG files and a JSONL manifest (class-name labels) into a temporary folder, and runs the
real ``attnviz extract`` pipeline over that manifest with every attribution method and a quarter of
every head's query/key vectors (``--store-qk 0.25``), then ``attnviz importance`` and ``attnviz analyze
--patterns --qk`` (head statistics, localization scores, spatial profiles, the pattern atlas, the joint
query-key embedding), so that every page of the dashboard has its data. Deterministic: the same
arguments rebuild the same datasets (only the ``created`` attribute and timings differ).

    python scripts/build_demo_recording.py                  # 96 images -> sample_data/shapes-demo.h5
    python scripts/build_demo_recording.py --retrain        # first retrain the model (train_demo_vit.py, ~95 min)
    attnviz info sample_data/shapes-demo.h5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from shapes import CLASS_NAMES, DEMO_SEED, make_shapes  # noqa: E402

SAMPLE_DATA_BUDGET = 40 * 1024 * 1024  # all of sample_data/ must stay below this


def write_inputs(folder: Path, n: int, seed: int, size: int) -> Path:
    """PNG images + masks (255 = object) + ``manifest.jsonl`` with class-name labels; returns the manifest."""
    data = make_shapes(n, seed=seed, size=size)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    lines = []
    for i in range(n):
        Image.fromarray(data.images[i]).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(data.masks[i].astype(np.uint8) * 255).save(folder / "masks" / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "label": CLASS_NAMES[int(data.labels[i])],
                                 "mask": f"masks/{i:04d}.png"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "sample_data" / "models" / "shapes-vit")
    ap.add_argument("--out", type=Path, default=ROOT / "sample_data" / "shapes-demo.h5")
    ap.add_argument("--n", type=int, default=96, help="held-out images to record")
    ap.add_argument("--seed", type=int, default=DEMO_SEED)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compression", default="gzip", help="gzip: the smallest file for the repository")
    ap.add_argument("--attributions", default="all")
    ap.add_argument("--max-maps", type=int, default=4000, help="maps sampled for the pattern atlas (its cache holds their reconstructions: keep sample_data small)")
    ap.add_argument("--store-qk", type=float, default=0.25, help="fraction of tokens whose query/key vectors are stored")
    ap.add_argument("--qk-points", type=int, default=600, help="tokens per head in the query-key embedding")
    ap.add_argument("--clusters", default="6", help="pattern-atlas clusters: the silhouette alone picks 2 on this "
                    "model (maps on CLS vs the rest); 6 separates the local offsets, far offsets and broad maps")
    ap.add_argument("--retrain", action="store_true", help="first train the demo model again with "
                    "scripts/train_demo_vit.py (resumable: rerun with --retrain --resume after an interruption)")
    ap.add_argument("--resume", action="store_true", help="with --retrain: continue the interrupted training")
    ap.add_argument("--threads", type=int, default=2, help="with --retrain: torch threads of the training")
    args = ap.parse_args()
    if args.retrain:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "train_demo_vit.py"), "--threads",
                        str(args.threads), "--out", str(args.model), *(["--resume"] if args.resume else [])], check=True)

    import torch

    from extractor.adapters import load_config, resolve_model
    from extractor.pipeline import ExtractOptions, extract, parse_attributions

    torch.manual_seed(0)
    size = load_config(resolve_model(args.model)).image_size
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_inputs(Path(tmp), args.n, args.seed, int(size))
        result = extract(ExtractOptions(model=str(args.model), input=str(manifest), out=str(args.out), device="cpu",
                                        batch_size=args.batch_size, attributions=parse_attributions(args.attributions),
                                        compression=args.compression, store_qk=args.store_qk, overwrite=True))
        # every page of the dashboard has its data: head importance (needs the model and the inputs),
        # then spatial profiles and the pattern atlas (from the recorded maps)
        attnviz = [sys.executable, "-m", "attnviz"]
        subprocess.run([*attnviz, "importance", "--model", str(args.model), "--input", str(manifest),
                        "--into", str(args.out), "--device", "cpu", "--force"], check=True)
    subprocess.run([*attnviz, "analyze", str(args.out), "--patterns", "--max-maps", str(args.max_maps),
                    "--clusters", args.clusters, "--qk", "--qk-points", str(args.qk_points)], check=True)
    total = sum(p.stat().st_size for p in (ROOT / "sample_data").rglob("*") if p.is_file())
    print(f"wrote {result.path}: {result.n_samples} images, accuracy {result.accuracy:.1%}, "
          f"{result.path.stat().st_size / 2**20:.1f} MB; sample_data/ now {total / 2**20:.1f} MB "
          f"(budget {SAMPLE_DATA_BUDGET / 2**20:.0f} MB)")
    if total >= SAMPLE_DATA_BUDGET:
        sys.exit(f"sample_data/ is {total / 2**20:.1f} MB, over the {SAMPLE_DATA_BUDGET / 2**20:.0f} MB budget: "
                 "use fewer images (--n) or gzip")


if __name__ == "__main__":
    main()
