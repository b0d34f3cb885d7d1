"""Deletion curves of speech explanations (run during extraction, where the model is loaded).

For token row ``t`` (predicting ``y_{t+1}`` under forced decoding) and an explanation ``R [T, E]`` (a relevance
per row and encoder frame: cross-attention, pooled saliency, or a random control), rank the clip's ``E``
encoder frames by ``R[t]`` (highest first), delete the top ``round(x * E)`` of them by zeroing the two input
feature frames each one covers, and measure ``log p_x(y_{t+1})`` under forced decoding, for the fractions
``x = 0, 1/S, ..., 1``. A faithful explanation finds the frames the token needs first, so its curve falls
fastest; the area under the probability curve (``attnviz.analysis.crossattn.deletion_auc``) is lower the
better (Samek et al. 2017, "Evaluating the visualization of what a deep neural network has learned", IEEE
TNNLS, the "most relevant first" perturbation curve; used for speech explanations by SPES, Fucci et al. 2024).

Every (explanation, fraction, row) is one copy of the clip; copies run in batches of ``batch_size`` (SDPA
attention). Cost per clip: ``n_explanations x S x T`` encoder + decoder passes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from extractor.attributions.speech import ForcedDecoding, sdpa_attention

__all__ = ["deletion_curves", "deletion_fractions", "frame_order"]


def deletion_fractions(steps: int) -> np.ndarray:
    """float ``[steps + 1]``: ``0, 1/steps, ..., 1``."""
    return np.linspace(0.0, 1.0, int(steps) + 1)


def frame_order(relevance: np.ndarray) -> np.ndarray:
    """int ``[T, E]``: each row's encoder frames, most relevant first (ties: earlier frame first)."""
    return np.argsort(-np.asarray(relevance, np.float64), axis=1, kind="stable")


def deletion_curves(decoding: ForcedDecoding, explanations: Mapping[str, np.ndarray], steps: int,
                    batch_size: int = 32) -> np.ndarray:
    """Log-probability of every row's token as the top frames of each explanation are deleted.

    Args:
        decoding: the clip under forced decoding (``n_encoder_frames`` = E, ``n_frames`` = F).
        explanations: name -> relevance float ``[T, E]``.
        steps: fractions ``0, 1/steps, ..., 1`` (:func:`deletion_fractions`).
        batch_size: copies of the clip per forward.

    Returns:
        float32 ``[n_explanations, steps + 1, T]`` in the order of ``explanations``: ``log p_x(y_{t+1})``.
    """
    import torch

    x = decoding.features  # [1, M, F_window]
    n_rows, n_enc, n_frames = decoding.n_rows, decoding.n_encoder_frames, decoding.n_frames
    fractions = deletion_fractions(steps)
    names = list(explanations)
    # one job per (explanation, fraction > 0, row): the feature frames to zero
    jobs: list[tuple[int, int, int, np.ndarray]] = []
    for i, name in enumerate(names):
        relevance = np.asarray(explanations[name])
        if relevance.shape != (n_rows, n_enc):
            raise ValueError(f"explanation {name!r} has shape {relevance.shape}, expected {(n_rows, n_enc)}")
        order = frame_order(relevance)
        for s, frac in enumerate(fractions[1:], 1):
            k = int(round(frac * n_enc))
            for t in range(n_rows):
                enc = order[t, :k]
                feat = np.concatenate([2 * enc, 2 * enc + 1])
                jobs.append((i, s, t, feat[feat < n_frames]))
    out = np.zeros((len(names), len(fractions), n_rows), np.float32)
    with torch.no_grad(), sdpa_attention(decoding.model):
        base = decoding.token_logprobs(x)[0].float().cpu().numpy()  # [T]
        out[:, 0, :] = base
        rows = torch.as_tensor(np.array([j[2] for j in jobs], np.int64), device=x.device)
        for start in range(0, len(jobs), batch_size):
            block = jobs[start:start + batch_size]
            keep = torch.ones((len(block), *x.shape[1:]), dtype=x.dtype, device=x.device)
            for c, (_, _, _, feat) in enumerate(block):
                keep[c, :, torch.as_tensor(feat, dtype=torch.long, device=x.device)] = 0
            lp = decoding.token_logprobs(x * keep)  # [b, T]
            picked = lp.gather(1, rows[start:start + len(block)].view(-1, 1))[:, 0].float().cpu().numpy()
            for c, (i, s, t, _) in enumerate(block):
                out[i, s, t] = picked[c]
    return out
