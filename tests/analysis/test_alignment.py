"""Word error rate, DTW (against a brute force over every monotonic path), word timestamps from hand-built
attention, and the order in which the alignment heads are chosen."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import attnviz
from attnviz.analysis.alignment import (
    analyze_word_timings,
    choose_alignment_heads,
    dtw_path,
    edit_alignment,
    load_word_timings,
    matched_words,
    normalise_words,
    wer_counts,
    word_timestamps,
)
from attnviz.errors import InputError
from tests.helpers_s2t import make_s2t_recording, synthetic_word_spans


def test_edit_alignment_and_wer():
    ops = edit_alignment(["a", "b", "c", "d"], ["a", "x", "c"])
    assert ops == [("match", 0, 0), ("sub", 1, 1), ("match", 2, 2), ("del", 3, -1)]
    assert edit_alignment(["a"], ["a", "b"]) == [("match", 0, 0), ("ins", -1, 1)]
    assert wer_counts("Seven, three NINE!", "seven three nine") == (0, 3)
    assert wer_counts("one two three", "one four") == (2, 3)  # a substitution and a deletion
    assert wer_counts("one", "one one one") == (2, 1)  # two insertions
    assert normalise_words("It's  a Test.") == ["it's", "a", "test"]


def _brute_force(cost: np.ndarray) -> float:
    """The least total cost over every monotonic path from (0, 0) to (n-1, m-1) with steps (1,1), (1,0), (0,1)."""
    n, m = cost.shape
    best = np.inf

    def walk(i: int, j: int, acc: float) -> None:
        nonlocal best
        acc += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            best = min(best, acc)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, acc)

    walk(0, 0, 0.0)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dtw_finds_the_least_cost_monotonic_path(seed):
    cost = np.random.default_rng(seed).random((3 + seed % 2, 5))
    rows, cols = dtw_path(cost)
    assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (cost.shape[0] - 1, cost.shape[1] - 1)
    steps = set(zip(np.diff(rows).tolist(), np.diff(cols).tolist()))
    assert steps <= {(1, 1), (1, 0), (0, 1)}
    assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost))


def test_word_timestamps_follow_hand_built_attention():
    """Two words (rows 0 and 1-2), then the end-of-text row; each row attends to its own frames."""
    e = 30
    maps = np.full((2, 4, e), 1e-3)
    for head in range(2):
        maps[head, 0, 3:9] = 1.0      # word 0
        maps[head, 1, 11:15] = 1.0    # word 1, first token
        maps[head, 2, 15:19] = 1.0    # word 1, second token
        maps[head, 3, 22:28] = 1.0    # end of text
    maps /= maps.sum(-1, keepdims=True)
    (a0, b0), (a1, b1) = word_timestamps(maps, [[0], [1, 2]], end_row=3, frame_s=0.02, median_width=1)
    assert a0 == 0.0  # the path starts at the first frame
    assert 0.18 <= a1 <= 0.22 and b0 == a1  # between word 0's last attended frame (8) and word 1's first (11)
    assert 0.38 <= b1 <= 0.44  # word 1 ends where the end-of-text row takes over (frames 19-22)
    # with the median filter (width 7) and without the end-of-text row the order of words is kept
    times = word_timestamps(maps, [[0], [1, 2]], end_row=None, frame_s=0.02)
    assert times[0][0] <= times[0][1] <= times[1][0] <= times[1][1]


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    return make_s2t_recording(tmp_path / "syn.h5")


def test_matched_words_pair_transcript_and_reference(synthetic):
    with attnviz.open(synthetic) as rec:
        assert [m[0] for m in matched_words(rec.meta(0))] == [[0], [1], [2]]
        assert [m[0] for m in matched_words(rec.meta(1))] == [[0], [1]]  # "four" is not "three"
        assert matched_words(rec.meta(0))[1][1:] == pytest.approx(synthetic_word_spans(0)[1])


def test_alignment_heads_are_chosen_in_order(synthetic, tmp_path):
    with attnviz.open(synthetic) as rec:
        assert choose_alignment_heads(rec, [(0, 1)]) == ([(0, 1)], "--alignment-heads")
        heads, source = choose_alignment_heads(rec)
        assert heads == [(1, 0), (1, 1)] and "last half" in source  # no metric, no heads given
        with pytest.raises(InputError, match="not a decoder head"):
            choose_alignment_heads(rec, [(2, 0)])
    model = make_s2t_recording(tmp_path / "model.h5", family_extra={"model_alignment_heads": [[0, 0]]})
    with attnviz.open(model) as rec:
        assert choose_alignment_heads(rec) == ([(0, 0)], "the model's generation_config.json alignment_heads")
    given = make_s2t_recording(tmp_path / "given.h5", family_extra={"model_alignment_heads": [[0, 0]],
                                                                     "alignment_heads": [[1, 1]]})
    with attnviz.open(given) as rec:
        assert choose_alignment_heads(rec) == ([(1, 1)], "extraction --alignment-heads")
    from attnviz.analysis.crossattn import analyze_step

    analyze_step(model)  # stores ca_saliency_pearson, but the model's own heads still come first
    with attnviz.open(model) as rec:
        assert choose_alignment_heads(rec)[0] == [(0, 0)]
    analyze_step(synthetic)
    with attnviz.open(synthetic) as rec:  # no heads recorded: the best quarter by ca_saliency_pearson = L1H0
        assert choose_alignment_heads(rec) == ([(1, 0)], "the 1 best heads by ca_saliency_pearson")


def test_word_timings_are_stored_with_their_heads(synthetic, tmp_path):
    path = tmp_path / "t.h5"
    shutil.copy(synthetic, path)
    lines = analyze_word_timings(path, alignment_heads="1:0")
    assert "L1H0 (--alignment-heads; 9 words, computed)" in lines[0]
    assert "matched words" in lines[0]
    with attnviz.open(path) as rec:
        tm = load_word_timings(rec)
        assert tm.heads == [(1, 0)] and tm.source == "--alignment-heads"
        assert tm.sample.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and tm.word[2] == "three"
        assert np.isnan(tm.ref_start[5]) and tm.ref_start[0] == pytest.approx(synthetic_word_spans(0)[0][0])
        assert (np.diff(tm.start.reshape(3, 3), axis=1) >= 0).all()
        err = tm.errors_ms()
        assert err["n_words"] == 8 and err["centre_in_span"] >= 0.75
    assert "cached, unchanged" in analyze_word_timings(path, alignment_heads="1:0")[0]
    assert "computed" in analyze_word_timings(path, alignment_heads="0:1")[0]  # other heads: recomputed
    with pytest.raises(InputError, match="layer:head pairs"):
        analyze_word_timings(path, alignment_heads="1-0")
