"""Enumerating audio inputs: one file, a folder, or a JSONL/CSV manifest (the ``audio`` input kind).

- **An audio file** (wav, flac, ogg: what soundfile/libsndfile reads): one sample.
- **A folder**, searched recursively, in sorted path order (subfolders give no labels: a speech model
  has no classes).
- **A manifest** (``.jsonl`` or ``.csv``), one clip per line/row, paths relative to the manifest::

      {"audio": "clips/a.wav", "text": "seven three", "words": [{"word": "seven", "start": 0.31, "end": 0.74}, ...]}

  ``text`` (the reference transcript) and ``words`` (word timings in seconds from the clip start) are
  optional. A CSV manifest has an ``audio`` column and optionally ``text`` (no word timings).

Every clip is decoded once up front (soundfile), mixed down to mono and measured, so that before the
recording is laid out (sample indices fixed, as ``--resume`` needs):

- an unreadable or empty file, a file at a sample rate that cannot be resampled to the model's rate
  (below :data:`MIN_RATE_FRACTION` of it: the band the model listens to would be mostly missing), or a
  clip longer than the model's window (``max_seconds``) is **skipped** with a warning and listed in the
  recording (``inputs/skipped``); if every clip is skipped that is an error;
- a manifest mistake (a missing file, bad JSON, no ``audio`` path, word timings that do not fit the clip
  or overlap) is an **error** naming the manifest line: the user has to fix the manifest.

Decision: clips longer than the window are skipped, not split. Splitting would need a policy for words
that straddle a cut and would make one input several samples; users who want long audio cut it first.
Reading uses ``soundfile``; resampling ``scipy.signal.resample_poly`` (a polyphase filter at the exact
rational ratio of the two rates), in :func:`read_audio`, which the s2t adapter also uses per batch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from attnviz.errors import InputError
from extractor.inputs import InputSet, _manifest_rows, first_usable

__all__ = ["AUDIO_SUFFIXES", "MIN_RATE_FRACTION", "AudioInput", "WordTiming", "collect_audio", "read_audio",
           "resample"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
#: a clip recorded at under this fraction of the model's rate (4 kHz for a 16 kHz model) is refused:
#: resampling can raise the rate but not restore the band above the clip's own Nyquist frequency
MIN_RATE_FRACTION = 0.25
#: timings may exceed the clip by this much (seconds) before they count as not fitting (rounding in manifests)
TIMING_TOLERANCE = 0.005


@dataclass(frozen=True)
class WordTiming:
    """One reference word of a clip: ``start``/``end`` in seconds from the clip start (``end`` exclusive)."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class AudioInput:
    """One clip to record.

    Attributes:
        id: the sample id stored in the file (path relative to the folder or as in the manifest).
        path: the audio file.
        text: the reference transcript, or None.
        words: reference word timings, or None.
        duration: length in seconds (measured when the inputs were checked).
        source_rate: the file's sample rate in Hz.
        label: always -1 (a speech model has no classes; kept for the generic pipeline).
    """

    id: str
    path: Path
    text: str | None = None
    words: tuple[WordTiming, ...] | None = None
    duration: float = 0.0
    source_rate: int = 0
    label: int = -1


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """``wave`` float ``[n]`` at ``source_rate`` -> float32 at ``target_rate`` with
    ``scipy.signal.resample_poly`` (polyphase FIR, Kaiser window, at the exact ratio ``up/down`` of the
    two rates reduced by their gcd). Unchanged when the rates are equal.

    Raises:
        ValueError: a rate is not positive, or the source rate is below :data:`MIN_RATE_FRACTION` of the
            target (cannot be resampled meaningfully).
    """
    source_rate, target_rate = int(source_rate), int(target_rate)
    if source_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rate {source_rate} Hz cannot be resampled")
    if source_rate < MIN_RATE_FRACTION * target_rate:
        raise ValueError(f"its sample rate {source_rate} Hz cannot be resampled to the model's {target_rate} Hz "
                         f"(below {MIN_RATE_FRACTION * target_rate:.0f} Hz most of the band the model hears is missing)")
    if source_rate == target_rate:
        return np.asarray(wave, np.float32)
    from scipy.signal import resample_poly

    g = gcd(source_rate, target_rate)
    return resample_poly(np.asarray(wave, np.float64), target_rate // g, source_rate // g).astype(np.float32)


def read_audio(path: str | os.PathLike, target_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode one file as mono float32 (channels averaged), resampled to ``target_rate`` if given.

    Returns:
        ``(wave [n], rate)``: the waveform and its rate (``target_rate`` when given, else the file's).

    Raises:
        ValueError / RuntimeError (soundfile's LibsndfileError): unreadable, empty, or not resamplable.
    """
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [frames, channels]
    if data.shape[0] == 0:
        raise ValueError("it is empty (no samples)")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise ValueError("it holds non-finite samples")
    if target_rate is not None:
        wave = resample(wave, int(rate), int(target_rate))
        rate = int(target_rate)
    return np.ascontiguousarray(wave, np.float32), int(rate)


def _probe(path: Path, sample_rate: int | None) -> tuple[float, int] | str:
    """(duration s, source rate) of a readable clip, else why it cannot be used."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        wave, rate = read_audio(path)
        if sample_rate is not None:
            resample(wave[:16], rate, sample_rate)  # only checks that the rate can be resampled
    except ValueError as e:
        return f"cannot be used: {e}"
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError for damaged files
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot be read as audio ({text})"
    del info
    return wave.shape[0] / rate, int(rate)


def collect_audio(path: str | os.PathLike, *, class_names: Sequence[str] | None = None, limit: int | None = None,
                  sample_rate: int | None = None, max_seconds: float | None = None,
                  warn: Callable[[str], None] = _warn, workers: int = 2) -> InputSet:
    """Enumerate and check the clips of ``path`` (file, folder or manifest).

    Args:
        path: an audio file, a folder of them, or a ``.jsonl``/``.csv`` manifest.
        class_names: ignored (a speech model has no classes); accepted for the pipeline's generic call.
        limit: keep at most this many usable clips (the first ones in order).
        sample_rate: the model's rate; a clip that cannot be resampled to it is skipped.
        max_seconds: the model's window; a longer clip is skipped.
        warn: called with a one-line message per skipped clip.
        workers: threads decoding clips during the check.

    Returns:
        An :class:`~extractor.inputs.InputSet` of :class:`AudioInput` (no labels, no masks, no classes).

    Raises:
        InputError: missing input, empty folder, bad manifest (missing file, bad timings), not audio, or
            no clip usable.
    """
    del class_names
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    src = Path(path).expanduser()
    if not src.exists():
        raise InputError(f"input {path} does not exist")
    if src.is_dir():
        files = sorted((p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES),
                       key=lambda p: p.relative_to(src).as_posix())
        if not files:
            raise InputError(f"input folder {src} holds no audio ({', '.join(AUDIO_SUFFIXES)})")
        candidates = [(AudioInput(p.relative_to(src).as_posix(), p), None) for p in files]
    elif src.suffix.lower() in MANIFEST_SUFFIXES:
        candidates = _manifest(src)
    elif src.suffix.lower() in AUDIO_SUFFIXES:
        candidates = [(AudioInput(src.name, src), None)]
    else:
        raise InputError(f"input {path} is not audio ({', '.join(AUDIO_SUFFIXES)}), a folder, "
                         f"or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    def accept(candidate: tuple[AudioInput, Any], probe: Any) -> AudioInput | str:
        it, where = candidate
        if isinstance(probe, str):
            return probe
        duration, rate = probe
        if max_seconds is not None and duration > max_seconds + 1e-9:
            return (f"{duration:.2f} s is longer than the model's {max_seconds:g} s window "
                    "(cut it into clips of at most that length)")
        if it.words is not None:
            _check_timings(it.words, duration, where)
        return AudioInput(it.id, it.path, it.text, it.words, duration, rate)

    items, skipped = first_usable(candidates, lambda c: _probe(c[0].path, sample_rate), accept,
                                  ident=lambda c: c[0].id, limit=limit, workers=workers)
    for sid, why in skipped:
        warn(f"skipped {sid}: {why}")
    if not items:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise InputError(f"none of the {len(candidates)} clip(s) in {path} can be used{first}")
    return InputSet(tuple(items), tuple(skipped))  # type: ignore[arg-type]


def _check_timings(words: tuple[WordTiming, ...], duration: float, where: str | None) -> None:
    """Word timings must lie inside the clip, each start before its end, in order without overlap."""
    at = where or "the manifest"
    previous_end = 0.0
    for i, w in enumerate(words):
        if not (0.0 <= w.start < w.end):
            raise InputError(f"{at}: word {i} ({w.word!r}) has start {w.start} and end {w.end}; "
                             "need 0 <= start < end (seconds)")
        if w.end > duration + TIMING_TOLERANCE:
            raise InputError(f"{at}: word {i} ({w.word!r}) ends at {w.end} s but the clip is {duration:.3f} s long; "
                             "the timings do not fit the clip")
        if w.start < previous_end - TIMING_TOLERANCE:
            raise InputError(f"{at}: word {i} ({w.word!r}) starts at {w.start} s, before the previous word ends "
                             f"({previous_end} s); words must be in order and not overlap")
        previous_end = w.end


def _manifest(path: Path) -> list[tuple[AudioInput, str]]:
    rows = list(_manifest_rows(path, "audio"))
    if not rows:
        raise InputError(f"manifest {path} lists no inputs")
    out = []
    for line, row in rows:
        where = f"manifest {path.name} line {line}"
        audio = row.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            raise InputError(f"{where}: no 'audio' path")
        file = path.parent / audio
        if not file.is_file():
            raise InputError(f"{where}: audio {audio} not found (paths are relative to the manifest)")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        out.append((AudioInput(audio, file, text.strip() if text else None, _words(row.get("words"), where)), where))
    return out


def _words(raw: Any, where: str) -> tuple[WordTiming, ...] | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, list):
        raise InputError(f"{where}: 'words' must be a list like "
                         '[{"word": "seven", "start": 0.31, "end": 0.74}]')
    out = []
    for i, w in enumerate(raw):
        if not isinstance(w, dict) or not isinstance(w.get("word"), str):
            raise InputError(f"{where}: word {i} must be an object with 'word', 'start' and 'end'")
        try:
            start, end = float(w["start"]), float(w["end"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: word {i} ({w.get('word')!r}) needs numeric 'start' and 'end' (seconds)") from None
        if not (np.isfinite(start) and np.isfinite(end)):
            raise InputError(f"{where}: word {i} ({w['word']!r}) has a non-finite time")
        out.append(WordTiming(w["word"], start, end))
    return tuple(out)
