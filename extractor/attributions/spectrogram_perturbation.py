"""Spectrogram perturbation saliency ("perturbation"), in the spirit of SPES (Fucci et al. 2024).

For one clip with input features ``X [M, F]`` (mel bins x feature frames that hold audio) and the recorded
tokens ``y`` under forced decoding, draw ``K`` random masks ``m_k [M, F]`` at several scales
(:func:`extractor.attributions.speech.random_masks`: a randomly shifted grid of time-frequency cells of one
size per mask, each cell hidden with probability ``p_hide``), set the hidden cells to zero, and score every
token row ``t`` by the divergence of its next-token distribution from the unperturbed one:

    s_k[t] = KL( p(. | y_<=t, X) || p(. | y_<=t, X * (1 - m_k)) )

The saliency of a cell is the mean score over the masks that hid it, minus the mean score of all masks
(:func:`extractor.attributions.speech.hidden_mean_scores`):

    S[t, f, m] = sum_k s_k[t] m_k[m, f] / sum_k m_k[m, f]  -  (1/K) sum_k s_k[t]      (0 where no mask hid the cell)

The subtracted term is one constant per token row: rankings, correlations and deletion curves are exactly those
of the plain mean over the hiding masks; it only removes the floor that every cell would carry (measured on a
model that reads one time window alone: 18% of the plain map's mass fell in a window of 17% of the clip, i.e.
none of it concentrated; centred, the mass concentrates there, ``tests/extractor/test_speech_attributions.py``).
Values can be slightly negative (masks that hid the cell scored below average: noise).

Masks are evaluated in batches of ``batch_size`` copies of the clip (one forward each batch, SDPA attention),
not one forward per mask; ``benchmarks/s2t.py`` measures the speedup. Where SPES segments the spectrogram
with SLIC superpixels and also perturbs the previous tokens, this method uses rectangular cells of fixed
sizes and explains the spectrogram only. Reference: D. Fucci, M. Gaido, B. Savoldi, M. Negri, M. Cettolo,
L. Bentivogli (2024), "SPES: Spectrogram Perturbation for Explainable Speech-to-Text Generation",
arXiv:2411.01710. Resolution: spectrogram ``[T, F, M]``, >= 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from extractor.attributions.base import AttributionMethod, register
from extractor.attributions.speech import (
    DEFAULT_SCALES,
    ForcedDecoding,
    hidden_mean_scores,
    kl_rows,
    random_masks,
    sdpa_attention,
)

__all__ = ["spectrogram_perturbation", "PERTURBATION", "DEFAULT_N_MASKS"]

#: masks per clip when --n-masks is not given (see docs/speech.md for the cost)
DEFAULT_N_MASKS = 128


def spectrogram_perturbation(*, decoding: ForcedDecoding, n_masks: int = DEFAULT_N_MASKS, batch_size: int = 16,
                             p_hide: float = 0.25, scales: Sequence[tuple[float, int]] = DEFAULT_SCALES,
                             seed: int = 0, **_: Any) -> np.ndarray:
    """Mean KL divergence of the masks that hid each cell.

    Args:
        decoding: the clip under forced decoding.
        n_masks: masks ``K``.
        batch_size: masked copies per forward.
        p_hide: probability that a cell of a mask's grid is hidden.
        scales: (fraction of the mel axis, feature frames) per scale; masks cycle through them.
        seed: seeds the masks (``numpy.random.default_rng``).

    Returns:
        float32 ``[T, F, M]`` (token row, feature frame, mel bin).
    """
    import torch

    if n_masks < 1 or batch_size < 1:
        raise ValueError(f"n_masks and batch_size must be at least 1, got {n_masks} and {batch_size}")
    x = decoding.features  # [1, M, F_window]
    n_mel, n_frames, n_rows = int(x.shape[1]), decoding.n_frames, decoding.n_rows
    masks = random_masks(np.random.default_rng(seed), n_masks, n_mel, n_frames, scales, p_hide)  # [K, M, F]
    scores = np.zeros((n_masks, n_rows), np.float64)
    with torch.no_grad(), sdpa_attention(decoding.model):
        reference = decoding.logprobs(x)[0]  # [T, vocab]
        for start in range(0, n_masks, batch_size):
            block = torch.as_tensor(masks[start:start + batch_size], device=x.device)  # [b, M, F]
            keep = torch.ones((block.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            keep[:, :, :n_frames] = (~block).to(x.dtype)
            scores[start:start + block.shape[0]] = kl_rows(reference, decoding.logprobs(x * keep)).double().cpu().numpy()
    return hidden_mean_scores(scores, masks).transpose(0, 2, 1).astype(np.float32)  # [T, M, F] -> [T, F, M]


PERTURBATION = register(AttributionMethod(
    name="perturbation",
    resolution="spectrogram",
    description=("spectrogram perturbation (SPES-style, Fucci et al. 2024): {n_masks} random multi-scale "
                 "time-frequency masks (cells zeroed, p_hide {p_hide}), saliency of a cell = mean KL(p(.|X) || "
                 "p(.|masked X)) of the next-token distribution over the masks that hid it, minus the mean of all masks; "
                 "forced decoding"),
    needs_grad=False,
    fn=spectrogram_perturbation,
    params={"n_masks": DEFAULT_N_MASKS, "batch_size": 16, "p_hide": 0.25, "seed": 0},
    input_kind="audio",
))
