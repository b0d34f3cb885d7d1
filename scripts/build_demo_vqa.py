"""Build ``sample_data/shapes-vqa.h5``: the demo LLaVA answering questions about held-out shapes images.

Makes ``--images`` images with :func:`shapes.make_shapes` and the demo seed (``DEMO_SEED`` = 2, disjoint from
training seed 0 and test seed 1), asks ``--per-image`` questions about each (``shapes_vqa.make_questions``:
shape, colour, position; the first phrasing of each type), writes the images, their target masks and a JSONL
manifest of questions into a temporary folder, and runs the real ``attnviz extract`` pipeline over it:
answers generated greedily, the language model's attention of the answer tokens only (``--answer-rows-only``:
the recording must stay small), VHD, visual sinks, VHR-style reinforcement, gzip; then ``attnviz analyze``
(spatial profiles of the vision tower and the vision-language head metrics). Deterministic: the same
arguments rebuild the same datasets (only the ``created`` attributes differ).

    python scripts/build_demo_vqa.py                     # 300 questions -> sample_data/shapes-vqa.h5
    attnviz serve sample_data/shapes-vqa.h5              # the Vision-language page
"""

from __future__ import annotations

import argparse
import collections
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

from shapes import DEMO_SEED, make_shapes  # noqa: E402
from shapes_vqa import make_questions  # noqa: E402

SAMPLE_DATA_BUDGET = 40 * 1024 * 1024  # all of sample_data/ must stay below this
RECORDING_BUDGET = 6 * 1024 * 1024  # this demo's share of it


def write_inputs(folder: Path, n_images: int, per_image: int, seed: int) -> tuple[Path, list]:
    """PNG images + target masks + ``questions.jsonl``; returns the manifest and the questions."""
    data = make_shapes(n_images, seed)
    questions = make_questions(data, seed=seed, per_image=per_image, phrasing="first")
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n_images):
        Image.fromarray(data.images[i]).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(data.masks[i].astype(np.uint8) * 255).save(folder / "masks" / f"{i:04d}.png")
    lines = [json.dumps({"id": f"{q.index:04d}-{q.kind}", "image": f"images/{q.index:04d}.png", "prompt": q.prompt,
                         "answer": q.answer, "mask": f"masks/{q.index:04d}.png"}) for q in questions]
    manifest = folder / "questions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "sample_data" / "models" / "shapes-llava")
    ap.add_argument("--out", type=Path, default=ROOT / "sample_data" / "shapes-vqa.h5")
    ap.add_argument("--images", type=int, default=150, help="held-out images")
    ap.add_argument("--per-image", type=int, default=2, help="question types asked per image (1-3)")
    ap.add_argument("--seed", type=int, default=DEMO_SEED)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sink-tau", type=float, default=5.0,
                    help="tau of the sinks; the paper's 20 cannot be reached by a 64-wide model (phi <= sqrt(64) = 8)")
    ap.add_argument("--reinforce", type=float, default=2.0, help="alpha of the VHR-style reinforcement")
    ap.add_argument("--max-new-tokens", type=int, default=3, help="the longest demo answer is two words + </s>")
    args = ap.parse_args()

    import torch

    from extractor.pipeline import ExtractOptions, extract

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        manifest, questions = write_inputs(Path(tmp), args.images, args.per_image, args.seed)
        result = extract(ExtractOptions(
            model=str(args.model), input=str(manifest), out=str(args.out), device="cpu", batch_size=args.batch_size,
            compression="gzip", overwrite=True,
            family_options={"max_new_tokens": args.max_new_tokens, "answer_rows_only": True,
                            "sink_tau": args.sink_tau, "reinforce": args.reinforce, "sink_calibration": 0}))
    subprocess.run([sys.executable, "-m", "attnviz", "analyze", str(args.out)], check=True)

    import attnviz

    kinds = collections.Counter(q.kind for q in questions)
    with attnviz.open(args.out) as rec:
        by_kind: dict[str, list[bool]] = collections.defaultdict(list)
        reinforced: dict[str, list[bool]] = collections.defaultdict(list)
        for s, q in enumerate(questions):
            m = rec.meta(s)
            by_kind[q.kind].append(bool(m["correct"]))
            if m.get("reinforced"):
                reinforced[q.kind].append(bool(m["reinforced"]["correct"]))
        facts = rec.extraction_params["family"]
    size = args.out.stat().st_size
    total = sum(p.stat().st_size for p in (ROOT / "sample_data").rglob("*") if p.is_file())
    report = {
        "questions": dict(kinds), "seconds": round(result.seconds, 1), "rate": result.rate,
        "answer_accuracy": {k: round(float(np.mean(v)), 3) for k, v in by_kind.items()},
        "reinforced_accuracy": {k: round(float(np.mean(v)), 3) for k, v in reinforced.items()},
        "sink_dims": facts["sink_dims"], "bytes": size, "sample_data_bytes": total,
    }
    print(json.dumps(report, indent=1))
    if size > RECORDING_BUDGET:
        sys.exit(f"error: {args.out} is {size / 2**20:.1f} MB, over this demo's {RECORDING_BUDGET / 2**20:.0f} MB; "
                 "record fewer questions (--images, --per-image)")
    if total > SAMPLE_DATA_BUDGET:  # the other demos' files count too: say so, this file is within its share
        print(f"warning: sample_data/ is {total / 2**20:.1f} MB, over its {SAMPLE_DATA_BUDGET / 2**20:.0f} MB budget",
              file=sys.stderr)


if __name__ == "__main__":
    main()
