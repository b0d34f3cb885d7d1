"""Spatial attention profiles against hand-built maps, closed forms and a brute-force loop reference."""

from __future__ import annotations

import itertools
import math

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.analysis.spatial import (
    METRIC_INFO,
    PatchGeometry,
    analyze_spatial,
    compute_spatial,
    default_spatial_kind,
    load_spatial,
    spatial_for_sample,
    spatial_profiles_from_maps,
)
from attnviz.errors import InputError, RecordingError
from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout
from tests.helpers import make_recording, random_attention


def right_neighbour_maps(gh: int, gw: int, n_prefix: int) -> np.ndarray:
    """[1, 1, T, T]: each patch attends only to its right neighbour (the last column, which has
    none, to its left neighbour); prefix queries attend to themselves."""
    t = n_prefix + gh * gw
    m = np.zeros((1, 1, t, t))
    for i in range(n_prefix):
        m[0, 0, i, i] = 1
    for y, x in itertools.product(range(gh), range(gw)):
        q = y * gw + x
        k = q + 1 if x < gw - 1 else q - 1
        m[0, 0, n_prefix + q, n_prefix + k] = 1
    return m


def brute_force(maps: np.ndarray, gh: int, gw: int, ph: int, pw: int, n_prefix: int) -> dict[str, np.ndarray]:
    """Loop-over-every-pair reference for one head: maps float [S, T, T]."""
    p = gh * gw
    off_sum = np.zeros((2 * gh - 1, 2 * gw - 1))
    off_n = np.zeros((2 * gh - 1, 2 * gw - 1))
    per_image = []
    qdist = np.zeros((gh, gw))
    for a in maps:
        mad = pre = slf = loc = rest = 0.0
        for q in range(p):
            qy, qx = divmod(q, gw)
            row = a[n_prefix + q]
            pre += row[:n_prefix].sum()
            dq = 0.0
            for k in range(p):
                ky, kx = divmod(k, gw)
                w = row[n_prefix + k]
                d = math.hypot((ky - qy) * ph, (kx - qx) * pw)
                dq += w * d
                off_sum[ky - qy + gh - 1, kx - qx + gw - 1] += w
                off_n[ky - qy + gh - 1, kx - qx + gw - 1] += 1
                cheb = max(abs(ky - qy), abs(kx - qx))
                if cheb == 0:
                    slf += w
                elif cheb == 1:
                    loc += w
                else:
                    rest += w
            mad += dq
            qdist[qy, qx] += dq
        per_image.append([mad / p, pre / p, slf / p, loc / p, rest / p])
    return {"profile": off_sum / off_n, "per_image": np.array(per_image), "query_distance": qdist / len(maps)}


# -- the cases the issue names -----------------------------------------------------------------


@pytest.mark.parametrize("grid,patch", [((4, 4), (16, 16)), ((3, 5), (8, 8)), ((5, 3), (14, 14))])
def test_right_neighbour_peaks_at_plus_one_and_distance_is_one_patch(grid, patch):
    gh, gw = grid
    geom = PatchGeometry(grid, patch, n_prefix=1)
    r = spatial_profiles_from_maps(right_neighbour_maps(gh, gw, 1), geom)
    prof = r.offset_profile[0, 0]
    assert prof.shape == (2 * gh - 1, 2 * gw - 1)
    centre = (gh - 1, gw - 1)
    assert np.unravel_index(np.argmax(prof), prof.shape) == (centre[0], centre[1] + 1)
    assert prof[centre[0], centre[1] + 1] == pytest.approx(1.0)
    # the last column's queries attend left: gh pairs out of the gh*(gw-1) pairs at offset (0, -1)
    assert prof[centre[0], centre[1] - 1] == pytest.approx(1.0 / (gw - 1))
    assert r.mean_distance[0, 0] == pytest.approx(patch[1])
    assert r.mean_distance_patches[0, 0] == pytest.approx(patch[1])
    np.testing.assert_allclose(r.query_distance[0, 0], np.full(grid, patch[1]), rtol=1e-6)
    np.testing.assert_allclose(r.shares[0, 0], [0, 0, 1, 0], atol=1e-7)


def test_right_neighbour_with_tall_patches_measures_patch_width():
    r = spatial_profiles_from_maps(right_neighbour_maps(3, 4, 1), PatchGeometry((3, 4), (32, 8), n_prefix=1))
    assert r.mean_distance[0, 0] == pytest.approx(8.0)  # horizontal neighbour: one patch *width*


@pytest.mark.parametrize("grid,patch", [((4, 4), (16, 16)), ((2, 7), (8, 8)), ((6, 3), (4, 10))])
def test_uniform_over_patches_gives_closed_form_mean_pairwise_distance(grid, patch):
    gh, gw = grid
    p, t = gh * gw, 1 + gh * gw
    centres = [(y * patch[0], x * patch[1]) for y in range(gh) for x in range(gw)]
    expected = sum(math.dist(a, b) for a in centres for b in centres) / p**2  # independent closed form
    maps = np.zeros((2, 1, 2, t, t))
    maps[..., 1:, 1:] = 1.0 / p
    maps[..., 0, 0] = 1.0
    r = spatial_profiles_from_maps(maps, TokenLayout(n_prefix=1, grid=grid, patch_size=patch))
    np.testing.assert_allclose(r.mean_distance, expected, rtol=1e-6)
    assert r.uniform_mean_distance == pytest.approx(expected)
    np.testing.assert_allclose(r.offset_profile, 1.0 / p, rtol=1e-6)  # every offset: weight 1/P per pair
    np.testing.assert_allclose(r.radial("chebyshev").strength, 1.0 / p, rtol=1e-6)


def test_uniform_over_all_tokens_raw_distance_counts_cls_mass_as_no_distance():
    grid, patch = (3, 4), (16, 16)
    p = 12
    t = p + 1
    maps = np.full((1, 1, 1, t, t), 1.0 / t)
    r = spatial_profiles_from_maps(maps, PatchGeometry(grid, patch, n_prefix=1))
    uniform = PatchGeometry(grid, patch).uniform_mean_distance
    assert r.mean_distance[0, 0] == pytest.approx(uniform * p / t)  # raw weights
    assert r.mean_distance_patches[0, 0] == pytest.approx(uniform)  # renormalised over patches
    assert r.prefix_share[0, 0] == pytest.approx(1.0 / t)


def test_all_attention_on_cls_gives_prefix_share_one_and_zero_patch_profiles():
    grid = (3, 5)
    t = 1 + 15
    maps = np.zeros((2, 2, 3, t, t))
    maps[..., 0] = 1.0
    r = spatial_profiles_from_maps(maps, PatchGeometry(grid, (8, 8), n_prefix=1))
    np.testing.assert_allclose(r.prefix_share, 1.0)
    np.testing.assert_allclose(r.image_shares[..., 0], 1.0)
    assert not r.offset_profile.any()
    assert not r.query_distance.any() and not r.query_patch_mass.any()
    assert not r.radial("euclidean").strength.any()
    np.testing.assert_allclose(r.query_prefix_share, 1.0)
    np.testing.assert_allclose(r.mean_distance, 0.0)
    assert np.isnan(r.mean_distance_patches).all()  # no mass on patches: undefined, not 0


def test_identity_and_local_neighbourhood_shares():
    gh, gw = 4, 5
    p = gh * gw
    ident = np.eye(p)[None, None]
    r = spatial_profiles_from_maps(ident, PatchGeometry((gh, gw), (8, 8), n_prefix=0))
    np.testing.assert_allclose(r.shares[0, 0], [0, 1, 0, 0], atol=1e-7)
    assert r.offset_profile[0, 0, gh - 1, gw - 1] == pytest.approx(1.0)
    assert r.mean_distance[0, 0] == 0.0
    # uniform over the 3x3 neighbourhood without self
    local = np.zeros((p, p))
    for q, k in itertools.product(range(p), range(p)):
        if max(abs(q // gw - k // gw), abs(q % gw - k % gw)) == 1:
            local[q, k] = 1
    local /= local.sum(1, keepdims=True)
    r = spatial_profiles_from_maps(local[None, None], PatchGeometry((gh, gw), (8, 8)))
    np.testing.assert_allclose(r.shares[0, 0], [0, 0, 1, 0], atol=1e-7)
    rad = r.radial("chebyshev")
    assert rad.radius.tolist() == list(range(max(gh, gw)))
    np.testing.assert_allclose(rad.mass[0, 0], [0, 1] + [0] * (max(gh, gw) - 2), atol=1e-7)


@pytest.mark.parametrize("grid,patch,n_prefix", [((3, 4), (16, 8), 1), ((5, 2), (8, 8), 2), ((1, 6), (4, 4), 0)])
def test_random_maps_match_brute_force_reference(grid, patch, n_prefix):
    gh, gw = grid
    t = n_prefix + gh * gw
    rng = np.random.default_rng(1)
    maps = random_attention(rng, (3, 2, 2, t, t)).astype(np.float64)
    r = spatial_profiles_from_maps(maps, PatchGeometry(grid, patch, n_prefix), batch_size=2)
    for layer, head in itertools.product(range(2), range(2)):
        ref = brute_force(maps[:, layer, head], gh, gw, patch[0], patch[1], n_prefix)
        np.testing.assert_allclose(r.offset_profile[layer, head], ref["profile"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.image_mean_distance[:, layer, head], ref["per_image"][:, 0], rtol=1e-5)
        np.testing.assert_allclose(r.image_shares[:, layer, head], ref["per_image"][:, 1:], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.query_distance[layer, head], ref["query_distance"], rtol=1e-5)
    # the shares of a query sum to its row sum (1), and the radial masses to the patch share
    np.testing.assert_allclose(r.image_shares.sum(-1), 1.0, rtol=1e-5)
    for metric in ("chebyshev", "euclidean"):
        np.testing.assert_allclose(r.radial(metric).mass.sum(-1), r.patch_share, rtol=1e-5)
    # the mean distance from the offset profile equals the per-query computation
    g = r.geometry
    from_offsets = (r.offset_profile * g.pair_count * g.offset_distance).sum((-2, -1)) / g.n_patches
    np.testing.assert_allclose(from_offsets, r.mean_distance, rtol=1e-5)


def test_euclidean_rings_and_pair_counts():
    g = PatchGeometry((3, 3), (10, 10))
    ring = g.ring("euclidean")
    # offsets (0,1) and (1,1) (distance 1 and 1.41) -> ring 1; (0,2) -> 2; (1,2) 2.24 -> 2; (2,2) 2.83 -> 3
    assert ring[2, 3] == 1 and ring[3, 3] == 1 and ring[2, 4] == 2 and ring[3, 4] == 2 and ring[4, 4] == 3
    assert g.pair_count.sum() == 81 and g.pair_count[2, 2] == 9 and g.pair_count[0, 0] == 1
    with pytest.raises(InputError):
        g.ring("manhattan")


def test_layout_without_grid_is_refused():
    with pytest.raises(InputError, match="no patch grid"):
        PatchGeometry.from_layout(TokenLayout(n_prefix=0, grid=None), "cross")


def test_padded_maps_ignore_the_padding():
    gh, gw = 2, 3
    m = right_neighbour_maps(gh, gw, 1)
    padded = np.zeros((1, 1, 1, 10, 10))
    padded[..., :7, :7] = m
    padded[..., 7:, :] = 0.5  # junk in the padding
    r = spatial_profiles_from_maps(padded, PatchGeometry((gh, gw), (8, 8), 1))
    assert r.mean_distance[0, 0] == pytest.approx(8.0)


# -- on a recording ----------------------------------------------------------------------------


def test_recording_streaming_equals_in_memory_and_batch_size_does_not_matter(tmp_path):
    rng = np.random.default_rng(3)
    grid = (3, 5)
    t = 1 + 15
    all_maps = random_attention(rng, (7, 2, 3, t, t))
    path = make_recording(tmp_path / "r.h5", n_samples=7, n_layers=2, n_heads=3, grid=grid, patch=8,
                          maps_fn=lambda i: all_maps[i])
    stored = all_maps.astype(np.float16).astype(np.float32)  # what the file holds
    ref = spatial_profiles_from_maps(stored, TokenLayout(n_prefix=1, grid=grid, patch_size=(8, 8)))
    with attnviz.open(path) as rec:
        a = compute_spatial(rec, batch_size=1)
        b = compute_spatial(rec, batch_size=4)
        one = spatial_for_sample(rec, 5)
    for r in (a, b):
        assert r.samples.tolist() == list(range(7))
        np.testing.assert_allclose(r.offset_profile, ref.offset_profile, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(r.image_mean_distance, ref.image_mean_distance, rtol=1e-5)
        np.testing.assert_allclose(r.image_shares, ref.image_shares, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.query_distance, ref.query_distance, rtol=1e-5)
    # one image on demand = that image's row of the per-image values
    np.testing.assert_allclose(one.image_mean_distance[0], a.image_mean_distance[5], rtol=1e-5)
    np.testing.assert_allclose(one.image_shares[0], a.image_shares[5], rtol=1e-5, atol=1e-7)
    single = spatial_profiles_from_maps(stored[5:6], TokenLayout(n_prefix=1, grid=grid, patch_size=(8, 8)))
    np.testing.assert_allclose(one.offset_profile, single.offset_profile, rtol=1e-5, atol=1e-8)


def test_cache_reused_when_params_equal_and_recomputed_when_they_differ(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=6, grid=(2, 3))
    first, computed = analyze_spatial(path)
    assert computed
    again, computed = analyze_spatial(path)
    assert not computed  # same parameters: read from analyses/spatial/self
    np.testing.assert_array_equal(again.offset_profile, first.offset_profile)
    np.testing.assert_array_equal(again.image_shares, first.image_shares)
    fewer, computed = analyze_spatial(path, max_samples=3)
    assert computed and fewer.n_samples == 3
    np.testing.assert_allclose(fewer.image_mean_distance, first.image_mean_distance[:3], rtol=1e-6)
    with attnviz.open(path) as rec:
        cached = load_spatial(rec)  # the dashboard's view: whatever is cached, here the 3-sample result
        assert cached is not None and cached.n_samples == 3
        assert load_spatial(rec, params={"algorithm_version": 1, "kind": "self", "n_samples": 6}) is None
        np.testing.assert_allclose(rec.head_metric("mean_attention_distance"), fewer.mean_distance, rtol=1e-6)
        info = rec.head_metric_info("mean_attention_distance")
        assert info.units == "px" and "Dosovitskiy" in info.citation and info.params["n_samples"] == 3
        for name in ("prefix_share", "self_share", "local_share", "mean_attention_distance_patches"):
            assert name in rec.head_metrics() and rec.head_metric_info(name).definition == METRIC_INFO[name].definition
        np.testing.assert_allclose(rec.head_metric("local_share"), fewer.local_share, rtol=1e-6)
    _, computed = analyze_spatial(path, max_samples=3)
    assert not computed
    # a cache whose stored parameters differ (e.g. made by an older algorithm) is recomputed
    with h5py.File(path, "r+") as f:
        f["analyses/spatial/self"].attrs["params"] = '{"algorithm_version": 0, "kind": "self", "n_samples": 3}'
    with attnviz.open(path) as rec:
        assert load_spatial(rec) is None
    _, computed = analyze_spatial(path, max_samples=3)
    assert computed
    _, computed = analyze_spatial(path, max_samples=3, force=True)
    assert computed


def test_incomplete_recording_is_refused(tmp_path):
    path = make_recording(tmp_path / "r.h5", n_samples=4, grid=(2, 2))
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(RecordingError, match="incomplete"):
        analyze_spatial(path)


def test_vision_tower_of_an_lvlm_recording(tmp_path):
    """The language model's "self" stack has no grid; spatial profiles run on "vision"."""
    n, grid = 3, (2, 3)
    tv = 1 + 6
    vision_layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=grid, patch_size=(14, 14), image_size=(28, 42))
    w = RecordingWriter.create(
        tmp_path / "l.h5", family="lvlm", model_name="tiny-llava", model_class="LlavaForConditionalGeneration",
        sample_ids=[f"{i}.png" for i in range(n)],
        stacks=[StackSpec("self", 2, 2, 9, 9, TokenLayout()), StackSpec("vision", 3, 2, tv, tv, vision_layout)],
        class_names=["a"], labels=None, thumbnail_shape=(28, 42), batch_size=n)
    vision = np.zeros((n, 3, 2, tv, tv))
    vision[..., 0, 0] = 1
    vision[:, :, :, 1:, 1:] = right_neighbour_maps(*grid, 0)[0, 0]
    lm = random_attention(np.random.default_rng(0), (n, 2, 2, 9, 9))
    with w:
        w.write(SampleBatch(start=0, attention={"self": lm, "vision": vision}, predictions=np.zeros(n, int),
                            logits=np.zeros((n, 1), np.float32), thumbnails=np.zeros((n, 28, 42, 3), np.uint8)))
        w.finish()
    with attnviz.open(tmp_path / "l.h5") as rec:
        assert default_spatial_kind(rec) == "vision"
        with pytest.raises(InputError, match="no patch grid"):
            compute_spatial(rec, "self")
    r, _ = analyze_spatial(tmp_path / "l.h5")
    assert r.kind == "vision" and r.mean_distance.shape == (3, 2)
    np.testing.assert_allclose(r.mean_distance, 14.0, rtol=1e-3)
    with attnviz.open(tmp_path / "l.h5") as rec:
        assert rec.head_metric("mean_attention_distance").shape == (3, 2)
        assert rec.head_metric_info("mean_attention_distance").kind == "vision"


def test_analyze_command_computes_then_reuses_and_can_skip(tmp_path, capsys):
    from attnviz.cli import main

    path = make_recording(tmp_path / "r.h5", n_samples=3, grid=(2, 2))
    main(["analyze", str(path)])
    out = capsys.readouterr().out
    assert "spatial profiles (self, 3 image(s), computed" in out
    with attnviz.open(path) as rec:
        assert "mean_attention_distance" in rec.head_metrics() and rec.analysis_group("spatial/self") is not None
    main(["analyze", str(path)])
    assert "cached, unchanged" in capsys.readouterr().out
    main(["analyze", str(path), "--no-spatial"])
    assert "spatial" not in capsys.readouterr().out
