"""Attention rollout (Abnar & Zuidema 2020) as an attribution: the CLS row of the rollout over the
patch tokens, on the patch grid. The computation is :func:`attnviz.analysis.rollout.attention_rollout`
(pure numpy, shared with the dashboard); this entry only wraps it.

Definition: ``A'_l = (1 - r) * mean_h A_l + r * I`` with ``r = 0.5``, rows renormalised,
``R = A'_{L-1} @ ... @ A'_0``; the map is ``R[cls, n_prefix:]`` reshaped to ``[grid_h, grid_w]``
(mean over query rows for models without prefix tokens). Independent of the target class.
Cost: ``L`` matrix products of ``T x T`` per image on the CPU, no model pass (uses the recorded maps).
Resolution: patch ``[grid_h, grid_w]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnviz.analysis.rollout import attention_rollout, rollout_to_grid
from extractor.attributions.base import AttributionMethod, register

__all__ = ["rollout", "ROLLOUT"]


def rollout(*, attentions: np.ndarray | None, layout: Any, head_fusion: str = "mean", discard_ratio: float = 0.0,
            **_: Any) -> np.ndarray:
    """Rollout of each sample's recorded attention, CLS row on the patch grid.

    Args:
        attentions: float ``[batch, layer, head, tokens, tokens]``, prefix tokens first.
        layout: TokenLayout with ``n_prefix`` and ``grid``.
        head_fusion: "mean" (the paper), "max" or "min".
        discard_ratio: fraction of smallest entries dropped per fused layer (0 = the paper).

    Returns:
        float32 ``[batch, grid_h, grid_w]``.
    """
    if attentions is None:
        raise ValueError("rollout needs the recorded attentions")
    out = np.empty((len(attentions), *layout.grid), np.float32)
    for i, maps in enumerate(attentions):  # one sample at a time: float64 work arrays stay small
        out[i] = rollout_to_grid(attention_rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio),
                                 n_prefix=layout.n_prefix, grid=layout.grid)
    return out


ROLLOUT = register(AttributionMethod(
    name="rollout",
    resolution="patch",
    description=("attention rollout: product over layers of 0.5*{head_fusion}-over-heads attention + 0.5*I "
                 "(rows renormalised, discard_ratio={discard_ratio}), CLS row over patches; "
                 "Abnar & Zuidema 2020"),
    needs_grad=False,
    fn=rollout,
    params={"head_fusion": "mean", "discard_ratio": 0.0},
))
