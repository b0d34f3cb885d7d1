"""Cross-attention vs saliency: the correlations equal scipy.stats, the Fisher-z average is right, pooling keeps
time, and the recording-level analysis gets the answers a synthetic recording was built with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import attnviz
from attnviz.analysis.crossattn import (
    CrossAttnParams,
    FisherMean,
    analyze_crossattn,
    analyze_step,
    deletion_auc,
    fisher_mean,
    flat_pearson,
    flat_spearman,
    load_crossattn,
    pearson_rows,
    pool_frames,
    reduce_frequency,
    shuffled_attention,
    span_error_ms,
    spearman_rows,
    store_crossattn,
    text_rows,
)
from tests.helpers_s2t import SYN, SYN_ALIGNED_HEAD, make_s2t_recording


def test_row_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 30)), rng.random((6, 30))
    b[2] = a[2] * 3 + 1  # a perfect row
    b[3] = np.round(b[3] * 4)  # ties for Spearman
    ours_p, ours_s = pearson_rows(a, b), spearman_rows(a, b)
    for i in range(6):
        assert ours_p[i] == pytest.approx(stats.pearsonr(a[i], b[i]).statistic, abs=1e-12)
        assert ours_s[i] == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-12)
    assert flat_pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert flat_spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    # leading axes broadcast: every head against one reference
    heads = rng.random((2, 3, 6, 30))
    np.testing.assert_allclose(pearson_rows(heads, b[None, None])[1, 2], pearson_rows(heads[1, 2], b))
    # a constant row has no correlation
    a[0] = 0.5
    assert np.isnan(pearson_rows(a, b)[0]) and np.isnan(spearman_rows(a, b)[0])


def test_fisher_z_average():
    # tanh((artanh 0.5 + artanh 0.9) / 2) = tanh((0.549306 + 1.472219) / 2) = tanh(1.010763) = 0.766077
    assert fisher_mean([0.5, 0.9]) == pytest.approx(0.766077, abs=1e-6)
    assert fisher_mean([0.5, np.nan, 0.9]) == pytest.approx(0.766077, abs=1e-6)  # undefined rows left out
    assert fisher_mean([0.3, -0.3]) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(fisher_mean([np.nan]))
    assert fisher_mean([1.0, 1.0]) == pytest.approx(1.0, abs=1e-6)  # clipped, not infinite
    rng = np.random.default_rng(1)
    r = rng.uniform(-0.9, 0.9, (2, 3, 10))
    acc = FisherMean((2, 3))
    acc.add(r[..., :4])
    other = FisherMean((2, 3))
    other.add(r[..., 4:])
    acc.merge(other)  # streaming in two parts = all at once
    np.testing.assert_allclose(acc.result(), np.tanh(np.arctanh(r).mean(-1)), atol=1e-12)
    assert fisher_mean(r[0, 0]) == pytest.approx(acc.result()[0, 0], abs=1e-12)


def test_pooling_to_encoder_frames():
    x = np.array([[1.0, 3.0, 2.0, 2.0, 5.0]])
    np.testing.assert_allclose(pool_frames(x, "max"), [[3.0, 2.0, 5.0]])
    np.testing.assert_allclose(pool_frames(x, "mean"), [[2.0, 2.0, 5.0]])  # the last, single frame pools itself
    s = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(reduce_frequency(s), s.sum(-1))
    with pytest.raises(ValueError):
        pool_frames(x, "median")


@pytest.mark.parametrize("t", [0.0, 0.013, 0.5, 1.234, 2.99])
def test_a_peak_at_t_seconds_stays_at_t(t):
    """Feature frame j covers [10 j, 10 (j+1)) ms, encoder frame e covers [20 e, 20 (e+1)) ms: a saliency peak at t
    seconds, summed over mel and pooled either way, peaks in the encoder frame that holds t."""
    frames = 300
    saliency = np.random.default_rng(2).random((1, frames, 8)) * 0.1
    saliency[0, int(t / 0.01)] += 5.0
    for how in ("max", "mean"):
        pooled = pool_frames(reduce_frequency(saliency), how)[0]
        e = int(pooled.argmax())
        assert 0.02 * e <= t < 0.02 * (e + 1)


def test_deletion_auc_and_span_error():
    f = np.array([0.0, 0.5, 1.0])
    assert deletion_auc(f, np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert deletion_auc(f, np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])).tolist() == pytest.approx([0.25, 1.0])
    assert span_error_ms(0.5, 0.4, 0.6) == 0.0
    assert span_error_ms(0.35, 0.4, 0.6) == pytest.approx(50.0)
    assert span_error_ms(0.6, 0.4, 0.6) == pytest.approx(0.0, abs=1e-9)  # the end is exclusive: 0 ms away
    assert span_error_ms(0.7, 0.4, 0.6) == pytest.approx(100.0)


def test_controls():
    rng = np.random.default_rng(0)
    a = rng.random((3, 10))
    sh = shuffled_attention(rng, a)
    np.testing.assert_allclose(np.sort(sh, 1), np.sort(a, 1))  # the same values per row
    cols = [np.flatnonzero((a[0] == v))[0] for v in sh[0]]
    assert all(np.flatnonzero(a[r] == sh[r, i])[0] == cols[i] for r in range(3) for i in range(10))  # one permutation


def test_text_rows():
    meta = {"token_ids": [1, 2, 3, 4, 5], "prompt_rows": 2, "special": [True, True, False, False, True]}
    assert text_rows(meta).tolist() == [2, 3]
    assert text_rows(meta, "generated").tolist() == [2, 3, 4]
    assert text_rows(meta, "all").tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_s2t_recording(tmp_path_factory.mktemp("syn") / "syn.h5")


def test_the_analysis_finds_what_the_recording_was_built_with(synthetic):
    with attnviz.open(synthetic) as rec:
        a = analyze_crossattn(rec)
        t = a.tables[("perturbation", "mean")]
        layer, head = SYN_ALIGNED_HEAD
        assert t["head_pearson"][layer, head] == pytest.approx(1.0, abs=1e-5)
        assert t["head_spearman"][layer, head] == pytest.approx(1.0, abs=1e-5)
        others = np.delete(t["head_pearson"].ravel(), layer * SYN["n_heads"] + head)
        assert (others < 0.5).all()
        assert abs(float(t["shuffled_pearson"])) < 0.5 and abs(float(t["uniform_pearson"])) < 0.5
        assert float(t["n_rows"]) == 9  # 3 clips x 3 text rows (end-of-text left out)
        # an independent computation of the layer-1 mean's row correlations, Fisher-averaged by hand
        from attnviz.analysis.crossattn import sample_view

        rs = []
        for s in range(rec.n_samples):
            v = sample_view(rec, s)
            for r in range(3):
                rs.append(stats.pearsonr(v.cross[1, :, r].mean(0), v.saliency["perturbation"]["mean"][r]).statistic)
        assert float(t["layer_pearson"][1]) == pytest.approx(np.tanh(np.mean(np.arctanh(rs))), abs=1e-9)
        # peaks: the aligned head and the saliency peak inside every matched word (8: clip 1 has a substitution)
        assert a.alignment["ca_L1H0"] == (0.0, 1.0, 8) and a.alignment["perturbation"] == (0.0, 1.0, 8)
        assert a.alignment["uniform"][1] < 1.0
        assert a.wer == {"wer": pytest.approx(1 / 9), "errors": 1, "n_words": 9, "n_clips": 3}
        # deletion: each explanation's mean probability curve and its trapezoid area (built as linspace(0.9, 0.1 i))
        for i, name in enumerate(["ca_mean", "ca_layer0", "ca_layer1", "perturbation", "random"]):
            np.testing.assert_allclose(a.deletion_curves[name], np.linspace(0.9, 0.1 * (i + 1), 3), atol=1e-6)
            assert a.deletion[name] == pytest.approx((0.9 + 0.1 * (i + 1)) / 2, abs=1e-6)


def test_cached_with_its_parameters_and_head_metrics(synthetic, tmp_path):
    import shutil

    path = tmp_path / "copy.h5"
    shutil.copy(synthetic, path)
    lines = analyze_step(path)
    assert any("word error rate 11.1%" in line for line in lines)
    assert any("cross-attention vs perturbation saliency" in line and "computed" in line for line in lines)
    with attnviz.open(path) as rec:
        a = load_crossattn(rec)
        b = analyze_crossattn(rec)
        for key, table in b.tables.items():
            for name, v in table.items():
                np.testing.assert_allclose(a.tables[key][name], v, equal_nan=True)
        assert a.alignment == b.alignment and a.wer == pytest.approx(b.wer)
        assert load_crossattn(rec, CrossAttnParams(rows="generated")) is None  # other parameters: not this cache
        hm = rec.head_metric("ca_saliency_pearson")
        assert hm.shape == (2, 2) and hm[SYN_ALIGNED_HEAD] == pytest.approx(1.0, abs=1e-5)
        info = rec.head_metric_info("ca_saliency_pearson")
        assert info.kind == "cross" and "Papi" in info.citation and info.params["reference"] == "perturbation"
    assert any("cached, unchanged" in line for line in analyze_step(path))
    store_crossattn(path, b)  # replacing is allowed
