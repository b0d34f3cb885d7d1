from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

import attnviz
from attnviz.analysis.head_stats import METRIC_INFO, compute_and_store, compute_head_stats, map_stats
from attnviz.errors import RecordingError
from attnviz.store.reader import Recording
from tests.helpers import make_recording

T = 1 + 3 * 3  # CLS + 3x3 patches


def test_uniform_and_one_hot_rows():
    uniform = np.full((4, 7), 1 / 7)
    ent, conf, pre = map_stats(uniform, n_prefix=2)
    np.testing.assert_allclose(ent, math.log(7))
    np.testing.assert_allclose(conf, 1 / 7)
    np.testing.assert_allclose(pre, 2 / 7)
    one_hot = np.eye(5)
    ent, conf, pre = map_stats(one_hot, n_prefix=1)
    np.testing.assert_allclose(ent, 0.0)
    np.testing.assert_allclose(conf, 1.0)
    np.testing.assert_allclose(pre, [1, 0, 0, 0, 0])


def _patterned(sample: int) -> np.ndarray:
    """[layer=2, head=3, T, T]: L0H0 uniform, L0H1 one-hot on CLS, L0H2 one-hot on self,
    layer 1 random rows that differ per sample."""
    rng = np.random.default_rng(100 + sample)
    m = np.empty((2, 3, T, T), np.float32)
    m[0, 0] = 1 / T
    m[0, 1] = 0
    m[0, 1, :, 0] = 1
    m[0, 2] = np.eye(T)
    x = rng.random((3, T, T)) ** 4 + 1e-3
    m[1] = x / x.sum(-1, keepdims=True)
    return m


def test_recording_statistics_match_independent_computation(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=5, grid=(3, 3), maps_fn=_patterned, batch_size=2)
    with Recording(path) as rec:
        stats = compute_head_stats(rec)
        assert stats.n_samples == 5
        np.testing.assert_allclose(stats.entropy[0], [math.log(T), 0, 0], atol=2e-3)
        np.testing.assert_allclose(stats.confidence[0], [1 / T, 1, 1], atol=1e-3)
        np.testing.assert_allclose(stats.cls_attention[0], [1 / T, 1, 1 / T], atol=1e-3)
        # layer 1: scipy's entropy and plain numpy on what the file holds (float16 round trip)
        for h in range(3):
            maps = np.stack([rec.attention(s, 1, h).astype(np.float64) for s in range(5)])
            np.testing.assert_allclose(stats.entropy[1, h], scipy_entropy(maps, axis=-1).mean(), rtol=1e-3)
            np.testing.assert_allclose(stats.confidence[1, h], maps.max(-1).mean(), rtol=1e-6)
            np.testing.assert_allclose(stats.cls_attention[1, h], maps[..., 0].mean(), rtol=1e-6)
        first2 = compute_head_stats(rec, max_samples=2)
        maps = np.stack([rec.attention(s, 1, 0).astype(np.float64) for s in range(2)])
        assert first2.n_samples == 2
        np.testing.assert_allclose(first2.confidence[1, 0], maps.max(-1).mean(), rtol=1e-6)


def test_compute_and_store_writes_head_metrics_with_definitions(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=3, grid=(3, 3), maps_fn=_patterned)
    stats = compute_and_store(path)
    with Recording(path) as rec:
        assert {"entropy", "confidence", "cls_attention"} <= set(rec.head_metrics())
        np.testing.assert_allclose(rec.head_metric("entropy"), stats.entropy, rtol=1e-6)
        info = rec.head_metric_info("confidence")
        assert "Voita" in info.citation and info.definition == METRIC_INFO["confidence"].definition
        assert info.kind == "self" and info.params["n_samples"] == 3


def test_no_prefix_tokens_means_no_cls_attention(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=2, grid=(2, 2), n_prefix=0)
    with Recording(path) as rec:
        stats = compute_head_stats(rec)
    assert stats.cls_attention is None and set(stats.as_dict()) == {"entropy", "confidence"}


def test_incomplete_recording_is_refused_for_storing(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=4, batch_size=2)
    # mark the file incomplete as an interrupted extraction would
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
        f["samples/done"][2:] = False
    with pytest.raises(RecordingError, match="incomplete"):
        compute_and_store(path)
    with Recording(path) as rec:  # the statistics themselves still work on what is there
        assert compute_head_stats(rec).n_samples == 2


def test_cli_analyze(tmp_path, capsys):
    from attnviz.cli import main

    path = make_recording(tmp_path / "r.h5", n_samples=3, grid=(3, 3), maps_fn=_patterned)
    main(["analyze", str(path), "--max-samples", "2"])  # returns normally on success
    assert "entropy, confidence, cls_attention from 2 sample(s)" in capsys.readouterr().out
    with Recording(path) as rec:
        np.testing.assert_allclose(rec.head_metric("confidence")[0], [1 / T, 1, 1], atol=1e-3)
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(tmp_path / "missing.h5")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_accumulator_equals_the_pass_over_the_file_and_merges(tmp_path):
    from attnviz.analysis.head_stats import HeadStatsAccumulator, compute_head_stats
    from tests.helpers import make_recording

    path = make_recording(tmp_path / "r.h5", n_samples=6, n_layers=2, n_heads=3)
    with attnviz.open(path) as rec:
        ref = compute_head_stats(rec)
        whole = HeadStatsAccumulator("self", 2, 3, 1)
        halves = [HeadStatsAccumulator("self", 2, 3, 1), HeadStatsAccumulator("self", 2, 3, 1)]
        for idx, maps in rec.iter_attention(batch_size=2):
            lengths = np.array([rec.lengths(int(s)) for s in idx])
            whole.add(maps, lengths)
            halves[int(idx[0]) >= 3].add(maps, lengths)
    got = whole.result()
    merged = halves[0].merge(halves[1]).result()
    for name in ("entropy", "confidence", "cls_attention"):
        assert np.allclose(getattr(got, name), getattr(ref, name), rtol=1e-5), name
        assert np.allclose(getattr(merged, name), getattr(ref, name), rtol=1e-5), name
    assert got.n_samples == merged.n_samples == 6


@pytest.mark.parametrize("overlap", [False, True], ids=["between-forwards", "stats-thread"])
def test_extraction_stores_statistics_equal_to_a_recount(tmp_path, monkeypatch, overlap):
    from attnviz.analysis.head_stats import compute_head_stats
    from extractor import pipeline
    from extractor.pipeline import ExtractOptions, extract
    from tests.helpers import save_tiny_model, write_images

    # CPU runs add the statistics between forwards; GPU runs in a thread beside the next forward: both paths here
    monkeypatch.setattr(pipeline, "_overlap_stats", lambda adapter: overlap)
    save_tiny_model(tmp_path / "m", "vit")
    write_images(tmp_path / "imgs", [f"{i}.png" for i in range(5)])
    out = extract(ExtractOptions(model=str(tmp_path / "m"), input=str(tmp_path / "imgs"), out=str(tmp_path / "r.h5"),
                                 device="cpu", batch_size=2, attributions=(), progress=False)).path
    with attnviz.open(out) as rec:
        ref = compute_head_stats(rec)
        assert np.allclose(rec.head_metric("entropy"), ref.entropy, rtol=1e-5)
        assert np.allclose(rec.head_metric("cls_attention"), ref.cls_attention, rtol=1e-5)
        assert rec.head_metric_info("entropy").params["n_samples"] == 5


def test_float16_maps_take_the_table_path_with_the_float32_results():
    """The extractor's float16 maps are reduced by table look-up and an integer maximum; the result must equal
    the plain float32 computation (zeros, -0.0 and padded rows included)."""
    from attnviz.analysis.head_stats import HeadStatsAccumulator

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 2, 2, 9, 9))
    maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    maps[0, 0, 0, 0, :4] = 0.0
    maps[1, 1, 1, 2, 3] = -0.0
    maps = maps.astype(np.float16)
    lengths = np.array([[9, 9], [7, 8], [9, 9]])
    fast, plain = HeadStatsAccumulator("self", 2, 2, 1), HeadStatsAccumulator("self", 2, 2, 1)
    per_fast = fast.add(maps, lengths)
    per_plain = plain.add(maps.astype(np.float32), lengths)
    np.testing.assert_allclose(per_fast, per_plain, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fast.sums, plain.sums, rtol=1e-6)
    # and a hand-built row: one-hot -> entropy 0, confidence 1; uniform over 4 -> log 4, 0.25
    hand = np.zeros((1, 1, 1, 2, 4), np.float16)
    hand[0, 0, 0, 0, 2] = 1.0
    hand[0, 0, 0, 1] = 0.25
    per = HeadStatsAccumulator("self", 1, 1, 1).add(hand)
    np.testing.assert_allclose(per[0, :, 0, 0], [np.log(4) / 2, (1 + 0.25) / 2, 0.25 / 2], rtol=1e-6)
