"""The committed golden files of format v1 must keep reading, value for value, in every later attnviz.

Never regenerate ``tests/data/golden_v1*.h5`` to make this test pass: a failure here means a
change broke the reading of files users already have. The expected values are the builder's
formulas (``scripts/make_golden_file.py``) written out again here, plus hard-coded numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import attnviz
from attnviz.store import HeadMetricInfo, TokenLayout, load_analysis

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = DATA / "golden_v1.h5"
GOLDEN_S2T = DATA / "golden_v1_s2t.h5"


def expected_map(s: int, layer: int, head: int, nq: int, nk: int) -> np.ndarray:
    """softmax over keys of ((s+1)(q+2) + (layer+1)(k+1) + 3 head) mod 5 / 2, as float16 -> float32."""
    q = np.arange(nq)[:, None]
    k = np.arange(nk)[None, :]
    z = ((s + 1) * (q + 2) + (layer + 1) * (k + 1) + 3 * head) % 5 * 0.5
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float16).astype(np.float32)


def test_golden_files_are_small() -> None:
    assert GOLDEN.stat().st_size < 64_000 and GOLDEN_S2T.stat().st_size < 64_000


def test_golden_vit_identity() -> None:
    with attnviz.open(GOLDEN) as rec:
        assert rec.format_version == 1 and rec.complete
        assert (rec.family, rec.model_name, rec.model_class) == ("vit", "golden-vit", "ViTForImageClassification")
        assert rec.created == "2026-01-01T00:00:00+00:00"
        assert (rec.n_samples, rec.n_planned, rec.n_layers, rec.n_heads) == (3, 3, 2, 2)
        assert rec.kinds() == ("self",) and rec.main_kind == "self"
        assert rec.layout() == TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(2, 2), patch_size=(4, 4),
                                           image_size=(8, 8))
        assert rec.extraction_params == {"attributions": ["saliency", "rollout"], "batch_size": 2}
        assert rec.model_config == {"hidden_size": 8, "num_attention_heads": 2}
        assert rec.target_source == "label"
        assert rec.h5.attrs["batch_size"] == 2
        assert rec.sample_ids() == ["img_0.png", "img_1.png", "img_2.png"]
        assert rec.class_names() == ["circle", "square", "triangle"]
        assert rec.skipped() == [("broken.png", "cannot identify image file")]


def test_golden_vit_attention() -> None:
    with attnviz.open(GOLDEN) as rec:
        for s in range(3):
            for layer in range(2):
                for head in range(2):
                    np.testing.assert_array_equal(rec.attention(s, layer, head), expected_map(s, layer, head, 5, 5))
        # hard-coded: sample 0, layer 0, head 0, CLS row = softmax([1.5, 2, 0, 0.5, 1])
        np.testing.assert_allclose(rec.attention(0, 0, 0)[0], [0.26001, 0.42871, 0.05801, 0.09564, 0.15771],
                                   atol=1e-5)
        np.testing.assert_allclose(rec.attention_query(2, 1, 4, head=1),
                                   [0.26001, 0.05801, 0.15771, 0.42871, 0.09564], atol=1e-5)
        (idx, maps), = list(rec.iter_attention(batch_size=8))
        assert idx.tolist() == [0, 1, 2] and maps.shape == (3, 2, 2, 5, 5)


def test_golden_vit_samples() -> None:
    y, x = np.mgrid[0:8, 0:8]
    with attnviz.open(GOLDEN) as rec:
        np.testing.assert_array_equal(rec.labels(), [0, 1, -1])
        np.testing.assert_array_equal(rec.predictions(), [0, 2, 1])
        np.testing.assert_array_equal(rec.logits(), [[2.0, 0.0, -1.0], [0.0, -1.0, 1.5], [-2.0, 3.0, 0.25]])
        assert rec.accuracy == 0.5
        for s in range(3):
            thumb = (s * 50 + y[..., None] * 8 + x[..., None] * 3 + np.arange(3) * 20) % 256
            np.testing.assert_array_equal(rec.thumbnail(s), thumb)
            np.testing.assert_array_equal(rec.mask(s), (y >= 4) & (x < 4 + s))
            np.testing.assert_array_equal(rec.attribution(s, "saliency"), (y * 8 + x) / 64 - s * 0.25)
            np.testing.assert_array_equal(rec.attribution(s, "rollout"), np.arange(4).reshape(2, 2) / 4 + s)
            assert rec.meta(s) == {"source": f"golden_{s}"}
        assert rec.thumbnail(2)[7, 6].tolist() == [174, 194, 214]
        assert rec.attribution(1, "saliency")[3, 5] == 0.203125
        assert int(rec.mask(1).sum()) == 20
        sal, roll = rec.attribution_info("saliency"), rec.attribution_info("rollout")
        assert (sal.shape, sal.resolution, sal.target, sal.description) == ((8, 8), "pixel", "predicted",
                                                                            "golden saliency")
        assert (roll.shape, roll.resolution, roll.target) == ((2, 2), "patch", "label")


def test_golden_vit_head_metric_and_analysis() -> None:
    with attnviz.open(GOLDEN) as rec:
        assert rec.head_metrics() == ["golden_score"]
        np.testing.assert_array_equal(rec.head_metric("golden_score"), [[0.5, 1.5], [2.5, 3.5]])
        assert rec.head_metric_info("golden_score") == HeadMetricInfo(
            "golden_score", kind="self", definition="2*layer + head + 0.5", citation="golden file", units="units",
            higher_is_more_important=True, params={"n": 3})
        assert rec.analyses() == ["golden_profile"]
        assert load_analysis(rec, "golden_profile", {"bins": 5, "kind": "self"}) is None
        got = load_analysis(rec, "golden_profile", {"kind": "self", "bins": 4})
        assert got is not None
        np.testing.assert_array_equal(got["profile"], np.arange(8).reshape(2, 4) / 8)
        assert got["names"].tolist() == ["near", "far"]
        assert rec.analysis_group("golden_profile").attrs["note"] == "golden"


def test_golden_s2t_variable_lengths() -> None:
    tokens, frames = (2, 3), (3, 4)
    sizes = {"cross": lambda s: (tokens[s], frames[s]), "self": lambda s: (frames[s], frames[s]),
             "decoder_self": lambda s: (tokens[s], tokens[s])}
    with attnviz.open(GOLDEN_S2T) as rec:
        assert (rec.family, rec.main_kind, rec.n_samples) == ("s2t", "cross", 2)
        assert rec.kinds() == ("cross", "decoder_self", "self")
        assert (rec.n_layers, rec.n_heads) == (2, 2)
        assert [rec.stack_shape(k) for k in rec.kinds()] == [(2, 2), (2, 2), (1, 2)]
        assert rec.layout("cross") == TokenLayout(query_axis="tokens", key_axis="frames")
        assert rec.layout("self").query_axis == "frames"
        for kind in rec.kinds():
            L, H = rec.stack_shape(kind)
            for s in range(2):
                assert rec.lengths(s, kind) == sizes[kind](s)
                for layer in range(L):
                    for head in range(H):
                        np.testing.assert_array_equal(rec.attention(s, layer, head, kind),
                                                      expected_map(s, layer, head, *sizes[kind](s)))
            _, padded = next(rec.iter_attention(kind))
            q, k = sizes[kind](0)
            assert not padded[0, :, :, q:, :].any() and not padded[0, :, :, :, k:].any()
        np.testing.assert_allclose(rec.attention(0, 1, 1, "cross"),
                                   [[0.23120, 0.62842, 0.14026], [0.54639, 0.12195, 0.33154]], atol=1e-5)
        assert rec.accuracy is None and rec.target_source == "prediction"
        np.testing.assert_array_equal(rec.predictions(), [0, 1])
        assert rec.meta(1) == {"tokens": ["no", "no", "<eos>"]}
        assert not rec.has_masks and rec.mask(0) is None


@pytest.mark.parametrize("path", [GOLDEN, GOLDEN_S2T], ids=["vit", "s2t"])
def test_golden_files_are_not_modified_by_reading(path: Path) -> None:
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with attnviz.open(path) as rec:
        rec.attention(0, 0, 0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
