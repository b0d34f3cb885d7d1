"""Test helpers for the speech-to-text family: tiny random Whisper checkpoints of each kind users have,
saved with ``save_pretrained``; synthetic clips and manifests; one small real recording shared by tests.

Checkpoint kinds (:func:`save_tiny_whisper`), laid out like the real ones (special tokens after the text
vocabulary, timestamp tokens last) in a vocabulary of 40:

* ``"plain"``: like the demo model: decoder start only, no languages, no ``<|notimestamps|>``;
* ``"en"``: like ``whisper-tiny.en``: ``forced_decoder_ids [[1, <|notimestamps|>]]``, ``is_multilingual`` false,
  ``alignment_heads``;
* ``"multilingual"``: like ``whisper-tiny``: ``lang_to_id``, ``task_to_id``, ``forced_decoder_ids
  [[1, None], [2, <|transcribe|>]]`` (the language is detected), ``no_timestamps_token_id``, ``alignment_heads``.

The generation config is written as JSON the way real checkpoints carry it (without transformers'
``_from_model_config`` flag, which would make transformers rebuild it from the model config and drop the
Whisper keys). Every special token id is < vocab_size; ``suppress_tokens=[]``, ``begin_suppress_tokens=None``
(the defaults name ids of the real 51,865-token vocabulary).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "hello", "world")
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
            "<|notimestamps|>")
VOCAB = 40
SAMPLE_RATE = 16_000


def token_ids() -> dict[str, int]:
    """Token -> id of the tiny vocabulary: words, the special tokens, then timestamp tokens up to VOCAB - 1 (as
    real checkpoints end their vocabulary with ``<|0.00|>`` ... after ``<|notimestamps|>``)."""
    names = WORDS + SPECIALS
    names += tuple(f"<|{0.02 * i:.2f}|>" for i in range(VOCAB - len(names)))
    return {w: i for i, w in enumerate(names)}


def save_tiny_whisper(path: str | Path, kind: str = "plain", *, encoder_layers: int = 2, decoder_layers: int = 2,
                      heads: int = 2, d_model: int = 32, n_mel: int = 20, window_seconds: int = 1,
                      max_target_positions: int = 24, seed: int = 0, text_only: bool = False) -> Path:
    """Save a tiny random ``WhisperForConditionalGeneration`` + feature extractor + tokenizer.

    Args:
        kind: "plain", "en" or "multilingual" (module docstring).
        window_seconds: the feature window (``max_source_positions = 50 * window_seconds``).
        text_only: suppress every special token but end-of-text in ``generate`` (``suppress_tokens``, as real
            checkpoints suppress tokens), so a random model writes words.

    Returns:
        the folder.
    """
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    if kind not in ("plain", "en", "multilingual"):
        raise ValueError(kind)
    path = Path(path)
    ids = token_ids()
    eos, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = T.WhisperConfig(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, num_mel_bins=n_mel, max_source_positions=50 * window_seconds,
        max_target_positions=max_target_positions, decoder_start_token_id=sot, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=eos, suppress_tokens=[], begin_suppress_tokens=None, init_std=0.2)
    torch.manual_seed(seed)
    model = T.WhisperForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    gen = {"decoder_start_token_id": sot, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
           "max_length": max_target_positions, "begin_suppress_tokens": None,
           "suppress_tokens": [i for i in range(len(WORDS) + 1, VOCAB)] if text_only else []}
    if kind == "en":
        gen.update(forced_decoder_ids=[[1, ids["<|notimestamps|>"]]], is_multilingual=False,
                   no_timestamps_token_id=ids["<|notimestamps|>"], alignment_heads=[[decoder_layers - 1, 0]])
    elif kind == "multilingual":
        gen.update(forced_decoder_ids=[[1, None], [2, ids["<|transcribe|>"]]], is_multilingual=True,
                   lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
                   task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
                   no_timestamps_token_id=ids["<|notimestamps|>"],
                   alignment_heads=[[decoder_layers - 1, 0], [decoder_layers - 1, heads - 1]])
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    core = Tokenizer(models.WordLevel(vocab=ids, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftranscript|>",
                                    eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                    additional_special_tokens=[t for t in ids if t.startswith("<|") and t != "<|endoftext|>"
                                                               and t != "<|startoftranscript|>"])
    tok.save_pretrained(path)
    T.WhisperFeatureExtractor(feature_size=n_mel, sampling_rate=SAMPLE_RATE, chunk_length=window_seconds,
                              hop_length=160, n_fft=400).save_pretrained(path)
    return path


def tone(seconds: float, *, rate: int = SAMPLE_RATE, freq: float = 440.0, seed: int = 0,
         bursts: tuple[tuple[float, float], ...] = ((0.1, 0.3),)) -> np.ndarray:
    """float32 ``[round(seconds * rate)]``: silence with tone-plus-noise bursts at the (start, end) seconds."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    wave = np.zeros(n, np.float32)
    for a, b in bursts:
        on = (t >= a) & (t < b)
        wave[on] = 0.4 * np.sin(2 * np.pi * freq * t[on]) + 0.05 * rng.standard_normal(on.sum())
    return wave


def write_clip(path: str | Path, wave: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype=subtype)
    return path


def write_manifest(folder: str | Path, clips: list[dict]) -> Path:
    """``folder/manifest.jsonl`` from rows (``{"audio": ..., "text": ..., "words": [...]}``)."""
    folder = Path(folder)
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in clips) + "\n", encoding="utf-8")
    return path


def write_word_clips(folder: str | Path, n: int = 3, *, seconds: float = 0.9) -> Path:
    """``n`` clips with two tone "words" each (different pitches) and a manifest with their true timings."""
    folder = Path(folder)
    rows = []
    for i in range(n):
        spans = ((0.08 + 0.02 * i, 0.33 + 0.02 * i), (0.48, 0.72 - 0.03 * i))
        wave = tone(seconds - 0.05 * i, freq=300 + 90 * i, seed=i, bursts=spans)
        write_clip(folder / "clips" / f"{i:02d}.wav", wave)
        rows.append({"audio": f"clips/{i:02d}.wav", "text": "one two",
                     "words": [{"word": w, "start": a, "end": b} for w, (a, b) in zip(("one", "two"), spans)]})
    return write_manifest(folder, rows)


@functools.lru_cache(maxsize=None)
def shared_recording() -> Path:
    """One small real s2t recording (made once per test session): a tiny plain Whisper, 3 clips with word
    timings, every attention kind, gradient + perturbation + encoder perturbation saliency, deletion curves.
    Tests must treat it as read-only (copy it to change it)."""
    from extractor.pipeline import ExtractOptions, extract

    root = Path(tempfile.mkdtemp(prefix="attnviz-s2t-"))
    atexit.register(shutil.rmtree, root, True)
    model = save_tiny_whisper(root / "model", "plain", text_only=True)
    manifest = write_word_clips(root / "data", 3)
    extract(ExtractOptions(model=str(model), input=str(manifest), out=str(root / "rec.h5"), batch_size=2,
                           attributions=("gradient", "perturbation", "encoder_perturbation"), progress=False,
                           family_options={"n_masks": 24, "mask_batch": 12, "deletion_steps": 4,
                                           "max_new_tokens": 5}))
    return root / "rec.h5"


# -- a synthetic s2t recording with known answers (analysis and page tests; no torch) --------------------------

SYN = dict(n_layers=2, n_heads=2, rows=4, frames=40, mel=4, encoder_frames=20)
#: the head whose cross-attention is exactly the (mean-pooled, normalised) saliency in every text row
SYN_ALIGNED_HEAD = (1, 0)


def synthetic_word_spans(sample: int) -> list[tuple[float, float]]:
    """Reference spans (s) of the 3 words of a synthetic clip (encoder frames 2-5, 8-11, 14-17, shifted by one
    frame per sample)."""
    return [((2 + 6 * w + sample) * 0.02, (6 + 6 * w + sample) * 0.02) for w in range(3)]


def make_s2t_recording(path: str | Path, *, n_samples: int = 3, seed: int = 0, deletion: bool = True,
                       family_extra: dict | None = None) -> Path:
    """A small s2t recording written through the real writer, with answers known by construction.

    Every clip has 3 text rows (the words "one", "two", "three"; reference "one two three") and an
    end-of-text row; row ``w``'s "perturbation" saliency is a bump over feature frames of word ``w``'s span;
    head :data:`SYN_ALIGNED_HEAD`'s cross-attention equals that saliency summed over mel, mean-pooled to encoder
    frames and normalised (so its row correlation is 1); the other heads are random. The "gradient" saliency is
    random. Deletion curves (``per_sample/deletion``) are given numbers.
    """
    from attnviz.analysis.crossattn import pool_frames, reduce_frequency
    from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout
    from attnviz.store.schema import PerSampleSpec

    rng = np.random.default_rng(seed)
    L, H, T, F, M, E = (SYN[k] for k in ("n_layers", "n_heads", "rows", "frames", "mel", "encoder_frames"))
    names = ["ca_mean", "ca_layer0", "ca_layer1", "perturbation", "random"]
    fractions = [0.0, 0.5, 1.0]
    family = {"encoder_frame_seconds": 0.02, "feature_frame_seconds": 0.01, "envelope_seconds": 0.005,
              "sample_rate": 16000, **({"deletion": {"explanations": names, "fractions": fractions}} if deletion else {}),
              **(family_extra or {})}
    stacks = [StackSpec("cross", L, H, T, E, TokenLayout(query_axis="tokens", key_axis="frames")),
              StackSpec("decoder_self", L, H, T, T, TokenLayout())]
    per_sample = [PerSampleSpec("log_mel", (M, F), "float16", ("mel", "frame")),
                  PerSampleSpec("waveform_envelope", (2, 80), "float16", ("bound", "bin"))]
    if deletion:
        per_sample.append(PerSampleSpec("deletion", (len(names), len(fractions), T), "float32",
                                        ("explanation", "fraction", "token")))
    w = RecordingWriter.create(
        path, family="s2t", model_name="synthetic-whisper", model_class="WhisperForConditionalGeneration",
        sample_ids=[f"clip_{i}.wav" for i in range(n_samples)], stacks=stacks, class_names=[], batch_size=n_samples,
        with_meta=True, target_source="prediction", per_sample=per_sample,
        attributions=[AttributionSpec("perturbation", (T, F, M), "spectrogram", "token_distribution", dtype="float16"),
                      AttributionSpec("gradient", (T, F, M), "spectrogram", "token_logprob", dtype="float16")],
        extraction_params={"family": family})
    cross = np.zeros((n_samples, L, H, T, E))
    pert = np.zeros((n_samples, T, F, M))
    metas = []
    for s in range(n_samples):
        spans = synthetic_word_spans(s)
        for r, (a, b) in enumerate(spans):
            j = np.arange(F)
            centre, width = (a + b) / 2 / 0.01, (b - a) / 0.01 / 2
            bump = np.exp(-0.5 * ((j + 0.5 - centre) / (0.6 * width)) ** 2)
            pert[s, r] = bump[:, None] * rng.uniform(0.5, 1.0, M)[None, :]
        pert[s, T - 1] = rng.random((F, M))  # the end-of-text row
        pooled = pool_frames(reduce_frequency(pert[s].astype(np.float16).astype(np.float64)), "mean")  # [T, E]
        for layer in range(L):
            for h in range(H):
                x = rng.random((T, E)) ** 4
                cross[s, layer, h] = x / x.sum(-1, keepdims=True)
        cross[s, SYN_ALIGNED_HEAD[0], SYN_ALIGNED_HEAD[1]] = pooled / pooled.sum(-1, keepdims=True)
        hyp = ["one", "two", "three"] if s != 1 else ["one", "two", "four"]  # one substitution in clip 1
        metas.append({"token_ids": [1, 2, 3, 12], "tokens": hyp + ["<|endoftext|>"], "prompt_rows": 0,
                      "special": [False, False, False, True], "logprob": [-0.1, -0.2, -0.3, -0.05],
                      "text": " ".join(hyp), "reference": "one two three", "duration": 0.4,
                      "n_feature_frames": F, "n_encoder_frames": E,
                      "words": [{"word": hyp[r], "rows": [r]} for r in range(3)],
                      "reference_words": [{"word": wd, "start": a, "end": b}
                                          for wd, (a, b) in zip(["one", "two", "three"], spans)]})
    dec = np.log(np.stack([np.stack([np.tile(np.linspace(0.9, 0.1 * (i + 1), 3)[:, None], (1, T))
                                     for i in range(len(names))]) for _ in range(n_samples)]))
    with w:
        w.write(SampleBatch(start=0, attention={"cross": cross, "decoder_self": np.tile(np.eye(T), (n_samples, L, H, 1, 1))},
                            predictions=np.full(n_samples, -1), logits=np.full((n_samples, 1), np.nan),
                            attributions={"perturbation": pert.astype(np.float16),
                                          "gradient": rng.random((n_samples, T, F, M)).astype(np.float16)},
                            meta=metas, per_sample={"log_mel": rng.standard_normal((n_samples, M, F)).astype(np.float16),
                                                    "waveform_envelope": np.stack([np.stack([-np.ones(80), np.ones(80)])] * n_samples)
                                                    .astype(np.float16) * 0.5,
                                                    **({"deletion": dec.astype(np.float32)} if deletion else {})}))
        w.finish()
    return Path(path)
