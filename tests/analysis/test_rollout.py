"""Attention rollout against hand-computed values and the explicit product formula."""

from __future__ import annotations

import numpy as np
import pytest

from attnviz.analysis.rollout import attention_rollout, fuse_heads, rollout_to_grid
from attnviz.errors import InputError


def softmax_maps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape) * 2.0
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def attend_to(token: int, t: int, n_layers: int, n_heads: int) -> np.ndarray:
    """Every query of every head puts all its attention on ``token``: [layer, head, t, t]."""
    maps = np.zeros((n_layers, n_heads, t, t))
    maps[..., token] = 1.0
    return maps


def test_identity_attention_gives_identity():
    maps = np.broadcast_to(np.eye(5), (2, 3, 5, 5)).copy()
    np.testing.assert_allclose(attention_rollout(maps), np.eye(5), atol=1e-12)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_attention_to_one_token_by_hand(n_layers):
    # One layer: A' = 0.5 J + 0.5 I with J = column of ones at token j (J @ J = J), so
    # A'^L = (1 - 0.5^L) J + 0.5^L I.  L=1: 0.5/0.5, L=2: 0.75/0.25, L=3: 0.875/0.125.
    t, j = 5, 3
    r = attention_rollout(attend_to(j, t, n_layers, 2))
    expected = {1: (0.5, 0.5), 2: (0.75, 0.25), 3: (0.875, 0.125)}[n_layers]
    hand = np.zeros((t, t))
    hand[:, j] = expected[0]
    hand += expected[1] * np.eye(t)
    np.testing.assert_allclose(r, hand, atol=1e-12)
    # The column of j carries 1 - 0.5^L of every other token's row.
    np.testing.assert_allclose(np.delete(r[:, j], j), expected[0])


def test_rows_sum_to_one_and_equal_explicit_product():
    rng = np.random.default_rng(0)
    maps = softmax_maps(rng, (4, 3, 7, 7))
    r = attention_rollout(maps)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    layers = []
    for layer in maps:
        a = 0.5 * layer.mean(0) + 0.5 * np.eye(7)
        layers.append(a / a.sum(-1, keepdims=True))
    explicit = layers[3] @ layers[2] @ layers[1] @ layers[0]  # later layers on the left
    np.testing.assert_allclose(r, explicit, atol=1e-12)
    # The order matters: the reversed product is a different matrix for random maps.
    assert not np.allclose(r, layers[0] @ layers[1] @ layers[2] @ layers[3], atol=1e-4)


def test_float32_maps_give_float32_rollout_rows_summing_to_one():
    rng = np.random.default_rng(1)
    maps = softmax_maps(rng, (12, 4, 17, 17)).astype(np.float32)
    r = attention_rollout(maps)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)


def test_batched_equals_per_sample():
    rng = np.random.default_rng(2)
    maps = softmax_maps(rng, (3, 2, 2, 5, 5))
    batched = attention_rollout(maps, head_fusion="max", discard_ratio=0.3)
    assert batched.shape == (3, 5, 5)
    for i in range(3):
        np.testing.assert_allclose(batched[i], attention_rollout(maps[i], head_fusion="max", discard_ratio=0.3))


def test_head_fusion_max_min_by_hand():
    # Head 0 attends to token 0, head 1 to token 1, one layer, two tokens.
    maps = np.zeros((1, 2, 2, 2))
    maps[0, 0, :, 0] = 1.0
    maps[0, 1, :, 1] = 1.0
    np.testing.assert_allclose(fuse_heads(maps, "mean")[0], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(fuse_heads(maps, "max")[0], [[1, 1], [1, 1]])
    # max: 0.5*[[1,1],[1,1]] + 0.5*I = [[1, .5], [.5, 1]] -> rows / 1.5
    np.testing.assert_allclose(attention_rollout(maps, head_fusion="max"), [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    # min: every entry 0 -> only the identity is left.
    np.testing.assert_allclose(attention_rollout(maps, head_fusion="min"), np.eye(2))
    with pytest.raises(InputError, match="mean, max, min"):
        attention_rollout(maps, head_fusion="median")


def test_discard_ratio_by_hand():
    # One layer, one head, 2 tokens: fused [[0.9, 0.1], [0.3, 0.7]]; discard 1/4 of 4 entries = the 0.1.
    maps = np.array([[[[0.9, 0.1], [0.3, 0.7]]]])
    r = attention_rollout(maps, discard_ratio=0.25)
    # row 0: 0.5*[0.9, 0] + 0.5*[1, 0] = [0.95, 0] -> [1, 0]; row 1: [0.15, 0.85] (already sums to 1)
    np.testing.assert_allclose(r, [[1.0, 0.0], [0.15, 0.85]])
    np.testing.assert_allclose(attention_rollout(maps), [[0.95, 0.05], [0.15, 0.85]])


def test_start_layer_skips_early_layers():
    rng = np.random.default_rng(3)
    maps = softmax_maps(rng, (3, 2, 4, 4))
    np.testing.assert_allclose(attention_rollout(maps, start_layer=1), attention_rollout(maps[1:]))


def test_rollout_to_grid_reads_cls_row_row_major():
    # Two prefix tokens then a 2x3 grid: the CLS row's patch columns 2..7 in row-major order.
    r = np.zeros((8, 8))
    r[0] = [0.1, 0.2, 1, 2, 3, 4, 5, 6]
    r[1] = 9.0
    grid = rollout_to_grid(r, n_prefix=2, grid=(2, 3))
    np.testing.assert_array_equal(grid, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(rollout_to_grid(np.stack([r, 2 * r]), n_prefix=2, grid=(2, 3))[1],
                                  [[2, 4, 6], [8, 10, 12]])
    # No prefix tokens: mean over query rows.
    q = np.arange(16, dtype=float).reshape(4, 4)
    np.testing.assert_array_equal(rollout_to_grid(q, n_prefix=0, grid=(2, 2)), [[6, 7], [8, 9]])
    with pytest.raises(ValueError, match="prefix"):
        rollout_to_grid(r, n_prefix=1, grid=(2, 3))


def test_bad_options_raise():
    maps = np.broadcast_to(np.eye(3), (1, 1, 3, 3))
    with pytest.raises(InputError):
        attention_rollout(maps, discard_ratio=1.0)
    with pytest.raises(ValueError):
        attention_rollout(np.ones((3, 3)))
