"""Build ``sample_data/digits-demo.h5``: the speech demo recording.

1. ``speech_digits.make_digit_clips(N, seed=2)`` (the demo split, held out from the model's training, test and
   validation seeds 0, 1, 3) -> ``clips/*.wav`` + ``manifest.jsonl`` with exact word timings, in a temporary folder;
2. ``attnviz extract`` on the demo model ``sample_data/models/digits-whisper`` with spectrogram perturbation,
   gradient and encoder-output saliency and deletion curves; the encoder self-attention is left out
   (``--stacks cross,decoder_self``: it would be 3/4 of the file) and the file is gzip-compressed, so that it
   stays under 8 MB (``sample_data/`` holds three demos in 40 MB);
3. ``attnviz analyze``: WER, cross-attention vs saliency, alignment errors, DTW word timestamps;
4. prints the size and the figures the docs quote.

Needs espeak-ng (``apt-get install espeak-ng``) to synthesize the clips; the product itself never does.

    python scripts/build_demo_speech.py                 # 36 clips, 256 masks, 10 deletion steps
    python scripts/build_demo_speech.py --n 8 --out /tmp/small.h5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from speech_digits import DEMO_SEED, make_digit_clips, write_split  # noqa: E402

MODEL = ROOT / "sample_data" / "models" / "digits-whisper"
OUT = ROOT / "sample_data" / "digits-demo.h5"
SIZE_BUDGET = 8 * 1024 * 1024


def attnviz(*args: str) -> None:
    """Run the attnviz CLI as a user would (same interpreter, this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "attnviz", *args], check=True, env=env, cwd=ROOT)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=36, help="clips")
    ap.add_argument("--n-masks", type=int, default=256)
    ap.add_argument("--deletion-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnviz-digits-demo-") as tmp:
        clips = make_digit_clips(args.n, DEMO_SEED)
        manifest = write_split(clips, Path(tmp) / "data")
        print(f"{len(clips)} clips, {sum(c.duration for c in clips):.1f} s of audio ({time.perf_counter() - t0:.0f} s)")
        part = Path(tmp) / "digits-demo.h5"
        attnviz("extract", "--model", str(MODEL), "--input", str(manifest), "--out", str(part),
                "--attributions", "perturbation,gradient,encoder_perturbation", "--n-masks", str(args.n_masks),
                "--mask-batch", "64", "--deletion-steps", str(args.deletion_steps), "--stacks", "cross,decoder_self",
                "--compression", "gzip", "--batch-size", "8", "--no-progress")
        attnviz("analyze", str(part))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, args.out) if part.stat().st_dev == args.out.parent.stat().st_dev else \
            args.out.write_bytes(part.read_bytes())
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {size / 1e6:.2f} MB ({time.perf_counter() - t0:.0f} s)")
    if size > SIZE_BUDGET:
        print(f"warning: over the {SIZE_BUDGET / 2**20:.0f} MiB budget of the speech demo", file=sys.stderr)
    report(args.out)
    return args.out


def report(path: Path) -> dict:
    """The figures docs/speech.md quotes, from the recording's cached analyses."""
    sys.path.insert(0, str(ROOT))
    import attnviz as av
    from attnviz.analysis.alignment import load_word_timings
    from attnviz.analysis.crossattn import load_crossattn

    with av.open(path) as rec:
        a = load_crossattn(rec)
        tm = load_word_timings(rec)
        assert a is not None and tm is not None
        out = {"clips": rec.n_samples, "wer": a.wer, "correlation": {}, "alignment_ms": {}, "deletion_auc": a.deletion,
               "dtw": {"heads": tm.heads, "source": tm.source, **tm.errors_ms()}}
        for (m, p), t in sorted(a.tables.items()):
            hp = t["head_pearson"]
            out["correlation"][f"{m}/{p}"] = {
                "all_layer_mean": round(float(t["all_pearson"]), 3), "all_layer_mean_spearman": round(float(t["all_spearman"]), 3),
                "layer_means": [round(float(v), 3) for v in t["layer_pearson"]],
                "heads": [[round(float(v), 3) for v in row] for row in hp],
                "flattened_all": round(float(t["flat_all_pearson"]), 3),
                "uniform_control": round(float(t["uniform_pearson"]), 3),
                "shuffled_control": round(float(t["shuffled_pearson"]), 3)}
        out["alignment_ms"] = {k: [round(v[0], 1), round(v[1], 3), v[2]] for k, v in a.alignment.items()
                               if not k.startswith("ca_L")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
