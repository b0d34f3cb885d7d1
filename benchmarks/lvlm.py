"""Benchmark of ``attnviz extract`` on a small random LLaVA (CPU by default), one run per configuration:

(a) attention only (``--no-vhd --no-sinks``): greedy generation + the teacher-forced pass recording the
    language model's and the vision tower's attention;
(b) + VHD: the image-free forward of the same token sequences, batched across the questions of a batch;
(c) + sinks: the massive-dimension calibration (one prompt-only forward per question, here all of them) and
    phi of every token;
(d) + VHR-style reinforcement: a second generation with the chosen heads scaled;

each run ``--repeat`` times (the fastest counts), reported as seconds per question (the whole ``extract`` call, its per-batch loop alone, and the CPU seconds of
the process, which a shared machine's load inflates less than wall time), and the file
size of the same recording with every row of the language model's maps against ``--answer-rows-only``.
Run by hand (never a test)::

    python benchmarks/lvlm.py                              # 32 questions, 64 image tokens, CPU
    python benchmarks/lvlm.py --questions 64 --image 96 --device cuda

The model has random weights (built from a config, saved with save_pretrained): speed does not depend on
what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ("what colour is it?", "where is the shape?", "what shape is it?", "what is the colour of the shape?")

CONFIGS = {
    "attention only": {"vhd": False, "sinks": False},
    "+ VHD": {"vhd": True, "sinks": False},
    "+ VHD + sinks": {"vhd": True, "sinks": True, "sink_calibration": 0, "sink_tau": 8.0},
    "+ VHD + sinks + reinforce": {"vhd": True, "sinks": True, "sink_calibration": 0, "sink_tau": 8.0, "reinforce": 2.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest counts (a shared "
                    "machine's load only ever adds time)")
    args = ap.parse_args()

    import torch

    import attnviz
    from extractor.pipeline import ExtractOptions, extract
    from tests.helpers import save_tiny_llava, write_vqa_manifest

    torch.set_num_threads(args.threads)
    rows = [{"image": f"img{i % 8}.png", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(args.questions)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_llava(root / "llava", image_size=args.image, patch=args.patch, vision_layers=args.layers,
                                text_layers=args.layers, heads=args.heads, hidden=args.hidden, max_positions=256)
        manifest = write_vqa_manifest(root / "data", rows, size=(args.image, args.image))
        n_image_tokens = (args.image // args.patch) ** 2

        runs = iter(range(100))

        def run(name: str, options: dict, answer_rows: bool) -> dict:
            return min((run_once(options, answer_rows) for _ in range(args.repeat)), key=lambda r: r["s_per_question"])

        def run_once(options: dict, answer_rows: bool) -> dict:
            out = root / f"run{next(runs)}.h5"
            t0, c0 = time.perf_counter(), time.process_time()
            res = extract(ExtractOptions(model=str(model), input=str(manifest), out=str(out), device=args.device,
                                         batch_size=args.batch_size, progress=False, compression="none",
                                         family_options={"max_new_tokens": args.max_new_tokens,
                                                         "answer_rows_only": answer_rows, **options}))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            with attnviz.open(out) as rec:
                lm = sum(b for p, _, _, b in rec.datasets() if p == "attention/self/maps")
            return {"s_per_question": wall / args.questions, "cpu_s_per_question": cpu / args.questions,
                    "loop_s_per_question": res.seconds / args.questions,
                    "bytes": out.stat().st_size, "lm_map_bytes": lm}

        run("warm-up", {"vhd": False, "sinks": False}, True)  # first-call costs (imports, allocator)
        for name, options in CONFIGS.items():
            results[name] = run(name, options, True)
        full = run("+ VHD + sinks, every row", CONFIGS["+ VHD + sinks"], False)
    base = results["attention only"]["s_per_question"]
    print(f"{args.questions} questions, {n_image_tokens} image tokens, {args.layers}+{args.layers} layers x "
          f"{args.heads} heads, hidden {args.hidden}, up to {args.max_new_tokens} answer tokens, batch "
          f"{args.batch_size}, {args.device}, {args.threads} threads, torch {torch.__version__}\n")
    cpu_base = results["attention only"]["cpu_s_per_question"]
    print("| configuration | s / question (extract, wall) | s / question (loop, wall) | CPU s / question | "
          "vs attention only (wall, CPU) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_question']:.3f} | {r['loop_s_per_question']:.3f} | {r['cpu_s_per_question']:.3f} | "
              f"{r['s_per_question'] / base:.2f}x, {r['cpu_s_per_question'] / cpu_base:.2f}x |")
    rows_r = results["+ VHD + sinks"]
    print(f"\nfile (no compression): every row {full['bytes'] / 2**20:.2f} MB (language-model maps "
          f"{full['lm_map_bytes'] / 2**20:.2f} MB); --answer-rows-only {rows_r['bytes'] / 2**20:.2f} MB (maps "
          f"{rows_r['lm_map_bytes'] / 2**20:.2f} MB): {1 - rows_r['bytes'] / full['bytes']:.0%} of the file and "
          f"{1 - rows_r['lm_map_bytes'] / full['lm_map_bytes']:.0%} of the language-model maps saved")
    print(json.dumps({"configs": results, "every_row": full}, indent=1))


if __name__ == "__main__":
    main()
