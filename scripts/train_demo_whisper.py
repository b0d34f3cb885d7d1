"""Train the attnviz demo speech model: a tiny Whisper that transcribes spoken digits (CPU, fixed seeds).

Writes to ``--out`` (default ``sample_data/models/digits-whisper/``):
    config.json, model.safetensors, generation_config.json
        a ``WhisperForConditionalGeneration`` (transformers 5.x); ``model.generate(input_features)``
        works without extra arguments (greedy, start token 11, stops at eos 12, at most 16 positions);
        load with ``attn_implementation="eager"`` to get attention weights
    preprocessor_config.json
        the ``WhisperFeatureExtractor`` (80 mel bins, 16 kHz, 3 s window, hop 160, n_fft 400):
        any clip of <= 3 s -> input_features (80, 300) = 2 x max_source_positions
    tokenizer.json, tokenizer_config.json
        a ``tokenizers`` WordLevel tokenizer over the 16 ids (``AutoTokenizer.from_pretrained(dir)``
        gives transformers' ``TokenizersBackend``, alias ``PreTrainedTokenizerFast``)
    training_report.json
        seeds, config, data sizes, per-epoch history, test exact-sequence accuracy and word error
        rate, cross-attention-vs-word-timing agreement, timing, model bytes

Vocabulary (16 ids): 0-9 the digits, spelled as the words "zero".."nine" (the manifest text of
``speech_digits.py`` is these words, so ``tokenizer.decode(ids, skip_special_tokens=True)`` equals it);
10 ``<|pad|>``, 11 ``<|startoftranscript|>`` (decoder start), 12 ``<|endoftext|>`` (eos), 13 ``<|unk|>``,
14-15 reserved, never produced.

Data (``scripts/speech_digits.py``): train ``make_digit_clips(n_train, seed=0)``, test seed 1, demo
recording (made elsewhere) seed 2, and a validation split seed 3 that decides when to stop, so the
test split is never used for a training decision. Training uses ``labels=`` only (digits + eos,
-100 padded); the model shifts in the start token itself. AdamW, batch 32, learning rate 1e-3
constant, then cosine-decayed to 0 over the last ``--decay-epochs`` of ``--epochs`` (the constant
rate alone plateaued at ~88% validation accuracy, the errors nearly all on the last word of long
clips); training stops early when the validation exact-sequence accuracy reaches ``--target``
(then ``--extra-epochs`` more).

Resumable: after every epoch the model (safetensors), optimizer and batch-order RNG state
(``torch.save``; read back with ``weights_only=True``) and the history are written to
``--checkpoint-dir``, together with the synthesized features; ``--resume`` continues from there.

Usage: ``python scripts/train_demo_whisper.py [--threads 1] [--resume] [--out DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speech_digits import (  # noqa: E402  (after the sys.path insert, as in train_demo_vit.py)
    DEMO_SEED,
    DIGIT_WORDS,
    SAMPLE_RATE,
    TEST_SEED,
    TRAIN_SEED,
    VOICES,
    make_digit_clips,
)

DEFAULT_OUT = HERE.parent / "sample_data" / "models" / "digits-whisper"
DEFAULT_CHECKPOINTS = Path(tempfile.gettempdir()) / "attnviz-digits-whisper-ckpt"
VAL_SEED = 3

# token ids: the digits are their own ids
PAD_ID, START_ID, EOS_ID, UNK_ID = 10, 11, 12, 13
SPECIAL_TOKENS = ("<|pad|>", "<|startoftranscript|>", "<|endoftext|>", "<|unk|>", "<|reserved0|>", "<|reserved1|>")
VOCAB_SIZE = 16
MAX_SOURCE_POSITIONS = 150            # encoder frames (20 ms each) = 3 s
MAX_TARGET_POSITIONS = 16             # start + up to 5 digits + eos fits with room to spare
FRAME_SECONDS = 0.02                  # one encoder frame: 2 feature frames of 10 ms (conv stride 2)
FEATURE_KWARGS = {"feature_size": 80, "sampling_rate": SAMPLE_RATE, "chunk_length": 3, "hop_length": 160, "n_fft": 400}


# ----------------------------------------------------------------------------- building blocks

def build_tokenizer():
    """The 16-token word-level tokenizer: "three nine one" <-> [3, 9, 1].

    Returns:
        ``transformers.PreTrainedTokenizerFast`` (in transformers 5 an alias of ``TokenizersBackend``)
        with pad/bos/eos/unk set; bos is the start-of-transcript token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(DIGIT_WORDS + SPECIAL_TOKENS)}
    assert len(vocab) == VOCAB_SIZE and vocab["<|pad|>"] == PAD_ID and vocab["<|endoftext|>"] == EOS_ID
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: tokenizers joins decoded tokens with single spaces, which is the manifest text
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|startoftranscript|>",
        eos_token="<|endoftext|>", unk_token="<|unk|>",
        additional_special_tokens=["<|reserved0|>", "<|reserved1|>"],
        model_max_length=MAX_TARGET_POSITIONS, clean_up_tokenization_spaces=False)


def build_config(args):
    """``WhisperConfig`` of the demo model; every special id < vocab_size, no suppressed tokens."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=VOCAB_SIZE, num_mel_bins=FEATURE_KWARGS["feature_size"], d_model=args.d_model,
        encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn,
        max_source_positions=MAX_SOURCE_POSITIONS, max_target_positions=MAX_TARGET_POSITIONS,
        pad_token_id=PAD_ID, bos_token_id=START_ID, eos_token_id=EOS_ID, decoder_start_token_id=START_ID,
        # Whisper's defaults (e.g. [220, 50256]) exceed a 16-token vocabulary
        suppress_tokens=[], begin_suppress_tokens=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, apply_spec_augment=False,
    )


def build_generation_config():
    """Greedy decoding that the tiny vocabulary can honour: no forced_decoder_ids, language, task or
    timestamps (Whisper's generate reads those only when present)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=START_ID, bos_token_id=START_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        max_length=MAX_TARGET_POSITIONS, suppress_tokens=[], begin_suppress_tokens=None)


def make_labels(token_lists) -> np.ndarray:
    """Training targets: digits + eos, padded with -100. int64 (n, max_len + 1)."""
    width = max(len(t) for t in token_lists) + 1
    labels = np.full((len(token_lists), width), -100, dtype=np.int64)
    for i, t in enumerate(token_lists):
        labels[i, :len(t)] = t
        labels[i, len(t)] = EOS_ID
    return labels


def synthesize_split(n: int, seed: int, feature_extractor, workers: int) -> dict:
    """One split as arrays.

    Returns:
        dict with ``features`` float32 (n, 80, 300), ``tokens`` int64 (n, 5) (-1 padded),
        ``lengths`` int64 (n,), ``spans`` float64 (n, 5, 2) word start/end seconds (nan padded),
        ``durations`` float64 (n,).
    """
    clips = make_digit_clips(n, seed, workers=workers)
    feats = feature_extractor([c.waveform for c in clips], sampling_rate=SAMPLE_RATE,
                              return_tensors="np").input_features.astype(np.float32)
    k = max(len(c.tokens) for c in clips)
    tokens = np.full((n, k), -1, dtype=np.int64)
    spans = np.full((n, k, 2), np.nan)
    for i, c in enumerate(clips):
        tokens[i, :len(c.tokens)] = c.tokens
        spans[i, :len(c.words)] = [(w.start, w.end) for w in c.words]
    return {"features": feats, "tokens": tokens, "lengths": np.array([len(c.tokens) for c in clips]),
            "spans": spans, "durations": np.array([c.duration for c in clips])}


def token_lists(split: dict) -> list[list[int]]:
    """The digit sequence of every clip of a split (padding removed)."""
    return [row[:n].tolist() for row, n in zip(split["tokens"], split["lengths"])]


def edit_ops(ref: list[int], hyp: list[int]) -> tuple[int, int, int]:
    """Levenshtein alignment of two token sequences: (substitutions, deletions, insertions) of one
    minimal alignment (ties broken substitution > deletion > insertion). S + D + I = edit distance."""
    n, m = len(ref), len(hyp)
    # cost[i][j] = (distance, S, D, I) for ref[:i] vs hyp[:j]
    cost = [[(j, 0, 0, j) for j in range(m + 1)]] + [[(i, 0, i, 0)] + [None] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d, s, dl, ins = cost[i - 1][j - 1]
            sub = (d + (ref[i - 1] != hyp[j - 1]), s + (ref[i - 1] != hyp[j - 1]), dl, ins)
            d, s, dl, ins = cost[i - 1][j]
            dele = (d + 1, s, dl + 1, ins)
            d, s, dl, ins = cost[i][j - 1]
            inse = (d + 1, s, dl, ins + 1)
            cost[i][j] = min((sub, dele, inse), key=lambda c: c[0])
    return cost[n][m][1:]


def decode_digits(ids) -> list[int]:
    """Generated ids -> the digit sequence: drop a leading start token, stop at eos, keep digits."""
    out = []
    for t in ids:
        t = int(t)
        if t == EOS_ID:
            break
        if t < 10:
            out.append(t)
    return out


def transcribe(model, features, batch_size: int = 250) -> list[list[int]]:
    """Greedy transcripts of (n, 80, 300) features through ``model.generate`` (no extra arguments,
    exactly what a user of the saved model runs)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            seqs = model.generate(torch.from_numpy(features[i:i + batch_size]))
            out.extend(decode_digits(s) for s in seqs)
    return out


def score(refs: list[list[int]], hyps: list[list[int]]) -> dict:
    """Exact-sequence accuracy and word error rate (S + D + I) / N over digit tokens."""
    s = d = ins = 0
    for r, h in zip(refs, hyps):
        a, b, c = edit_ops(r, h)
        s, d, ins = s + a, d + b, ins + c
    n_words = sum(len(r) for r in refs)
    return {"exact_sequence_accuracy": float(np.mean([r == h for r, h in zip(refs, hyps)])),
            "wer": (s + d + ins) / n_words, "substitutions": s, "deletions": d, "insertions": ins,
            "n_words": n_words, "n_clips": len(refs)}


def cross_attention_in_span(model, split: dict, batch_size: int = 100) -> dict:
    """How often the cross-attention of the step that emits a digit peaks inside that word.

    Teacher-forced pass (eager attention, ``output_attentions=True``) with decoder input
    [start, d_1 .. d_n]: query row k is the step that predicts digit k+1. For each decoder layer the
    cross-attention (B, H, T_dec, 150) is averaged over heads (and, separately, taken per head);
    its argmax frame f covers [0.02 f, 0.02 (f + 1)) s and counts as inside when its centre
    0.02 f + 0.01 lies in the word's [start, end].

    Returns:
        dict with ``per_layer`` (n_layers,) and ``per_head`` (n_layers, n_heads) shares in [0, 1],
        and ``n_digits``.
    """
    import torch

    model.set_attn_implementation("eager")
    model.eval()
    n_layers = model.config.decoder_layers
    n_heads = model.config.decoder_attention_heads
    hits_layer = np.zeros(n_layers)
    hits_head = np.zeros((n_layers, n_heads))
    n_digits = 0
    centres = np.arange(MAX_SOURCE_POSITIONS) * FRAME_SECONDS + FRAME_SECONDS / 2
    lists = token_lists(split)
    with torch.no_grad():
        for i in range(0, len(lists), batch_size):
            batch = lists[i:i + batch_size]
            width = max(len(t) for t in batch)
            dec = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            for j, t in enumerate(batch):
                dec[j, 0] = START_ID
                dec[j, 1:len(t)] = torch.tensor(t[:-1], dtype=torch.long)
            out = model(input_features=torch.from_numpy(split["features"][i:i + batch_size]),
                        decoder_input_ids=dec, output_attentions=True)
            for layer, att in enumerate(out.cross_attentions):         # (B, H, T_dec, 150)
                att = att.numpy()
                peak_mean = centres[att.mean(1).argmax(-1)]              # (B, T_dec) seconds
                peak_head = centres[att.argmax(-1)]                      # (B, H, T_dec)
                for j, t in enumerate(batch):
                    start, end = split["spans"][i + j, :len(t), 0], split["spans"][i + j, :len(t), 1]
                    pm = peak_mean[j, :len(t)]
                    hits_layer[layer] += np.sum((pm >= start) & (pm <= end))
                    ph = peak_head[j, :, :len(t)]
                    hits_head[layer] += np.sum((ph >= start) & (ph <= end), axis=1)
            n_digits += sum(len(t) for t in batch)
    return {"per_layer": (hits_layer / n_digits).round(4).tolist(),
            "per_head": (hits_head / n_digits).round(4).tolist(), "n_digits": int(n_digits)}


# ----------------------------------------------------------------------------- checkpoints

def data_fingerprint(args) -> str:
    """Hash of everything the synthesized data depends on (sizes, seeds, voices, feature settings)."""
    key = json.dumps({"n": [args.n_train, args.n_val, args.n_test], "seeds": [TRAIN_SEED, VAL_SEED, TEST_SEED],
                      "voices": VOICES, "features": FEATURE_KWARGS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_or_make_data(args, feature_extractor) -> tuple[dict, float]:
    """Train/val/test splits, from ``--checkpoint-dir/data.npz`` when it matches, else synthesized.

    Returns:
        ({"train": split, "val": split, "test": split}, seconds spent synthesizing).
    """
    cache = Path(args.checkpoint_dir) / f"data-{data_fingerprint(args)}.npz"
    if args.resume and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            data = {s: {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(s + "/")}
                    for s in ("train", "val", "test")}
        print(f"data: read {cache}", flush=True)
        return data, 0.0
    t0 = time.perf_counter()
    data = {name: synthesize_split(n, seed, feature_extractor, args.workers)
            for name, n, seed in (("train", args.n_train, TRAIN_SEED), ("val", args.n_val, VAL_SEED),
                                  ("test", args.n_test, TEST_SEED))}
    seconds = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{s}/{k}": v for s, d in data.items() for k, v in d.items()})
    return data, seconds


def save_checkpoint(ckpt: Path, model, opt, gen, state: dict) -> None:
    """Model weights as safetensors; optimizer + RNG state as a tensors-only torch file."""
    import torch
    from safetensors.torch import save_model

    ckpt.mkdir(parents=True, exist_ok=True)
    save_model(model, str(ckpt / "model.safetensors.tmp"))   # drops the tied lm head copy
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()}, ckpt / "train_state.pt.tmp")
    (ckpt / "state.json.tmp").write_text(json.dumps(state, indent=1))
    for name in ("model.safetensors", "train_state.pt", "state.json"):   # complete files only
        os.replace(ckpt / f"{name}.tmp", ckpt / name)


def load_checkpoint(ckpt: Path, model, opt, gen) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the saved state dict (epoch, history, ...)."""
    import torch
    from safetensors.torch import load_model

    load_model(model, str(ckpt / "model.safetensors"))
    extra = torch.load(ckpt / "train_state.pt", weights_only=True)
    opt.load_state_dict(extra["optimizer"])
    gen.set_state(extra["generator"])
    return json.loads((ckpt / "state.json").read_text())


# ----------------------------------------------------------------------------- training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the attnviz demo speech model (tiny Whisper, spoken digits).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0, help="torch seed (init, batch order)")
    p.add_argument("--n-train", type=int, default=3200)
    p.add_argument("--n-val", type=int, default=400, help="validation clips (seed 3): decide when to stop")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--encoder-layers", type=int, default=3)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=14, help="length of the schedule (upper limit)")
    p.add_argument("--decay-epochs", type=int, default=5,
                   help="cosine-decay the learning rate to 0 over the last N epochs (0: constant)")
    p.add_argument("--target", type=float, default=0.97, help="stop once validation exact-sequence accuracy reaches this")
    p.add_argument("--extra-epochs", type=int, default=0, help="epochs to continue after reaching --target")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes")
    p.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINTS)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--no-save", action="store_true", help="pilot run: write no model")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    feature_extractor = WhisperFeatureExtractor(**FEATURE_KWARGS)
    assert feature_extractor.nb_max_frames == 2 * MAX_SOURCE_POSITIONS
    data, synth_seconds = load_or_make_data(args, feature_extractor)
    for name in ("train", "val", "test"):
        d = data[name]
        print(f"data {name}: {len(d['lengths'])} clips, {int(d['lengths'].sum())} words, "
              f"{d['durations'].sum() / 60:.1f} min of audio", flush=True)
    print(f"data synthesized in {synth_seconds:.1f} s", flush=True)
    x_train = torch.from_numpy(data["train"]["features"])
    y_train = torch.from_numpy(make_labels(token_lists(data["train"])))
    refs_val, refs_test = token_lists(data["val"]), token_lists(data["test"])

    config = build_config(args)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = build_generation_config()
    model.set_attn_implementation("sdpa")   # training kernel; attention weights are measured with eager
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)

    history, start_epoch, train_seconds, reached_at, resumed_after = [], 0, 0.0, None, []
    ckpt = Path(args.checkpoint_dir) / "last"
    if args.resume and (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, opt, gen)
        history, start_epoch = state["history"], state["epoch"]
        train_seconds, reached_at = state["train_seconds"], state["reached_at"]
        resumed_after = state.get("resumed_after", [])
        synth_seconds = state.get("synthesis_seconds", synth_seconds)   # measured by the first run
        print(f"resumed after epoch {start_epoch}", flush=True)

    n = len(y_train)
    steps_per_epoch = -(-n // args.batch_size)
    decay_from = (args.epochs - args.decay_epochs) * steps_per_epoch
    decay_steps = max(1, args.decay_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        # a pure function of the global step, so a resumed run follows the same schedule
        if args.decay_epochs <= 0 or step < decay_from:
            return args.lr
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - decay_from) / decay_steps)))

    for epoch in range(start_epoch, args.epochs):
        if reached_at is not None and epoch >= reached_at + args.extra_epochs:
            break
        if epoch == start_epoch and start_epoch > 0:
            resumed_after.append(start_epoch)    # only when this process trains on
        t_ep = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss, n_batches = 0.0, 0
        for b in range(0, n, args.batch_size):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + n_batches)
            idx = perm[b:b + args.batch_size]
            labels = y_train[idx]
            labels = labels[:, :int((labels != -100).sum(1).max())]    # trim to the batch's longest
            loss = model(input_features=x_train[idx], labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total_loss += float(loss.detach())
            n_batches += 1
        fit_seconds = time.perf_counter() - t_ep
        train_seconds += fit_seconds
        val = score(refs_val, transcribe(model, data["val"]["features"]))
        rec = {"epoch": epoch + 1, "lr_end": float(f"{opt.param_groups[0]['lr']:.3g}"),
               "loss": round(total_loss / n_batches, 5),
               "val_exact_sequence_accuracy": val["exact_sequence_accuracy"], "val_wer": round(val["wer"], 5),
               "fit_seconds": round(fit_seconds, 1), "seconds": round(time.perf_counter() - t_ep, 1)}
        history.append(rec)
        print(f"epoch {epoch + 1:3d}  loss {rec['loss']:.4f}  val exact {val['exact_sequence_accuracy']:.4f}  "
              f"val WER {val['wer']:.4f}  {rec['seconds']:.1f} s", flush=True)
        if reached_at is None and val["exact_sequence_accuracy"] >= args.target:
            reached_at = epoch + 1
        save_checkpoint(ckpt, model, opt, gen, {"epoch": epoch + 1, "history": history,
                                                "train_seconds": train_seconds, "reached_at": reached_at,
                                                "resumed_after": resumed_after,
                                                "synthesis_seconds": synth_seconds})

    test = score(refs_test, transcribe(model, data["test"]["features"]))
    attention = cross_attention_in_span(model, data["test"])
    seconds = time.perf_counter() - t_start
    print(f"test: exact-sequence accuracy {test['exact_sequence_accuracy']:.4f}, WER {test['wer']:.4f} "
          f"(S {test['substitutions']}, D {test['deletions']}, I {test['insertions']}, N {test['n_words']})")
    print(f"cross-attention argmax inside the word, per decoder layer: {attention['per_layer']}")

    report = {
        "test": test,
        "cross_attention_in_word_span": {
            "definition": "teacher-forced pass (eager attention) with decoder input [start, d_1..d_n]; for the "
                          "query step that predicts digit k, the argmax over encoder frames of the cross-attention "
                          "averaged over heads (per_head: of each head); frame f covers [0.02 f, 0.02 (f+1)) s "
                          "(encoder downsamples the 10 ms feature frames x2) and is inside when its centre "
                          "0.02 f + 0.01 lies in the word's [start, end]; share of test digits",
            **attention},
        "epochs": len(history),
        "reached_target_at_epoch": reached_at,
        "train_seconds": round(train_seconds, 1),
        "resumed_after_epochs": resumed_after,
        "seconds_this_process": round(seconds, 1),
        "seeds": {"torch": args.seed, "train_clips": TRAIN_SEED, "validation_clips": VAL_SEED,
                  "test_clips": TEST_SEED, "demo_recording_clips": DEMO_SEED},
        "data": {"generator": "scripts/speech_digits.py:make_digit_clips", "n_train": args.n_train,
                 "n_val": args.n_val, "n_test": args.n_test,
                 "train_words": int(data["train"]["lengths"].sum()),
                 "test_words": int(data["test"]["lengths"].sum()),
                 "words_per_clip_histogram_train": np.bincount(data["train"]["lengths"]).tolist(),
                 "voices": list(VOICES), "sample_rate": SAMPLE_RATE, "max_seconds": 3.0,
                 "synthesis_seconds": round(synth_seconds, 1)},
        "features": {"class": "WhisperFeatureExtractor", **FEATURE_KWARGS,
                     "input_features_shape": [FEATURE_KWARGS["feature_size"], 2 * MAX_SOURCE_POSITIONS]},
        "config": {"d_model": args.d_model, "encoder_layers": args.encoder_layers,
                   "decoder_layers": args.decoder_layers, "heads": args.heads, "ffn_dim": args.ffn,
                   "vocab_size": VOCAB_SIZE, "max_source_positions": MAX_SOURCE_POSITIONS,
                   "max_target_positions": MAX_TARGET_POSITIONS, "parameters": n_params,
                   "vocabulary": list(DIGIT_WORDS + SPECIAL_TOKENS),
                   "pad_token_id": PAD_ID, "decoder_start_token_id": START_ID, "eos_token_id": EOS_ID},
        "training": {"optimizer": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay,
                     "schedule": f"constant for {args.epochs - args.decay_epochs} epochs, then cosine to 0 "
                                 f"over {args.decay_epochs} epochs (per step)",
                     "batch_size": args.batch_size, "grad_clip": 1.0,
                     "stop": f"validation exact-sequence accuracy >= {args.target} (+{args.extra_epochs} epochs) "
                             f"or {args.epochs} epochs", "threads": args.threads,
                     "attention_kernel": "sdpa"},
        "wer_implementation": "own Levenshtein alignment over digit tokens (scripts/train_demo_whisper.py:edit_ops)",
        "history": history,
    }

    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)                       # safetensors (transformers 5 writes no pickle)
        feature_extractor.save_pretrained(out)
        build_tokenizer().save_pretrained(out)
        for f in out.iterdir():
            os.chmod(f, 0o644)                           # safetensors writes 0600
        report["model_bytes"] = os.path.getsize(out / "model.safetensors")
        report["reload_check"] = reload_check(out, data["test"], refs_test)
        (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        os.chmod(out / "training_report.json", 0o644)
        print(f"saved to {out} ({report['model_bytes'] / 1e6:.2f} MB); reload check {report['reload_check']}")
    return report


def reload_check(out: Path, split: dict, refs: list[list[int]], n: int = 200) -> dict:
    """Load the saved folder the way the product does (AutoFeatureExtractor, AutoTokenizer, the model
    class) and transcribe ``n`` test clips with a bare ``model.generate(input_features)``."""
    import torch
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    n = min(n, len(refs))
    model = WhisperForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(out)
    fe = AutoFeatureExtractor.from_pretrained(out)
    assert fe.nb_max_frames == 2 * model.config.max_source_positions
    with torch.no_grad():
        seqs = model.generate(torch.from_numpy(split["features"][:n]))
    texts = tokenizer.batch_decode(seqs, skip_special_tokens=True)
    want = [" ".join(DIGIT_WORDS[d] for d in r) for r in refs[:n]]
    return {"n_clips": n, "text_exact": float(np.mean([a == b for a, b in zip(texts, want)])),
            "tokenizer_class": type(tokenizer).__name__, "feature_extractor_class": type(fe).__name__}


if __name__ == "__main__":
    main()
