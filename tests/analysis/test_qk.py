"""The joint query-key embedding (AttentionViz): normalisation, projection, token selection, the cache,
and the stored vectors against the recorded maps."""

from __future__ import annotations


import numpy as np
import pytest

import attnviz
from attnviz.analysis import qk as Q
from attnviz.errors import InputError
from tests.helpers import make_qk_recording, make_recording


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hand_built_head(n: int = 12, d: int = 4, seed: int = 0):
    """Query i attends mostly to key perm[i]: q_i = 40 u_i, k_j = u_{perm^-1(j)} + c with unit
    directions u on a circle. Raw: every key sits near c, far from every query; after the normalisation a
    query sits next to the key it attends to."""
    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u = np.zeros((n, d))
    u[:, 0], u[:, 1] = np.cos(ang), np.sin(ang)
    perm = rng.permutation(n)
    q = 40.0 * u
    k = np.zeros_like(u)
    k[perm] = u  # key perm[i] points where query i points
    k += np.array([50.0, -30.0, 20.0, 0.0])[:d]
    return q, k, perm


def test_normalisation_keeps_every_attention_map():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(30, 8)) * 3 + 2, rng.normal(size=(40, 8)) * 0.5 - 4
    qn, kn = Q.normalize_qk(q, k)
    assert np.allclose(_softmax(qn @ kn.T / np.sqrt(8)), _softmax(q @ k.T / np.sqrt(8)), atol=1e-12)
    assert np.allclose(qn.mean(0), kn.mean(0))  # keys translated onto the queries' centre
    assert np.linalg.norm(qn, axis=1).mean() == pytest.approx(np.linalg.norm(kn, axis=1).mean())


def test_after_normalisation_a_query_lies_nearest_the_key_it_attends_to():
    q, k, perm = _hand_built_head()
    attn = _softmax(q @ k.T / 2.0)
    assert (attn.argmax(1) == perm).all() and attn.max(1).min() > 0.5  # the head's known attention
    raw_nearest = ((q[:, None] - k[None]) ** 2).sum(-1).argmin(1)
    assert (raw_nearest != perm).mean() > 0.5  # before: distance says nothing
    qn, kn = Q.normalize_qk(q, k)
    assert (((qn[:, None] - kn[None]) ** 2).sum(-1).argmin(1) == perm).all()
    for method in ("pca", "tsne"):  # and in the joint 2-D projection
        qx, kx = Q.project_joint(q, k, method, seed=0)
        nearest = ((qx[:, None] - kx[None]) ** 2).sum(-1).argmin(1)
        assert (nearest == perm).mean() >= (1.0 if method == "pca" else 0.75), method
    qx, kx = Q.project_joint(q, k, "pca")
    assert Q.nearest_key_agreement(qx, kx, q, k, np.zeros(len(q), int)) == 1.0


def test_select_tokens_spreads_over_samples_and_is_deterministic():
    positions = [np.arange(10), np.arange(3), np.arange(10), np.arange(10)]
    s, p = Q.select_tokens(positions, 20, seed=3)
    assert len(s) == 20 and len(set(zip(s.tolist(), p.tolist()))) == 20
    counts = np.bincount(s, minlength=4)
    assert counts[1] == 3 and counts.max() - counts[[0, 2, 3]].min() <= 1  # the short sample passes its quota on
    s2, p2 = Q.select_tokens(positions, 20, seed=3)
    assert (s == s2).all() and (p == p2).all()
    s_all, _ = Q.select_tokens(positions, 1000)
    assert len(s_all) == 33


def test_reader_returns_the_stored_vectors(tmp_path):
    path = make_qk_recording(tmp_path / "r.h5")
    with attnviz.open(path) as rec:
        assert rec.has_qk() and rec.qk_fraction() == 1.0
        pos, q, k = rec.queries_keys(1, 1, 0)
        assert pos.tolist() == list(range(10)) and q.shape == (10, 4)
        approx = _softmax(q @ k.T / 2.0)
        assert np.abs(approx - rec.attention(1, 1, 0)).max() < 5e-3  # float16 vectors and maps
        (idx, p, qb, kb), = list(rec.iter_qk(batch_size=8))
        assert idx.tolist() == [0, 1, 2, 3] and qb.shape == (4, 2, 2, 10, 4)


def test_compute_caches_and_describes_each_token(tmp_path):
    path = make_qk_recording(tmp_path / "r.h5")
    emb = Q.compute_qk_embedding(path, Q.QKParams(method="pca", max_points=30))
    assert not emb.reused and emb.n_points == 30 and emb.query_xy.shape == (2, 2, 30, 2)
    prefix = emb.position == 0
    assert (emb.row[prefix] == -1).all() and (emb.in_mask[prefix] == -1).all()
    patch00 = emb.position == 1
    assert (emb.in_mask[patch00] == 1).all() and (emb.in_mask[emb.position >= 2] == 0).all()
    assert ((emb.row[~prefix] * 3 + emb.col[~prefix] + 1) == emb.position[~prefix]).all()
    assert 0.0 <= float(np.nanmin(emb.agreement)) and emb.chance == pytest.approx(np.mean(1 / np.bincount(emb.sample)))
    again = Q.compute_qk_embedding(path, Q.QKParams(method="pca", max_points=30))
    assert again.reused and np.array_equal(again.query_xy, emb.query_xy)
    other = Q.compute_qk_embedding(path, Q.QKParams(method="pca", max_points=20))
    assert not other.reused and other.n_points == 20
    with attnviz.open(path) as rec:
        assert Q.load_qk_embedding(rec).n_points == 20


def test_refuses_a_recording_without_vectors(tmp_path):
    path = make_recording(tmp_path / "plain.h5")
    with pytest.raises(InputError, match="--store-qk"):
        Q.compute_qk_embedding(path)
    with pytest.raises(InputError, match="--qk-method"):
        Q.QKParams(method="mds")
