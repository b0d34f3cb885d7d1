"""Deterministic spoken-digit clips for the attnviz demo speech model (espeak-ng, 16 kHz).

Each clip is a string of 1-5 English digit words ("zero".."nine") spoken by one synthetic speaker.
Every word is synthesized by its own ``espeak-ng`` call, resampled from espeak's 22,050 Hz to
16,000 Hz (``scipy.signal.resample_poly(x, 320, 441)``) and trimmed where it first and last reaches
2% of its peak, so the word edges in the clip are known to the sample. The words are joined with
0.05-0.3 s of digital silence, with the same range of silence before the first and after the last
word. Clips are at most 3 s long (the demo model's feature window) and are not padded: their length
varies. Where the drawn words and gaps would exceed the limit, trailing words are dropped (this
happens to some slow 5-word clips; at least one word always remains).

The speaker of a clip: one of ``VOICES`` (espeak-ng voices and their ``+f``/``+m`` variants), a base
speed (``-s``, words per minute) in 130-190 and a base pitch (``-p``) in 30-70; every word jitters the
speed by up to +-10 and the pitch by up to +-5 (clipped to those ranges) so that repeated digits of
one clip are not identical copies. A clip's peak amplitude is drawn in 0.3-0.9.

Text convention: ``Clip.text`` is the digit *words* separated by single spaces ("three nine one"),
the same strings as ``Clip.words[i].word`` and as the demo tokenizer's tokens, so a decoded
transcript compares with the manifest text directly. ``Clip.tokens`` are the digit values
(3, 9, 1) = the demo model's token ids.

Everything is a pure function of ``(n, seed, parameters)`` and the installed espeak-ng: all random
draws come from ``numpy.random.default_rng(seed)`` before any synthesis, and synthesis only reads
espeak-ng's stdout (nothing is written to disk, nothing is cached between calls). About 10-15 ms per
word on one core; ``workers`` espeak-ng processes run in parallel. Seeds used by the demo (see
``scripts/README.md``): train 0, test 1, demo recording 2. The streams are independent; short clips
can of course repeat a digit string of another split (there are only 10 one-digit strings), but not
with the same speaker, speed, pitch and gaps.

espeak-ng is needed only to *build* the demo data (``apt-get install espeak-ng``); the attnviz product
never calls it.

Example::

    from speech_digits import make_digit_clips, write_split
    clips = make_digit_clips(64, seed=2)
    clips[0].waveform.shape          # (n_samples,) float32 at 16 kHz, n_samples <= 48000
    clips[0].words[0]                # WordSpan(word='three', start=0.1234, end=0.5678)
    write_split(clips, "out/demo")   # out/demo/clips/0000.wav ... + out/demo/manifest.jsonl

Command line: ``python scripts/speech_digits.py --split demo --n 64 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Digit value -> the spoken word (and the demo tokenizer's token for that id)."""

VOICES: tuple[str, ...] = (
    "en-us", "en-us+f3", "en-us+m3", "en-gb", "en+f2", "en-gb-scotland",
    "en-gb-x-rp", "en-gb-x-rp+m5", "en-029", "en-us+f4",
)
"""espeak-ng voices a clip's speaker is drawn from (``+fN``/``+mN`` are espeak-ng's voice variants).
All ten sound different; note that espeak-ng 1.51 silently ignores a variant on ``en-gb``
(``en-gb+f2`` == ``en-gb``), hence ``en+f2`` (``en`` is the same British voice)."""

#: Seeds of the three disjoint splits used for the demo model and its recording.
TRAIN_SEED, TEST_SEED, DEMO_SEED = 0, 1, 2
SPLIT_SEEDS = {"train": TRAIN_SEED, "test": TEST_SEED, "demo": DEMO_SEED}

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
SPEED_RANGE = (130, 190)     # espeak-ng -s (words per minute)
PITCH_RANGE = (30, 70)       # espeak-ng -p (0-99)
SPEED_JITTER, PITCH_JITTER = 10, 5
TRIM_FRACTION = 0.02         # word edges: first/last sample reaching 2% of the word's peak


@dataclass(frozen=True)
class WordSpan:
    """One word of a clip: ``start``/``end`` in seconds from the clip start (``end`` exclusive)."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Clip:
    """One spoken digit string.

    Attributes:
        waveform: float32 (n_samples,), mono, ``SAMPLE_RATE`` Hz, peak = ``gain``.
        text: the digit words joined by single spaces, e.g. "three nine one".
        tokens: digit values, e.g. (3, 9, 1); the demo model's token ids.
        words: one ``WordSpan`` per word, in order; start/end are exact sample positions / 16000.
        word_samples: ((start, end), ...) the same spans as sample indices (end exclusive).
        voice, speed, pitch: the clip's speaker (base speed and pitch before per-word jitter).
        gain: the clip's peak amplitude.
    """

    waveform: np.ndarray
    text: str
    tokens: tuple[int, ...]
    words: tuple[WordSpan, ...]
    word_samples: tuple[tuple[int, int], ...]
    voice: str
    speed: int
    pitch: int
    gain: float

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.waveform.shape[0] / SAMPLE_RATE


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` executable is on PATH."""
    return shutil.which("espeak-ng") is not None


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode espeak-ng's streamed 16-bit PCM WAV (its header sizes are placeholders when it writes
    to a pipe, so the chunk lengths are not trusted): float32 (n,), sample rate."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV stream")
    fmt = data.find(b"fmt ")
    channels = int.from_bytes(data[fmt + 10:fmt + 12], "little")
    rate = int.from_bytes(data[fmt + 12:fmt + 16], "little")
    bits = int.from_bytes(data[fmt + 22:fmt + 24], "little")
    if channels != 1 or bits != 16:
        raise RuntimeError(f"unexpected espeak-ng output: {channels} channels, {bits} bits")
    start = data.find(b"data", fmt) + 8
    body = data[start:start + (len(data) - start) // 2 * 2]
    return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0, rate


def synthesize_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One word from espeak-ng, resampled to 16 kHz and trimmed at ``TRIM_FRACTION`` of its peak.

    Returns:
        float32 (n,) at ``SAMPLE_RATE``; its first and last samples are the word's edges.
    """
    result = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--", word],
        capture_output=True, check=True)
    x, rate = _parse_wav(result.stdout)
    if rate == ESPEAK_RATE:
        y = _resample(x, 320, 441)
    else:  # another espeak-ng build: same filter, other ratio
        g = gcd(SAMPLE_RATE, rate)
        y = _resample(x, SAMPLE_RATE // g, rate // g)
    loud = np.flatnonzero(np.abs(y) >= TRIM_FRACTION * np.abs(y).max())
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {word!r} ({voice}, -s {speed}, -p {pitch})")
    return y[loud[0]:loud[-1] + 1].astype(np.float32)


def _resample(x: np.ndarray, up: int, down: int) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(x, up, down)


@dataclass(frozen=True)
class _Plan:
    """All random draws for one clip (made before any synthesis, so a seed fixes everything)."""

    digits: tuple[int, ...]
    voice: str
    speed: int
    pitch: int
    word_params: tuple[tuple[int, int], ...]   # (speed, pitch) per word after jitter
    gaps: tuple[float, ...]                    # seconds: before word 0, between words, after the last
    gain: float


def _draw_plans(n: int, seed: int, min_words: int, max_words: int,
                gap_range: tuple[float, float]) -> list[_Plan]:
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        digits = tuple(int(d) for d in rng.integers(0, 10, size=k))
        voice = VOICES[int(rng.integers(len(VOICES)))]
        speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
        pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
        ds = rng.integers(-SPEED_JITTER, SPEED_JITTER + 1, size=k)
        dp = rng.integers(-PITCH_JITTER, PITCH_JITTER + 1, size=k)
        word_params = tuple((int(np.clip(speed + a, *SPEED_RANGE)), int(np.clip(pitch + b, *PITCH_RANGE)))
                            for a, b in zip(ds, dp))
        gaps = tuple(float(g) for g in rng.uniform(gap_range[0], gap_range[1], size=k + 1))
        gain = float(rng.uniform(0.3, 0.9))
        plans.append(_Plan(digits, voice, speed, pitch, word_params, gaps, gain))
    return plans


def _assemble(plan: _Plan, audio: dict, max_samples: int) -> Clip:
    words = [audio[(DIGIT_WORDS[d], plan.voice) + wp] for d, wp in zip(plan.digits, plan.word_params)]
    gaps = [round(g * SAMPLE_RATE) for g in plan.gaps]

    def total(k: int) -> int:  # samples of the first k words with their gaps and a closing silence
        return gaps[0] + sum(len(w) for w in words[:k]) + sum(gaps[1:k]) + gaps[k]

    k = len(words)
    while k > 1 and total(k) > max_samples:
        k -= 1   # drop trailing words rather than squeeze gaps: the gap statistics stay as drawn
    if total(k) > max_samples:
        raise RuntimeError(f"one word does not fit into {max_samples} samples")
    pieces, spans, pos = [np.zeros(gaps[0], np.float32)], [], gaps[0]
    for i in range(k):
        pieces.append(words[i])
        spans.append((pos, pos + len(words[i])))
        pos += len(words[i])
        pieces.append(np.zeros(gaps[i + 1], np.float32))
        pos += gaps[i + 1]
    wave = np.concatenate(pieces)
    wave *= plan.gain / np.abs(wave).max()
    digits = plan.digits[:k]
    names = tuple(DIGIT_WORDS[d] for d in digits)
    return Clip(
        waveform=wave.astype(np.float32), text=" ".join(names), tokens=digits,
        words=tuple(WordSpan(w, s / SAMPLE_RATE, e / SAMPLE_RATE) for w, (s, e) in zip(names, spans)),
        word_samples=tuple(spans), voice=plan.voice, speed=plan.speed, pitch=plan.pitch, gain=plan.gain)


def make_digit_clips(n: int, seed: int, *, min_words: int = 1, max_words: int = 5,
                     max_seconds: float = 3.0, gap_range: tuple[float, float] = (0.05, 0.3),
                     workers: int = 2) -> list[Clip]:
    """``n`` spoken digit strings, a pure function of the arguments (``workers`` changes only speed).

    Args:
        n: number of clips.
        seed: ``numpy.random.default_rng`` seed of every draw (digits, speaker, gaps, gain).
        min_words, max_words: digits per clip (uniform), before any trailing word is dropped.
        max_seconds: clip length limit; longer draws lose trailing words.
        gap_range: silence (s) before, between and after the words, uniform.
        workers: espeak-ng processes run in parallel.

    Returns:
        ``n`` ``Clip`` objects.
    """
    if not espeak_available():
        raise RuntimeError("espeak-ng not found on PATH (apt-get install espeak-ng); it is needed only "
                           "to build the demo speech data")
    plans = _draw_plans(n, seed, min_words, max_words, gap_range)
    requests = sorted({(DIGIT_WORDS[d], p.voice) + wp for p in plans for d, wp in zip(p.digits, p.word_params)})
    # identical requests within one call are synthesized once (the output is deterministic anyway)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        audio = dict(zip(requests, pool.map(lambda r: synthesize_word(*r), requests)))
    max_samples = round(max_seconds * SAMPLE_RATE)
    return [_assemble(p, audio, max_samples) for p in plans]


def manifest_row(clip: Clip, audio_path: str, decimals: int = 4) -> dict:
    """The DESIGN.md audio manifest entry of one clip: ``{"audio", "text", "words": [{"word", "start",
    "end"}]}``; times in seconds rounded to ``decimals`` (4 decimals = 100 us, finer than a sample
    is 62.5 us, so rounding moves an edge by under one sample)."""
    return {"audio": audio_path, "text": clip.text,
            "words": [{"word": w.word, "start": round(w.start, decimals), "end": round(w.end, decimals)}
                      for w in clip.words]}


def write_split(clips: list[Clip], folder: str | Path) -> Path:
    """Write ``folder/clips/NNNN.wav`` (16 kHz PCM_16 mono) and ``folder/manifest.jsonl``.

    Returns:
        The manifest path. Audio paths in it are relative to the manifest.
    """
    import soundfile as sf

    folder = Path(folder)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, clip in enumerate(clips):
        rel = f"clips/{i:04d}.wav"
        sf.write(folder / rel, clip.waveform, SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps(manifest_row(clip, rel)))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="Write spoken digit clips + manifest.jsonl (needs espeak-ng).")
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="demo", help="seed: train 0, test 1, demo 2")
    p.add_argument("--seed", type=int, default=None, help="override the split's seed")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-words", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    seed = SPLIT_SEEDS[args.split] if args.seed is None else args.seed
    clips = make_digit_clips(args.n, seed, max_words=args.max_words, workers=args.workers)
    manifest = write_split(clips, args.out)
    print(f"{len(clips)} clips (seed {seed}, {sum(c.duration for c in clips):.1f} s of audio) -> {manifest}")
    return manifest


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
