"""How well the autoencoder reconstructs maps: the masked error, and the mean-map baseline (numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["masked_errors", "mean_map_error"]

def masked_errors(values: np.ndarray, prefix: np.ndarray, recon: np.ndarray, recon_prefix: np.ndarray,
                  masks: np.ndarray, mask_index: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Per-map masked mean squared error float32 ``[n]``:
    ``(sum_valid (recon - values)^2 + (recon_prefix - prefix)^2) / (n_valid + 1)``.

    Args:
        values, recon: ``[n, H, W]``; prefix, recon_prefix: ``[n]``; masks: ``[n_queries, H, W]``;
        mask_index: int ``[n]`` (each map's row of ``masks``).
    """
    out = np.empty(len(values), np.float32)
    for i in range(0, len(values), chunk):
        sl = slice(i, i + chunk)
        m = masks[mask_index[sl]]
        d = (recon[sl].astype(np.float32) - values[sl]) ** 2 * m
        se = d.reshape(len(d), -1).sum(1) + (recon_prefix[sl] - prefix[sl]) ** 2
        out[sl] = se / (m.reshape(len(m), -1).sum(1) + 1.0)
    return out


def mean_map_error(values: np.ndarray, prefix: np.ndarray, masks: np.ndarray, mask_index: np.ndarray) -> float:
    """Error of the trivial model that predicts the mean map everywhere (a baseline for the autoencoder)."""
    m = masks[mask_index[: min(len(values), 20000)]]
    v = values[: len(m)]
    mean = (v * m).sum(0) / np.maximum(m.sum(0), 1)
    mean_prefix = np.full(len(m), prefix.mean(), np.float32)
    recon = np.broadcast_to(mean, v.shape)
    return float(masked_errors(v, prefix[: len(m)], recon, mean_prefix, masks, mask_index[: len(m)]).mean())
