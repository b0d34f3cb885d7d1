"""The pattern atlas: query-centring, sampling, clustering, per-head summaries, the full pipeline, the cache.

The pipeline test draws maps from five known pattern families (local neighbourhood, one fixed offset,
uniform, attend-to-CLS, row band) plus noise, writes them through the real writer, and checks that
the atlas recovers the families. The pipeline runs once per module (UMAP's first call compiles
with numba, ~10 s); the cache tests reuse its file.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import attnviz
from attnviz.analysis import patterns as pt
from attnviz.analysis.patterns.__main__ import main as patterns_main
from attnviz.errors import InputError
from tests.helpers import make_recording

FAMILIES = ("local", "offset", "uniform", "cls", "row")
GRID = (6, 6)
N_LAYERS, N_HEADS = 2, len(FAMILIES)
OFFSET = (0, 2)


def family_row(family: str, qy: int, qx: int, rng: np.random.Generator, noise: float = 0.3) -> tuple[np.ndarray, str]:
    """One query's attention row (CLS first, then the 6x6 patches) drawn from ``family``, and the
    family the map truly shows: a fixed-offset head whose target lies outside the image attends to CLS."""
    gh, gw = GRID
    t = 1 + gh * gw
    p = np.zeros(t)
    yy, xx = np.mgrid[:gh, :gw]
    shown = family
    if family == "local":
        p[1:] = np.exp(-((yy - qy) ** 2 + (xx - qx) ** 2) / (2 * 0.8**2)).ravel()
    elif family == "offset":
        ty, tx = qy + OFFSET[0], qx + OFFSET[1]
        if 0 <= ty < gh and 0 <= tx < gw:
            p[1 + ty * gw + tx] = 1
        else:
            p[0], shown = 1, "cls"
    elif family == "uniform":
        p[:] = 1
    elif family == "cls":
        p[0] = 1
    elif family == "row":
        p[1:] = (yy == qy).ravel()
    p = p / p.sum()
    p = p * np.exp(noise * rng.standard_normal(t)) + 0.01 / t   # multiplicative noise and a floor
    return p / p.sum(), shown


def family_maps(sample: int) -> np.ndarray:
    """``[layer, head, token, token]``: head h of every layer draws from FAMILIES[h]."""
    rng = np.random.default_rng(1000 + sample)
    gh, gw = GRID
    t = 1 + gh * gw
    out = np.zeros((N_LAYERS, N_HEADS, t, t), np.float32)
    for layer in range(N_LAYERS):
        for head, fam in enumerate(FAMILIES):
            out[layer, head, 0] = 1.0 / t
            for q in range(gh * gw):
                out[layer, head, 1 + q] = family_row(fam, *divmod(q, gw), rng)[0]
    return out


def true_family(head: int, query: int) -> str:
    fam = FAMILIES[head]
    if fam == "offset":
        qy, qx = divmod(query, GRID[1])
        if not (0 <= qy + OFFSET[0] < GRID[0] and 0 <= qx + OFFSET[1] < GRID[1]):
            return "cls"
    return fam


PARAMS = pt.PatternParams(max_maps=600, latent=8, channels=(8, 16), epochs=12, patience=4, batch_size=64,
                          umap_neighbors=10, n_nearest=4, seed=0)


@pytest.fixture(scope="module")
def atlas_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pt.PatternAtlas]:
    path = make_recording(tmp_path_factory.mktemp("patterns") / "families.h5", n_samples=6, n_layers=N_LAYERS,
                          n_heads=N_HEADS, grid=GRID, maps_fn=family_maps)
    stages: list[str] = []
    atlas = pt.compute_patterns(path, PARAMS, device="cpu", progress=lambda s, f, m: stages.append(s))
    assert not atlas.reused
    assert {"maps", "autoencoder", "umap", "clusters", "save"} <= set(stages)
    return path, atlas


# -- query-centring ------------------------------------------------------------------------


@pytest.mark.parametrize("qy,qx", [(0, 0), (0, 6), (4, 0), (4, 6), (0, 3), (2, 0), (2, 3), (3, 4)])
def test_query_centring_puts_offset_at_centre_plus_offset(qy: int, qx: int) -> None:
    gh, gw = 5, 7  # non-square on purpose
    offsets = [(dy, dx) for dy in range(-gh + 1, gh) for dx in range(-gw + 1, gw)
               if 0 <= qy + dy < gh and 0 <= qx + dx < gw]
    maps = np.zeros((len(offsets), gh, gw), np.float32)
    for i, (dy, dx) in enumerate(offsets):
        maps[i, qy + dy, qx + dx] = 1.0
    q = np.full(len(offsets), qy * gw + qx)
    centred = pt.query_centre(maps, q, (gh, gw))
    assert centred.shape == (len(offsets), 2 * gh - 1, 2 * gw - 1)
    for i, (dy, dx) in enumerate(offsets):
        expected = np.zeros((2 * gh - 1, 2 * gw - 1), np.float32)
        expected[gh - 1 + dy, gw - 1 + dx] = 1.0
        np.testing.assert_array_equal(centred[i], expected)
    np.testing.assert_array_equal(pt.query_uncentre(centred, q, (gh, gw)), maps)
    # validity: exactly the offsets that land inside the grid for this query
    mask = pt.centred_masks((gh, gw))[qy * gw + qx]
    valid = {(y - gh + 1, x - gw + 1) for y, x in zip(*np.nonzero(mask))}
    assert valid == set(offsets)


def test_collect_maps_reads_and_centres_through_the_recording(tmp_path: Path) -> None:
    """Each query attends only to the key at (+1, -2), or to CLS where that key does not exist."""
    gh, gw = 4, 5
    dy, dx = 1, -2
    t = 1 + gh * gw

    def maps_fn(sample: int) -> np.ndarray:
        a = np.zeros((2, 3, t, t), np.float32)
        a[..., 0, 0] = 1
        for q in range(gh * gw):
            qy, qx = divmod(q, gw)
            if 0 <= qy + dy < gh and 0 <= qx + dx < gw:
                a[..., 1 + q, 1 + (qy + dy) * gw + qx + dx] = 1
            else:
                a[..., 1 + q, 0] = 1
        return a

    path = make_recording(tmp_path / "offset.h5", n_samples=3, n_layers=2, n_heads=3, grid=(gh, gw), maps_fn=maps_fn)
    sel = pt.stratified_sample(3, 2, 3, gh * gw, max_maps=10_000)
    assert len(sel) == 3 * 2 * 3 * gh * gw
    with attnviz.open(path) as rec:
        values, prefix = pt.collect_maps(rec, sel, "self", "centred", "none", batch_bytes=1)  # one sample per batch
        absolute, _ = pt.collect_maps(rec, sel, "self", "absolute", "none")
    for i in range(len(sel)):
        qy, qx = divmod(int(sel.query[i]), gw)
        inside = 0 <= qy + dy < gh and 0 <= qx + dx < gw
        expected = np.zeros((2 * gh - 1, 2 * gw - 1), np.float32)
        if inside:
            expected[gh - 1 + dy, gw - 1 + dx] = 1
            assert absolute[i, qy + dy, qx + dx] == 1 and absolute[i].sum() == 1
        np.testing.assert_array_equal(values[i], expected)
        assert prefix[i] == (0.0 if inside else 1.0)


def test_normalise_peak_divides_map_and_prefix_by_their_maximum() -> None:
    v = np.array([[[0.1, 0.2], [0.0, 0.1]], [[0.05, 0.05], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
    p = np.array([0.6, 0.9, 0.0], np.float32)
    v2, p2 = pt.normalise(v.copy(), p.copy(), "peak")
    np.testing.assert_allclose(v2[0], v[0] / 0.6)
    np.testing.assert_allclose(p2, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(v2[1], v[1] / 0.9)
    np.testing.assert_array_equal(v2[2], 0)
    v3, p3 = pt.normalise(v.copy(), p.copy(), "none")
    np.testing.assert_array_equal(v3, v)


# -- sampling --------------------------------------------------------------------------------


def test_stratified_sample_balances_heads_and_images() -> None:
    n_samples, n_layers, n_heads, n_q, m = 7, 3, 4, 9, 100
    sel = pt.stratified_sample(n_samples, n_layers, n_heads, n_q, m, seed=3)
    assert len(sel) == m
    rows = set(zip(sel.sample.tolist(), sel.layer.tolist(), sel.head.tolist(), sel.query.tolist()))
    assert len(rows) == m                                           # no map twice
    per_head = Counter(zip(sel.layer.tolist(), sel.head.tolist()))
    assert len(per_head) == n_layers * n_heads and set(per_head.values()) <= {8, 9}   # 100 / 12
    per_image = Counter(sel.sample.tolist())
    assert len(per_image) == n_samples and set(per_image.values()) <= {14, 15}        # 100 / 7
    assert np.all(np.diff(sel.sample) >= 0)                          # sorted for streaming
    assert sel.query.min() >= 0 and sel.query.max() < n_q
    # a head that visits an image twice (8-9 maps over 7 images) takes distinct queries: checked by `rows`


def test_stratified_sample_takes_everything_when_small() -> None:
    sel = pt.stratified_sample(2, 1, 2, 3, max_maps=1000)
    assert len(sel) == 2 * 1 * 2 * 3
    assert len(set(zip(sel.sample.tolist(), sel.head.tolist(), sel.query.tolist()))) == 12


# -- errors, clusters, heads -------------------------------------------------------------------


def test_masked_errors_by_hand() -> None:
    values = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]], np.float32)
    recon = np.array([[[0.5, 9.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.0]]], np.float32)
    masks = np.array([[[1, 0], [1, 1]], [[1, 1], [1, 1]]], np.float32)   # query 0 lacks position (0, 1)
    prefix = np.array([0.0, 0.2], np.float32)
    recon_prefix = np.array([0.1, 0.2], np.float32)
    err = pt.masked_errors(values, prefix, recon, recon_prefix, masks, np.array([0, 1]))
    np.testing.assert_allclose(err, [(0.25 + 0.01) / 4, 0.25 / 5], rtol=1e-6)


def test_cluster_latents_kmeans_auto_and_hdbscan_recover_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8]], np.float32)
    sizes = [120, 90, 60, 30]
    truth = np.repeat(np.arange(4), sizes)
    x = np.concatenate([c + rng.standard_normal((s, 3)).astype(np.float32) * 0.5 for c, s in zip(centres, sizes)])
    km = pt.cluster_latents(x, clusters="auto", k_range=(2, 8), seed=0)
    assert km.chosen_by == "silhouette" and km.n_clusters == 4
    assert adjusted_rand_score(truth, km.labels) == 1.0
    assert list(np.bincount(km.labels)) == sizes                     # numbered by size
    assert np.argmax(km.silhouette) == list(km.k_candidates).index(4)
    np.testing.assert_allclose(km.centroids, centres, atol=0.2)
    fixed = pt.cluster_latents(x, clusters=3, seed=0)
    assert fixed.n_clusters == 3 and fixed.chosen_by == "given" and len(fixed.k_candidates) == 0
    hd = pt.cluster_latents(x, method="hdbscan", min_cluster_size=15)
    assert hd.n_clusters == 4
    keep = hd.labels >= 0
    assert keep.mean() > 0.9 and adjusted_rand_score(truth[keep], hd.labels[keep]) == 1.0


def test_head_mixes_and_ordering_by_hand() -> None:
    # 2 layers x 2 heads; heads (0,0) and (1,1) do the same (all cluster 0), (0,1) and (1,0) split 1/2
    layer = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    head = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    labels = np.array([0, 0, 0, 1, 2, 2, 1, 2, 2, 0, 0, -1])
    mix, noise = pt.head_mixes(layer, head, labels, 2, 2, 3)
    np.testing.assert_allclose(mix[0, 0], [1, 0, 0])
    np.testing.assert_allclose(mix[0, 1], [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(mix[1, 1], [2 / 3, 0, 0])
    np.testing.assert_allclose(noise, [[0, 0], [0, 1 / 3]])
    np.testing.assert_allclose(mix.sum(-1) + noise, 1)
    z, order = pt.order_heads(mix, noise)
    assert z.shape == (3, 4) and sorted(order.tolist()) == [0, 1, 2, 3]
    # the two identical heads (flat 1 = L0H1, 2 = L1H0) merge first, at distance 0
    assert set(z[0, :2].astype(int)) == {1, 2} and z[0, 2] == pytest.approx(0.0)
    assert abs(order.tolist().index(1) - order.tolist().index(2)) == 1


def test_params_are_checked() -> None:
    for bad in (dict(mode="diagonal"), dict(scale="log"), dict(clusters="many"), dict(clusters=1),
                dict(method="dbscan"), dict(max_maps=5), dict(k_range=(1, 4))):
        with pytest.raises(InputError):
            pt.PatternParams(**bad)
    assert pt.PatternParams(clusters="7").clusters == 7


def test_pattern_kind_needs_a_patch_grid() -> None:
    from attnviz.store.schema import TokenLayout

    class Rec:
        family = "s2t"

        def kinds(self) -> tuple[str, ...]:
            return ("cross", "self")

        def layout(self, kind: str) -> TokenLayout:
            return TokenLayout(query_axis="tokens", key_axis="frames")

    with pytest.raises(InputError, match="patch grid"):
        pt.pattern_kind(Rec(), None)
    with pytest.raises(InputError, match="no 'vision'"):
        pt.pattern_kind(Rec(), "vision")


def test_importing_the_numpy_side_does_not_import_torch_or_umap() -> None:
    code = ("import sys, attnviz.analysis.patterns, attnviz.figures.patterns; "
            "bad = [m for m in ('torch', 'umap', 'numba') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the pipeline on known families ----------------------------------------------------------------


def _family_inputs(path: Path, atlas: pt.PatternAtlas) -> tuple[np.ndarray, np.ndarray]:
    sel = pt.MapSample(atlas.sample.astype(np.int64), atlas.layer.astype(np.int64), atlas.head.astype(np.int64),
                       atlas.query.astype(np.int64))
    with attnviz.open(path) as rec:
        return pt.collect_maps(rec, sel, "self", "centred", "peak")


def test_pipeline_recovers_known_families(atlas_file: tuple[Path, pt.PatternAtlas]) -> None:
    path, atlas = atlas_file
    truth = np.array([true_family(int(h), int(q)) for h, q in zip(atlas.head, atlas.query)])
    assert atlas.n_maps == PARAMS.max_maps
    assert adjusted_rand_score(truth, atlas.cluster) >= 0.8
    # each family is the majority of exactly one cluster
    majority = [Counter(truth[atlas.cluster == c]).most_common(1)[0][0] for c in range(atlas.n_clusters)]
    assert sorted(set(majority)) == sorted(FAMILIES)
    # each prototype (decoded centroid) is closest to its own family's mean input
    values, prefix = _family_inputs(path, atlas)
    masks = pt.centred_masks(GRID)[atlas.query]
    means = {}
    for fam in FAMILIES:
        sel = truth == fam
        cover = masks[sel].sum(0)
        means[fam] = (np.where(cover > 0, (values[sel] * masks[sel]).sum(0) / np.maximum(cover, 1), np.nan),
                      prefix[sel].mean())
    for c in range(atlas.n_clusters):
        dist = {}
        for fam, (m, p) in means.items():
            ok = np.isfinite(m)
            dist[fam] = np.sum((atlas.prototypes[c][ok] - m[ok]) ** 2) + (atlas.prototype_prefix[c] - p) ** 2
        assert min(dist, key=dist.get) == majority[c], (c, majority[c], dist)
    # the nearest real maps of a cluster are members of it
    for c in range(atlas.n_clusters):
        near = atlas.nearest[c][atlas.nearest[c] >= 0]
        assert len(near) == PARAMS.n_nearest and np.all(atlas.cluster[near] == c)


def test_pipeline_head_summaries(atlas_file: tuple[Path, pt.PatternAtlas]) -> None:
    path, atlas = atlas_file
    truth = np.array([true_family(int(h), int(q)) for h, q in zip(atlas.head, atlas.query)])
    majority = [Counter(truth[atlas.cluster == c]).most_common(1)[0][0] for c in range(atlas.n_clusters)]
    assert atlas.mix.shape == (N_LAYERS, N_HEADS, atlas.n_clusters)
    np.testing.assert_allclose(atlas.mix.sum(-1) + atlas.noise, 1, atol=1e-6)
    for layer in range(N_LAYERS):
        for head, fam in enumerate(FAMILIES):
            assert majority[atlas.dominant[layer, head]] == fam
            # the mix is the share of the head's maps per cluster (recounted here)
            mine = atlas.cluster[(atlas.layer == layer) & (atlas.head == head)]
            np.testing.assert_allclose(atlas.mix[layer, head], np.bincount(mine, minlength=atlas.n_clusters) / len(mine))
    # the same family in both layers: neighbours in the dendrogram order
    order = atlas.head_order.tolist()
    for head in range(N_HEADS):
        assert abs(order.index(head) - order.index(N_HEADS + head)) == 1
    assert atlas.linkage.shape == (N_LAYERS * N_HEADS - 1, 4)
    # reconstruction: far better than predicting the mean map; per-head error = mean of its maps
    s = atlas.summary
    assert s["explained"] > 0.6
    assert s["reconstruction_error"] == pytest.approx(float(atlas.error.mean()), rel=1e-5)
    m = (atlas.layer == 1) & (atlas.head == 2)
    assert atlas.head_error[1, 2] == pytest.approx(float(atlas.error[m].mean()), rel=1e-5)
    assert atlas.embedding.shape == (atlas.n_maps, 2) and np.isfinite(atlas.embedding).all()


def test_cached_weights_rebuild_the_network(atlas_file: tuple[Path, pt.PatternAtlas]) -> None:
    from attnviz.analysis.patterns.autoencoder import AutoencoderConfig, load_autoencoder

    path, atlas = atlas_file
    with attnviz.open(path) as rec:
        g = rec.analysis_group("patterns")
        weights = {k: g["weights"][k][()] for k in g["weights"]}
        assert all(w.dtype == np.float32 for w in weights.values())
        recon = g["recon"][:20].astype(np.float32)
    cfg = atlas.summary["autoencoder"]
    net = load_autoencoder(weights, AutoencoderConfig(cfg["height"], cfg["width"], cfg["latent"], tuple(cfg["channels"])))
    centroids = np.stack([atlas.latent[atlas.cluster == c].mean(0) for c in range(atlas.n_clusters)])
    protos, proto_prefix = net.decode(centroids)
    np.testing.assert_allclose(protos, atlas.prototypes, atol=1e-4)
    np.testing.assert_allclose(proto_prefix, atlas.prototype_prefix, atol=1e-4)
    values, prefix = _family_inputs(path, atlas)
    latent = net.encode(values[:20], prefix[:20], pt.centred_masks(GRID), atlas.query[:20])
    np.testing.assert_allclose(latent, atlas.latent[:20], atol=1e-4)
    np.testing.assert_allclose(net.decode(latent)[0], recon, atol=2e-3)   # stored as float16


def test_map_detail_reads_raw_maps_and_stored_reconstructions(atlas_file: tuple[Path, pt.PatternAtlas]) -> None:
    path, atlas = atlas_file
    idx = [5, 0, 5, atlas.n_maps - 1]
    with attnviz.open(path) as rec:
        d = pt.map_detail(rec, atlas, idx)
        for i, j in enumerate(idx):
            row = rec.attention(int(atlas.sample[j]), int(atlas.layer[j]), int(atlas.head[j]))[1 + int(atlas.query[j])]
            np.testing.assert_allclose(d.raw[i], row[1:].reshape(GRID))
            assert d.raw_prefix[i] == pytest.approx(row[0])
            np.testing.assert_array_equal(d.recon[i], rec.analysis_group("patterns")["recon"][j].astype(np.float32))
    np.testing.assert_array_equal(d.recon[0], d.recon[2])
    values, prefix = _family_inputs(path, atlas)
    np.testing.assert_allclose(d.inputs, values[idx], atol=1e-6)


# -- the cache ------------------------------------------------------------------------------


def test_cache_reused_with_same_params_recomputed_when_they_differ(atlas_file: tuple[Path, pt.PatternAtlas],
                                                                   tmp_path: Path) -> None:
    src, atlas = atlas_file
    path = tmp_path / "copy.h5"
    shutil.copy(src, path)
    with attnviz.open(path) as rec:
        created = rec.analysis_group("patterns").attrs["created"]
        assert pt.load_atlas(rec) is not None
    again = pt.compute_patterns(path, PARAMS, device="cpu")
    assert again.reused
    np.testing.assert_array_equal(again.embedding, atlas.embedding)
    np.testing.assert_array_equal(again.cluster, atlas.cluster)
    with attnviz.open(path) as rec:
        assert rec.analysis_group("patterns").attrs["created"] == created
    changed = dataclasses.replace(PARAMS, clusters=3, max_maps=300, epochs=3)
    other = pt.compute_patterns(path, changed, device="cpu")
    assert not other.reused and other.n_clusters == 3 and other.n_maps == 300
    with attnviz.open(path) as rec:
        loaded = pt.load_atlas(rec)
        assert loaded.params["clusters"] == 3 and loaded.n_maps == 300
        assert rec.analysis_group("patterns")["recon"].shape[0] == 300
    assert pt.compute_patterns(path, changed).reused


def test_load_atlas_is_none_without_a_cache(tmp_path: Path) -> None:
    path = make_recording(tmp_path / "plain.h5", n_samples=2)
    with attnviz.open(path) as rec:
        assert pt.load_atlas(rec) is None


def test_cli_analyze_patterns(atlas_file: tuple[Path, pt.PatternAtlas], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from attnviz.cli import main

    src, _ = atlas_file
    path = tmp_path / "cli.h5"
    shutil.copy(src, path)
    main(["analyze", str(path), "--no-spatial", "--patterns", "--max-maps", "200", "--latent", "4", "--clusters", "4"])
    out = capsys.readouterr().out
    assert "pattern atlas (self, 200 centred maps of 11x11, computed" in out and "4 clusters (K given)" in out
    with attnviz.open(path) as rec:
        a = pt.load_atlas(rec)
        assert a.n_maps == 200 and a.latent.shape[1] == 4 and a.n_clusters == 4
    main(["analyze", str(path), "--no-spatial", "--patterns", "--max-maps", "200", "--latent", "4", "--clusters", "4"])
    assert "cached, unchanged" in capsys.readouterr().out
    for bad, msg in ((["--clusters", "lots"], "--clusters"), (["--device", "gpu"], "--device")):
        with pytest.raises(SystemExit) as e:
            main(["analyze", str(path), "--no-spatial", "--patterns", *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_module_entry_point_prints_progress_as_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m attnviz.analysis.patterns FILE`` (what the dashboard's compute button runs)."""
    import json

    path = make_recording(tmp_path / "small.h5", n_samples=3, n_layers=1, n_heads=2, grid=(3, 3))
    assert patterns_main([str(path), "--clusters", "2", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {m["stage"] for m in lines[:-1]} >= {"maps", "autoencoder", "umap", "clusters", "save"}
    assert lines[-1] == {"done": True, "reused": False, "n_maps": 3 * 2 * 9, "n_clusters": 2}
    with attnviz.open(path) as rec:
        assert pt.load_atlas(rec).n_clusters == 2
    assert patterns_main([str(tmp_path / "missing.h5")]) == 2
    assert "no such file" in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
