"""Encoder-output saliency ("encoder_perturbation"): which encoder frames the decoder's prediction needs.

The same estimator as :mod:`extractor.attributions.spectrogram_perturbation`, applied to the encoder's
output ``H [E_window, d]`` instead of the input: mask ``k`` hides a random subset of the cells of a randomly
shifted grid of time windows (``widths`` encoder frames, one width per mask, cycling), hidden frames of ``H``
are set to zero, and

    s_k[t] = KL( p(. | y_<=t, H) || p(. | y_<=t, H * (1 - m_k)) ),
    S[t, e] = sum_k s_k[t] m_k[e] / sum_k m_k[e] - (1/K) sum_k s_k[t]

It explains the decoder alone, on the representation cross-attention reads, so it is the reference that
cross-attention can at best reach (Papi et al. 2025, "Cross-Attention is Half Explanation in Speech-to-Text
Models", arXiv:2509.18010, compare cross-attention with such encoder-output saliency). The encoder runs once;
the masks cost one decoder pass each, batched. Resolution: encoder_frame ``[T, E]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from extractor.attributions.base import AttributionMethod, register
from extractor.attributions.speech import ForcedDecoding, hidden_mean_scores, kl_rows, random_masks, sdpa_attention

__all__ = ["encoder_perturbation", "ENCODER_PERTURBATION"]

#: time-window widths in encoder frames (20 ms each for Whisper): 40 ms to 400 ms
DEFAULT_WIDTHS = (2, 5, 10, 20)


def encoder_perturbation(*, decoding: ForcedDecoding, n_masks: int = 128, batch_size: int = 32, p_hide: float = 0.25,
                         widths: Sequence[int] = DEFAULT_WIDTHS, seed: int = 0, **_: Any) -> np.ndarray:
    """Mean KL divergence of the encoder-output masks that hid each encoder frame.

    Returns:
        float32 ``[T, E]`` (token row, encoder frame).
    """
    import torch

    n_enc, n_rows = decoding.n_encoder_frames, decoding.n_rows
    masks = random_masks(np.random.default_rng(seed), n_masks, 1, n_enc, [(1.0, w) for w in widths], p_hide)[:, 0]
    scores = np.zeros((n_masks, n_rows), np.float64)
    with torch.no_grad(), sdpa_attention(decoding.model):
        hidden = decoding.encoder_hidden()  # [1, E_window, d]
        reference = decoding.logprobs_from_encoder(hidden)[0]
        for start in range(0, n_masks, batch_size):
            block = torch.as_tensor(masks[start:start + batch_size], device=hidden.device)  # [b, E]
            keep = torch.ones((block.shape[0], hidden.shape[1], 1), dtype=hidden.dtype, device=hidden.device)
            keep[:, :n_enc, 0] = (~block).to(hidden.dtype)
            scores[start:start + block.shape[0]] = kl_rows(
                reference, decoding.logprobs_from_encoder(hidden * keep)).double().cpu().numpy()
    return hidden_mean_scores(scores, masks).astype(np.float32)


ENCODER_PERTURBATION = register(AttributionMethod(
    name="encoder_perturbation",
    resolution="encoder_frame",
    description=("encoder-output perturbation: {n_masks} random masks over encoder frames (zeroed, p_hide {p_hide}), "
                 "saliency of a frame = mean KL of the next-token distribution over the masks that hid it minus the mean "
                 "of all masks, forced decoding (the reference cross-attention can at best reach; Papi et al. 2025)"),
    needs_grad=False,
    fn=encoder_perturbation,
    params={"n_masks": 128, "batch_size": 32, "p_hide": 0.25, "seed": 0},
    input_kind="audio",
))
