"""Speech-to-text performance (run by hand; no timing assertions in tests).

``extract``: seconds per audio second on a Whisper-tiny-shaped random model on the CPU (d_model 384, 4 encoder +
4 decoder layers, 6 heads, 80 mel bins, the 30-s window of 3000 feature frames = 1500 encoder frames, the real
51,865-token vocabulary), saved with ``save_pretrained`` and loaded through the real adapter, for

* attention only (decode + the teacher-forced pass with eager attention),
* + gradient saliency (captum Saliency, one backward per chunk of 8 token rows),
* + perturbation saliency at the default mask count (128 masks, batched 16 per forward),

and the speedup of the batched masks over one forward per mask (measured on ``--unbatched-masks`` masks).
Wall and CPU time (``time.process_time``: every thread of the process) are both reported: on a shared machine
wall time depends on the neighbours, CPU time much less.

``dashboard``: the Speech page's server-side callbacks on a 100-clip recording of the same shape (synthetic maps
and saliency through the real writer, then ``attnviz analyze``): a token switch, a head switch and a clip switch,
each calling every callback that fires on a selection change (with JSON serialisation), p50/p95 of this thread's
CPU time.

    python benchmarks/s2t.py extract --clips 2 --seconds 5
    python benchmarks/s2t.py dashboard --build /tmp/s2t-100.h5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_shaped_whisper(folder: Path, vocab: int = 51865) -> Path:
    """A random model with whisper-tiny's shapes, its feature extractor and a word-level tokenizer of ``vocab``."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    eos, sot = vocab - 7, vocab - 6
    cfg = T.WhisperConfig(vocab_size=vocab, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                          decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80,
                          max_source_positions=1500, max_target_positions=448, decoder_start_token_id=sot,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, suppress_tokens=[],
                          begin_suppress_tokens=None)
    torch.manual_seed(0)
    T.WhisperForConditionalGeneration(cfg).eval().save_pretrained(folder)
    gen = {"decoder_start_token_id": sot, "eos_token_id": eos, "pad_token_id": eos, "bos_token_id": eos,
           "max_length": 448, "suppress_tokens": [], "begin_suppress_tokens": None}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<|endoftext|>": eos, "<|startoftranscript|>": sot})
    for k in [k for k, v in words.items() if v in (eos, sot) and k.startswith("w")]:
        del words[k]
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|startoftranscript|>",
                              pad_token="<|endoftext|>").save_pretrained(folder)
    T.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def bench_extract(args: argparse.Namespace) -> None:
    import torch

    from extractor.adapters import detect, get_adapter, load_config, resolve_model
    from extractor.attributions.speech import compute_speech
    from tests.helpers_s2t import tone, write_clip

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="attnviz-bench-s2t-") as tmp:
        root = Path(tmp)
        model = tiny_shaped_whisper(root / "model")
        for i in range(args.clips):
            write_clip(root / "clips" / f"{i}.wav", tone(args.seconds, freq=200 + 50 * i, seed=i,
                                                          bursts=tuple((a, a + 0.4) for a in np.arange(0.1, args.seconds - 0.4, 0.6))))
        from extractor.audio import collect_audio

        source = resolve_model(model)
        config = load_config(source)
        adapter = get_adapter("s2t").load(source, config, detect(config), device=torch.device("cpu"),
                                          autocast_dtype=None, max_new_tokens=args.tokens)
        inputs = collect_audio(root / "clips", sample_rate=16000, max_seconds=30)
        adapter.plan(inputs.items)
        audio_s = args.clips * args.seconds
        rows = {}

        def timed(fn):
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            return out, time.perf_counter() - w, time.process_time() - c

        batches = [adapter.prepare([it]) for it in inputs.items]
        outs = []
        wall = cpu = 0.0
        for b in batches:
            with torch.no_grad():
                out, w, c = timed(lambda: adapter.run(b))
            outs.append(out)
            wall, cpu = wall + w, cpu + c
        rows["attention only"] = (wall, cpu)
        t_rows = [len(b.sequences[0]) - 1 for b in batches]
        for method, kw in (("gradient", {}), ("perturbation", {"n_masks": args.masks, "batch_size": 16})):
            wall = cpu = 0.0
            for b in batches:
                dec = adapter.decoding(b, 0)
                _, w, c = timed(lambda: compute_speech(method, dec, **kw))
                wall, cpu = wall + w, cpu + c
            rows[f"+ {method}" + (f" ({args.masks} masks, batched 16)" if method == "perturbation" else "")] = (wall, cpu)
        dec = adapter.decoding(batches[0], 0)
        k = args.unbatched_masks
        _, w1, c1 = timed(lambda: compute_speech("perturbation", dec, n_masks=k, batch_size=1))
        _, w16, c16 = timed(lambda: compute_speech("perturbation", dec, n_masks=k, batch_size=16))
    print(f"Whisper-tiny-shaped random model, CPU, {args.threads} threads, {args.clips} clip(s) of {args.seconds:g} s "
          f"({t_rows} token rows), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'step (each on its own)':42s} {'wall s/audio s':>15s} {'CPU s/audio s':>14s}")
    for name, (w, c) in rows.items():
        print(f"{name:42s} {w / audio_s:15.3f} {c / audio_s:14.3f}")
    print(f"perturbation masks, {k} masks of one clip: one forward per mask {w1:.1f} s wall / {c1:.1f} s CPU, "
          f"batched 16 {w16:.1f} s / {c16:.1f} s: speedup {w1 / w16:.1f}x wall, {c1 / c16:.1f}x CPU")


def build_recording(path: Path, n: int = 100, *, layers: int = 4, heads: int = 6, rows: int = 20, seconds: float = 5.0,
                    seed: int = 0) -> Path:
    """A 100-clip recording with whisper-tiny's decoder shape and 5-s clips (random maps and saliency)."""
    from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout
    from attnviz.store.schema import PerSampleSpec

    rng = np.random.default_rng(seed)
    frames = int(seconds * 100)
    enc = frames // 2
    mel = 80
    bins = int(seconds / 0.005)
    names = ["ca_mean", *(f"ca_layer{i}" for i in range(layers)), "perturbation", "gradient", "random"]
    fractions = np.linspace(0, 1, 11).tolist()
    w = RecordingWriter.create(
        path, family="s2t", model_name="bench-whisper-tiny", model_class="WhisperForConditionalGeneration",
        sample_ids=[f"clip_{i:03d}.wav" for i in range(n)],
        stacks=[StackSpec("cross", layers, heads, rows, enc, TokenLayout(query_axis="tokens", key_axis="frames")),
                StackSpec("decoder_self", layers, heads, rows, rows, TokenLayout())],
        class_names=[], batch_size=4, with_meta=True, target_source="prediction", compression="lzf",
        attributions=[AttributionSpec(m, (rows, frames, mel), "spectrogram", dtype="float16")
                      for m in ("perturbation", "gradient")],
        per_sample=[PerSampleSpec("log_mel", (mel, frames), "float16"), PerSampleSpec("waveform_envelope", (2, bins), "float16"),
                    PerSampleSpec("deletion", (len(names), len(fractions), rows), "float32")],
        extraction_params={"family": {"encoder_frame_seconds": 0.02, "feature_frame_seconds": 0.01,
                                      "envelope_seconds": 0.005, "deletion": {"explanations": names, "fractions": fractions}}})
    words = [f"w{i}" for i in range(rows - 1)]
    with w:
        for start in range(0, n, 4):
            b = min(4, n - start)
            x = rng.random((b, layers, heads, rows, enc), dtype=np.float32) ** 6
            x /= x.sum(-1, keepdims=True)
            metas = [{"token_ids": list(range(rows)), "tokens": [f" {t}" for t in words] + ["<|endoftext|>"],
                      "prompt_rows": 0, "special": [False] * (rows - 1) + [True], "logprob": [-0.5] * rows,
                      "text": " ".join(words), "reference": " ".join(words), "duration": seconds,
                      "n_feature_frames": frames, "n_encoder_frames": enc,
                      "words": [{"word": t, "rows": [r]} for r, t in enumerate(words)],
                      "reference_words": [{"word": t, "start": r * 0.25, "end": r * 0.25 + 0.2} for r, t in enumerate(words)]}
                     for _ in range(b)]
            w.write(SampleBatch(start=start, attention={"cross": x, "decoder_self": np.tile(np.eye(rows), (b, layers, heads, 1, 1))},
                                predictions=np.full(b, -1), logits=np.full((b, 1), np.nan), meta=metas,
                                attributions={m: rng.random((b, rows, frames, mel), dtype=np.float32).astype(np.float16)
                                              for m in ("perturbation", "gradient")},
                                per_sample={"log_mel": rng.standard_normal((b, mel, frames)).astype(np.float16),
                                            "waveform_envelope": rng.uniform(-1, 1, (b, 2, bins)).astype(np.float16),
                                            "deletion": np.log(rng.uniform(0.01, 1, (b, len(names), len(fractions), rows)))
                                            .astype(np.float32)}))
        w.finish()
    return path


def bench_dashboard(args: argparse.Namespace) -> None:
    from dash import no_update
    from dash._utils import to_json  # what Dash serialises a callback's outputs with

    from attnviz.analysis.crossattn import analyze_step
    from attnviz.app import create_app

    path = args.file or args.build
    if args.file is None:
        if not path.exists():
            t0 = time.perf_counter()
            build_recording(path, args.clips)
            print(f"built {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        lines = analyze_step(path)
        print(f"analyze: {time.perf_counter() - t0:.1f} s: {lines[0]}")
    create_app([path])
    from attnviz.app.pages import speech
    from attnviz.app.registry import get_recording
    from attnviz.app.shell import banner

    rec = get_recording(path.name)
    n_layers, n_heads = rec.stack_shape("cross")

    def serialise(out):
        for o in (out if isinstance(out, tuple) else (out,)):
            if o is not no_update:
                to_json(o)

    drawn = {"wave": None}  # the browser's state: which clip the waveform figure shows

    def callbacks(data):  # every callback of the page with the selection as an Input
        serialise(speech.controls(data, "perturbation"))
        serialise(speech.status(data))
        fig, shown = speech.wave(data, drawn["wave"])
        serialise((fig, shown))
        drawn["wave"] = drawn["wave"] if shown is no_update else shown
        serialise(speech.token(data, "perturbation", "mean"))
        serialise(speech.grid(data, "perturbation", "mean", "pearson"))
        serialise(speech.deletion(data, "recording"))
        serialise(speech.alignment(data))
        serialise(speech.table(data, "perturbation", "mean"))
        serialise(banner(data))

    rng = np.random.default_rng(1)
    sel = {"file": path.name, "sample": 0, "layer": 0, "head": 0, "query": 0}
    t0 = time.perf_counter()
    callbacks(sel)
    print(f"first page load: {time.perf_counter() - t0:.2f} s")

    def run(change):
        cpus, walls = [], []
        for _ in range(args.switches):
            change(sel)
            w, c = time.perf_counter(), time.thread_time()
            callbacks(sel)
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - w)
        return np.asarray(walls) * 1e3, np.asarray(cpus) * 1e3

    results = {
        "token switch": run(lambda d: d.update(query=int(rng.integers(rec.lengths(d["sample"], "cross")[0])))),
        "head switch": run(lambda d: d.update(layer=int(rng.integers(n_layers)), head=int(rng.integers(n_heads)))),
        "clip switch": run(lambda d: d.update(sample=int(rng.integers(rec.n_samples)), query=None)),
    }
    print(f"{rec.n_samples} clips, {n_layers}x{n_heads} decoder heads, {rec.lengths(0, 'cross')} rows x encoder frames, "
          f"{path.stat().st_size / 1e6:.0f} MB; {args.switches} switches each; load average {os.getloadavg()[0]:.1f}")
    print(f"{'switch':14s} {'wall p50':>9s} {'wall p95':>9s} {'CPU p50':>8s} {'CPU p95':>8s}  (ms)")
    for name, (wall, cpu) in results.items():
        print(f"{name:14s} {np.percentile(wall, 50):9.1f} {np.percentile(wall, 95):9.1f} "
              f"{np.percentile(cpu, 50):8.1f} {np.percentile(cpu, 95):8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--clips", type=int, default=2)
    e.add_argument("--seconds", type=float, default=5.0)
    e.add_argument("--tokens", type=int, default=12, help="max new tokens (a 5-s utterance has about 12-15)")
    e.add_argument("--masks", type=int, default=128)
    e.add_argument("--unbatched-masks", type=int, default=16)
    e.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("dashboard")
    d.add_argument("--file", type=Path)
    d.add_argument("--build", type=Path, default=Path(tempfile.gettempdir()) / "attnviz-s2t-100.h5")
    d.add_argument("--clips", type=int, default=100)
    d.add_argument("--switches", type=int, default=100)
    args = ap.parse_args()
    (bench_extract if args.what == "extract" else bench_dashboard)(args)


if __name__ == "__main__":
    main()
