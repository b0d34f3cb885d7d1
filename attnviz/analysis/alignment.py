"""Words and time in speech-to-text recordings: word error rate, and word timestamps from cross-attention by
dynamic time warping (pure numpy/scipy).

**Word error rate** (:func:`wer_counts`): the words of the reference and of the transcript (lowercased,
punctuation but apostrophes removed) aligned by the Levenshtein edit distance (Levenshtein 1966);
``WER = (S + D + I) / N`` over a recording (substitutions, deletions, insertions, reference words).

**Word timestamps** (:func:`word_timestamps`), the procedure of openai/whisper's timing code (Radford et al.
2023, "Robust Speech Recognition via Large-Scale Weak Supervision"; ``whisper/timing.py``), implemented here
from its description: for the chosen alignment heads ``K`` and the token rows of the transcript followed by the
row that predicts end-of-text,

1. each head's map ``W_k [N rows, E frames]`` is standardised per frame across the rows,
   ``(W_k - mean_rows) / std_rows`` (sample std, ``ddof=1``);
2. median-filtered along time (width 7 frames, mirrored edges);
3. averaged over the heads, ``M = mean_k W_k``;
4. a monotonic path through ``-M`` from (first row, first frame) to (last row, last frame) of least total cost
   with steps (1, 1), (1, 0), (0, 1) (dynamic time warping; Sakoe & Chiba 1978);
5. each row's time is the first frame the path enters it (frame ``e`` at ``e * 20 ms``); a word starts at the
   time of its first token row and ends at the time of the next word's first row (the end-of-text row for the
   last word).

The heads are, in order: ``attnviz analyze --alignment-heads``, else the extraction's ``--alignment-heads``,
else the ``alignment_heads`` of the model's ``generation_config.json`` (real Whisper checkpoints carry them),
else the quarter of the heads (at least one) the recording ranks best by ``ca_saliency_pearson``, else every head
of the last half of the decoder layers (Whisper's own default).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from attnviz.store.reader import Recording

__all__ = ["normalise_word", "normalise_words", "edit_alignment", "wer_counts", "matched_words", "dtw_path", "word_timestamps",
           "choose_alignment_heads", "WordTimings", "compute_word_timings", "load_word_timings",
           "analyze_word_timings", "MEDIAN_WIDTH", "TIMINGS_NAME"]

MEDIAN_WIDTH = 7
TIMINGS_NAME = "s2t_word_timings"
_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def normalise_word(word: str) -> str:
    """Lowercase, punctuation but apostrophes removed, no surrounding space."""
    return _PUNCT.sub("", str(word).lower()).strip()


def normalise_words(text: str) -> list[str]:
    return [w for w in (normalise_word(t) for t in str(text).split()) if w]


def edit_alignment(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[str, int, int]]:
    """Levenshtein alignment of two word sequences.

    Returns:
        ops in order: ("match" | "sub", i, j), ("del", i, -1) (a reference word missing), ("ins", -1, j).
        Among equal-cost alignments, matches and substitutions are preferred over deletions over insertions.
    """
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), np.int64)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]), d[i - 1, j] + 1, d[i, j - 1] + 1)
    ops: list[tuple[str, int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            ops.append(("match" if ref[i - 1] == hyp[j - 1] else "sub", i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + 1:
            ops.append(("del", i - 1, -1))
            i -= 1
        else:
            ops.append(("ins", -1, j - 1))
            j -= 1
    return ops[::-1]


def wer_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """(S + D + I, N) of one clip (normalised words, :func:`edit_alignment`)."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    errors = sum(op != "match" for op, _, _ in edit_alignment(ref, hyp))
    return errors, len(ref)


def matched_words(meta: dict[str, Any]) -> list[tuple[list[int], float, float]]:
    """(token rows, reference start, reference end) of every transcript word that the word-level edit
    alignment matches to an equal reference word (:func:`edit_alignment`)."""
    ref = meta.get("reference_words")
    words = meta.get("words") or []
    if not ref or not words:
        return []
    ops = edit_alignment([normalise_word(w["word"]) for w in ref], [normalise_word(w["word"]) for w in words])
    return [(list(words[j]["rows"]), float(ref[i]["start"]), float(ref[i]["end"]))
            for op, i, j in ops if op == "match"]


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-cost monotonic path through ``cost`` float ``[N, M]`` from (0, 0) to (N-1, M-1), steps
    (1, 1), (1, 0), (0, 1) (ties: diagonal, then down, then right).

    Returns:
        (row indices ``[P]``, column indices ``[P]``) along the path.
    """
    c = np.asarray(cost, np.float64)
    n, m = c.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    step = np.zeros((n + 1, m + 1), np.int8)  # 0 diagonal, 1 from the row above, 2 from the left
    for i in range(1, n + 1):
        up, row, ci = acc[i - 1], acc[i], c[i - 1]
        for j in range(1, m + 1):
            a, b, left = up[j - 1], up[j], row[j - 1]
            if a <= b and a <= left:
                best, how = a, 0
            elif b <= left:
                best, how = b, 1
            else:
                best, how = left, 2
            row[j] = ci[j - 1] + best
            step[i, j] = how
    rows, cols = [], []
    i, j = n, m
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        how = step[i, j]
        if how == 0:
            i, j = i - 1, j - 1
        elif how == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1], np.int64), np.array(cols[::-1], np.int64)


def word_timestamps(maps: np.ndarray, word_rows: Sequence[Sequence[int]], end_row: int | None, frame_s: float,
                    median_width: int = MEDIAN_WIDTH) -> list[tuple[float, float]]:
    """Start and end (s) of each word from the alignment heads' cross-attention (module docstring).

    Args:
        maps: float ``[K, T, E]``: the K alignment heads' cross-attention of one clip (all rows).
        word_rows: per word, its token rows (in order, ascending).
        end_row: the row that predicts end-of-text (ends the last word), or None (the last word then ends where
            the path leaves its last row).
        frame_s: seconds per encoder frame.

    Returns:
        one (start, end) per word.
    """
    from scipy.ndimage import median_filter

    if not word_rows:
        return []
    rows = [r for w in word_rows for r in w] + ([end_row] if end_row is not None else [])
    w = np.asarray(maps, np.float64)[:, rows, :]  # [K, N, E]
    if w.shape[1] > 1:
        sd = w.std(axis=1, ddof=1, keepdims=True)
        w = (w - w.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    if median_width > 1 and w.shape[2] > 1:
        w = median_filter(w, size=(1, 1, median_width), mode="mirror")
    matrix = w.mean(0)
    path_rows, path_cols = dtw_path(-matrix)
    first = np.zeros(len(rows), np.int64)
    last = np.zeros(len(rows), np.int64)
    for r in range(len(rows)):
        cols = path_cols[path_rows == r]
        first[r], last[r] = cols.min(), cols.max()
    starts = np.cumsum([0] + [len(wr) for wr in word_rows])
    out = []
    for k in range(len(word_rows)):
        begin = first[starts[k]] * frame_s
        nxt = starts[k + 1]
        end = first[nxt] * frame_s if nxt < len(rows) else (last[nxt - 1] + 1) * frame_s
        out.append((float(begin), float(max(end, begin))))
    return out


def choose_alignment_heads(rec: Recording, given: Sequence[tuple[int, int]] | None = None) -> tuple[list[tuple[int, int]], str]:
    """The alignment heads and where they came from (module docstring, in that order)."""
    n_layers, n_heads = rec.stack_shape("cross")

    def ok(heads: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        out = [(int(a), int(b)) for a, b in heads]
        bad = [h for h in out if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
        if bad:
            from attnviz.errors import InputError

            raise InputError(f"alignment head {bad[0][0]}:{bad[0][1]} is not a decoder head of this recording "
                             f"({n_layers} layers x {n_heads} heads)")
        return out

    if given:
        return ok(given), "--alignment-heads"
    fam = rec.extraction_params.get("family", {})
    if fam.get("alignment_heads"):
        return ok(fam["alignment_heads"]), "extraction --alignment-heads"
    if fam.get("model_alignment_heads"):
        return ok(fam["model_alignment_heads"]), "the model's generation_config.json alignment_heads"
    if "ca_saliency_pearson" in rec.head_metrics():
        values = rec.head_metric("ca_saliency_pearson")
        if np.isfinite(values).any():
            k = max(1, values.size // 4)
            order = np.argsort(-np.nan_to_num(values, nan=-2.0).ravel(), kind="stable")[:k]
            return [tuple(int(v) for v in divmod(int(f), n_heads)) for f in order], \
                f"the {k} best heads by ca_saliency_pearson"
    return [(layer, h) for layer in range(n_layers // 2, n_layers) for h in range(n_heads)], \
        "every head of the last half of the decoder layers (no saliency recorded)"


@dataclass(frozen=True)
class WordTimings:
    """Word timestamps of every clip, flattened (``W`` words in all).

    Attributes:
        sample, word_index: int ``[W]``: the clip and the word's index among its transcript words.
        word: str ``[W]``; start, end: float ``[W]`` seconds.
        ref_start, ref_end: float ``[W]``: the matched reference word's span (NaN where none matched).
        heads: the alignment heads (layer, head); source: where they came from.
    """

    sample: np.ndarray
    word_index: np.ndarray
    word: np.ndarray
    start: np.ndarray
    end: np.ndarray
    ref_start: np.ndarray
    ref_end: np.ndarray
    heads: list[tuple[int, int]]
    source: str

    def of_sample(self, sample: int) -> list[tuple[str, float, float]]:
        keep = self.sample == sample
        return [(str(w), float(a), float(b)) for w, a, b in zip(self.word[keep], self.start[keep], self.end[keep])]

    def errors_ms(self) -> dict[str, float]:
        """Mean |start error| and |end error| (ms) of matched words, and the share whose centre lies in the span."""
        ok = np.isfinite(self.ref_start)
        if not ok.any():
            return {"n_words": 0}
        centre = (self.start[ok] + self.end[ok]) / 2
        return {"n_words": int(ok.sum()),
                "start_ms": float(1000 * np.abs(self.start[ok] - self.ref_start[ok]).mean()),
                "end_ms": float(1000 * np.abs(self.end[ok] - self.ref_end[ok]).mean()),
                "centre_in_span": float(((centre >= self.ref_start[ok]) & (centre < self.ref_end[ok])).mean())}


def compute_word_timings(rec: Recording, heads: Sequence[tuple[int, int]], source: str,
                         median_width: int = MEDIAN_WIDTH) -> WordTimings:
    """DTW word timestamps of every clip (streams over clips)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("sample", "word_index", "word", "start", "end", "ref_start", "ref_end")}
    frame_s = float(rec.extraction_params.get("family", {}).get("encoder_frame_seconds", 0.02))
    for s in range(rec.n_samples):
        meta = rec.meta(s)
        words = meta.get("words") or []
        if not words:
            continue
        by_layer: dict[int, np.ndarray] = {}
        for layer, _ in heads:
            if layer not in by_layer:
                by_layer[layer] = rec.attention_heads(s, layer, "cross")
        maps = np.stack([by_layer[layer][h] for layer, h in heads])
        last = max(words[-1]["rows"])
        tokens = meta.get("token_ids", [])
        end_row = last + 1 if last + 1 < len(tokens) else None
        times = word_timestamps(maps, [w["rows"] for w in words], end_row, frame_s, median_width)
        refs = {tuple(rows): (a, b) for rows, a, b in matched_words(meta)}
        for k, (w, (a, b)) in enumerate(zip(words, times)):
            ra, rb = refs.get(tuple(w["rows"]), (np.nan, np.nan))
            for key, v in zip(cols, (s, k, w["word"], a, b, ra, rb)):
                cols[key].append(v)
    return WordTimings(np.asarray(cols["sample"], np.int64), np.asarray(cols["word_index"], np.int64),
                       np.asarray(cols["word"], dtype=str), np.asarray(cols["start"], np.float64),
                       np.asarray(cols["end"], np.float64), np.asarray(cols["ref_start"], np.float64),
                       np.asarray(cols["ref_end"], np.float64), list(heads), source)


def _params(heads: Sequence[tuple[int, int]], source: str, median_width: int) -> dict[str, Any]:
    return {"heads": [list(h) for h in heads], "source": source, "median_width": median_width, "version": 1}


def load_word_timings(rec: Recording) -> WordTimings | None:
    """The stored word timings (whatever heads made them), or None."""
    from attnviz.store.schema import loads

    g = rec.analysis_group(TIMINGS_NAME)
    if g is None or "params" not in g.attrs:
        return None
    p = loads(g.attrs["params"])

    def col(name: str, dtype: Any) -> np.ndarray:
        return np.asarray(g[name].asstr()[()] if dtype is str else g[name][()], dtype)

    return WordTimings(col("sample", np.int64), col("word_index", np.int64), col("word", str), col("start", np.float64),
                       col("end", np.float64), col("ref_start", np.float64), col("ref_end", np.float64),
                       [tuple(h) for h in p["heads"]], p["source"])


def analyze_word_timings(path: str | os.PathLike, *, alignment_heads: str | None = None, force: bool = False,
                         median_width: int = MEDIAN_WIDTH) -> list[str]:
    """Compute (or reuse) and store the word timestamps of an s2t recording; lines for the terminal."""
    from attnviz.store.cache import load_analysis, save_analysis

    given = None
    if alignment_heads:
        given = _parse_heads(alignment_heads)
    with Recording(path) as rec:
        heads, source = choose_alignment_heads(rec, given)
        params = _params(heads, source, median_width)
        if not force and load_analysis(rec, TIMINGS_NAME, params) is not None:
            timings = load_word_timings(rec)
            how = "cached, unchanged"
        else:
            timings = compute_word_timings(rec, heads, source, median_width)
            how = "computed"
    if how == "computed":
        save_analysis(path, TIMINGS_NAME, params, {
            "sample": timings.sample, "word_index": timings.word_index, "word": timings.word.astype(object) if
            timings.word.size else np.array([], dtype=object), "start": timings.start, "end": timings.end,
            "ref_start": timings.ref_start, "ref_end": timings.ref_end})
    assert timings is not None
    err = timings.errors_ms()
    names = ", ".join(f"L{a}H{b}" for a, b in heads)
    line = f"word timestamps by DTW over {names} ({source}; {len(timings.word)} words, {how})"
    if err.get("n_words"):
        line += (f": vs the reference timings, start error {err['start_ms']:.0f} ms, end error {err['end_ms']:.0f} ms, "
                 f"centre inside the word {err['centre_in_span']:.0%} ({err['n_words']} matched words)")
    return [line]


def _parse_heads(text: str) -> list[tuple[int, int]]:
    from attnviz.errors import InputError

    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            a, b = (int(v) for v in part.strip().split(":"))
        except ValueError:
            raise InputError(f"--alignment-heads: cannot read {text!r}; give decoder layer:head pairs like 1:0,1:2") from None
        out.append((a, b))
    if not out:
        raise InputError(f"--alignment-heads: cannot read {text!r}; give decoder layer:head pairs like 1:0,1:2")
    return out
