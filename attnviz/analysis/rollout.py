"""Attention rollout (Abnar & Zuidema 2020): how much each input token flows into each output token.

Definition (Abnar, S. & Zuidema, W., "Quantifying Attention Flow in Transformers", ACL 2020,
Sec. 3): the residual connection is modelled by mixing each layer's attention with the identity,
and the mixed layers are chained by matrix products::

    A'_l      = (1 - r) * fuse_h(A_l) + r * I          r = residual_weight, 0.5 in the paper
    A'_l[q,:] = A'_l[q,:] / sum_k A'_l[q,k]             rows renormalised (row-stochastic)
    R         = A'_{L-1} @ ... @ A'_1 @ A'_0            layers start_layer .. L-1

``fuse_h`` is the mean over heads in the paper; ``max`` / ``min`` over heads and dropping the
smallest ``discard_ratio`` of each fused map before adding the identity are the variants of
J. Gildenblat's ``vit-explain`` (2020), kept as options. ``R[q, k]`` is the share of output token
``q`` that comes from input token ``k``; every row of ``R`` sums to 1.

For a ViT the CLS row over the patch columns, reshaped to the patch grid, is the rollout
attribution map (:func:`rollout_to_grid`).

Pure numpy; no torch.
"""

from __future__ import annotations

import numpy as np

from attnviz.errors import InputError

__all__ = ["HEAD_FUSIONS", "fuse_heads", "attention_rollout", "rollout_to_grid"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(maps: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
    """Combine the heads of each layer into one map.

    Args:
        maps: float ``[..., head, query_pos, key_pos]``.
        head_fusion: "mean", "max" or "min" over the head axis.

    Returns:
        float64 ``[..., query_pos, key_pos]``.
    """
    if head_fusion == "mean":
        return maps.mean(axis=-3, dtype=np.float64)
    if head_fusion == "max":
        return maps.max(axis=-3).astype(np.float64)
    if head_fusion == "min":
        return maps.min(axis=-3).astype(np.float64)
    raise InputError(f"unknown head fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")


def attention_rollout(
    maps: np.ndarray,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual_weight: float = 0.5,
    start_layer: int = 0,
) -> np.ndarray:
    """Attention rollout of one sample's (or a batch of samples') attention stack.

    Args:
        maps: float ``[layer, head, query_pos, key_pos]`` for one sample, or
            ``[batch, layer, head, query_pos, key_pos]``; rows are attention distributions
            (softmax outputs), layers in forward order, tokens in the model's order.
        head_fusion: how heads are combined per layer: "mean" (Abnar & Zuidema), "max" or "min".
        discard_ratio: fraction in [0, 1) of the entries of each fused layer map (the smallest ones,
            counted over the whole ``query_pos x key_pos`` map) set to zero before the identity is
            added; 0 keeps all (the paper).
        residual_weight: ``r`` in ``A' = (1 - r) * A + r * I``; 0.5 in the paper.
        start_layer: first layer included in the product (0 = all layers).

    Returns:
        float32 (float64 for float64 input) ``[query_pos, key_pos]`` or
        ``[batch, query_pos, key_pos]``: ``R = A'_{L-1} @ ... @ A'_{start_layer}``, rows summing to 1.
    """
    maps = np.asarray(maps)
    if maps.ndim not in (4, 5) or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(
            f"maps must be [layer, head, T, T] or [batch, layer, head, T, T], got shape {maps.shape}"
        )
    if not 0.0 <= discard_ratio < 1.0:
        raise InputError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not 0.0 <= residual_weight <= 1.0:
        raise InputError(f"residual_weight must be in [0, 1], got {residual_weight}")
    n_layers = maps.shape[-4]
    if not 0 <= start_layer < n_layers:
        raise InputError(f"start_layer must be in [0, {n_layers - 1}], got {start_layer}")
    out_dtype = np.result_type(maps.dtype, np.float32)

    # float64 (fuse_heads) so that a product of many layers keeps its rows summing to 1.
    fused = fuse_heads(maps[..., start_layer:, :, :, :], head_fusion)  # [..., layer, T, T]
    t = fused.shape[-1]
    if discard_ratio > 0.0:
        k = int(discard_ratio * t * t)
        if k > 0:
            flat = fused.reshape(*fused.shape[:-2], t * t)
            smallest = np.argpartition(flat, k - 1, axis=-1)[..., :k]
            np.put_along_axis(flat, smallest, 0.0, axis=-1)
            fused = flat.reshape(fused.shape)
    mixed = (1.0 - residual_weight) * fused + residual_weight * np.eye(t)
    row_sums = mixed.sum(axis=-1, keepdims=True)
    mixed = np.divide(mixed, row_sums, out=np.zeros_like(mixed), where=row_sums > 0)

    rollout = mixed[..., 0, :, :]
    for layer in range(1, mixed.shape[-3]):
        rollout = mixed[..., layer, :, :] @ rollout
    return rollout.astype(out_dtype, copy=False)


def rollout_to_grid(rollout: np.ndarray, *, n_prefix: int, grid: tuple[int, int], query: int = 0) -> np.ndarray:
    """The rollout share of each patch in one output token, on the patch grid.

    Args:
        rollout: float ``[query_pos, key_pos]`` or ``[batch, query_pos, key_pos]`` from
            :func:`attention_rollout`; ``n_prefix`` prefix tokens then ``grid_h * grid_w`` patches
            in row-major order.
        n_prefix: number of prefix tokens (CLS, distillation, registers) before the patches.
        grid: ``(grid_h, grid_w)``.
        query: the output token whose row is read (0 = CLS). Without prefix tokens
            (``n_prefix == 0``, mean-pooled models) the mean over all query rows is used instead.

    Returns:
        float ``[grid_h, grid_w]`` or ``[batch, grid_h, grid_w]``: ``R[query, n_prefix + i]`` (not
        renormalised: the values sum to 1 minus the share that stays on prefix tokens).
    """
    gh, gw = grid
    if rollout.shape[-1] != n_prefix + gh * gw:
        raise ValueError(
            f"rollout has {rollout.shape[-1]} tokens, layout says {n_prefix} prefix + {gh}x{gw} patches"
        )
    row = rollout[..., query, :] if n_prefix > 0 else rollout.mean(axis=-2)
    return row[..., n_prefix:].reshape(*row.shape[:-1], gh, gw)
