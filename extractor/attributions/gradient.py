"""Gradient saliency of a speech model's tokens ("gradient"), via captum.

For token row ``t`` (the step that predicts ``y_{t+1}`` under forced decoding) and the input features
``X [M, F]``, the target is ``f_t(X) = log p(y_{t+1} | y_<=t, X)``, and with ``method``:

* ``saliency`` (default): ``S[t, f, m] = | d f_t / d X[m, f] |`` (``captum.attr.Saliency``; Simonyan,
  Vedaldi & Zisserman 2014);
* ``input_x_gradient``: ``| X[m, f] * d f_t / d X[m, f] |`` (``captum.attr.InputXGradient``; Shrikumar et
  al. 2016);
* ``integrated_gradients``: ``| (X - 0) * mean_{a in (0, 1]} d f_t / d X |_{a X}`` over ``n_steps``
  Gauss-Legendre points from the all-zero baseline (the value masking uses) (``captum.attr.IntegratedGradients``;
  Sundararajan, Taly & Yan 2017).

The magnitude is stored for every variant: a frame that lowers the token's log-probability is as relevant
as one that raises it. Rows are explained in chunks of ``batch_size`` copies of the clip (copy ``i`` of a
chunk takes the gradient of its own row's target), one backward per chunk. Resolution: spectrogram
``[T, F, M]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from extractor.attributions.base import AttributionMethod, register
from extractor.attributions.speech import ForcedDecoding, sdpa_attention

__all__ = ["gradient_saliency", "GRADIENT", "GRADIENT_METHODS"]

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


def gradient_saliency(*, decoding: ForcedDecoding, method: str = "saliency", n_steps: int = 16, batch_size: int = 8,
                      **_: Any) -> np.ndarray:
    """|gradient|-based relevance of every input cell for every token row.

    Args:
        decoding: the clip under forced decoding.
        method: one of :data:`GRADIENT_METHODS`.
        n_steps: integrated gradients: points on the path from the zero baseline.
        batch_size: rows (copies of the clip) per backward pass.

    Returns:
        float32 ``[T, F, M]``, >= 0.
    """
    import torch
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    if method not in GRADIENT_METHODS:
        raise ValueError(f"gradient method must be one of {', '.join(GRADIENT_METHODS)}, got {method!r}")
    x = decoding.features.detach()
    n_rows, n_frames = decoding.n_rows, decoding.n_frames
    out = np.zeros((n_rows, n_frames, int(x.shape[1])), np.float32)
    forward = decoding.token_logprobs  # [N, M, F_window] -> [N, T]
    with sdpa_attention(decoding.model):
        for start in range(0, n_rows, batch_size):
            rows = torch.arange(start, min(start + batch_size, n_rows), device=x.device)
            copies = x.expand(len(rows), -1, -1).clone().requires_grad_(True)
            if method == "saliency":
                grads = Saliency(forward).attribute(copies, target=rows, abs=True)
            elif method == "input_x_gradient":
                grads = InputXGradient(forward).attribute(copies, target=rows).abs()
            else:
                grads = IntegratedGradients(forward).attribute(copies, baselines=torch.zeros_like(copies), target=rows,
                                                               n_steps=n_steps, internal_batch_size=len(rows)).abs()
            out[start:start + len(rows)] = grads[:, :, :n_frames].transpose(1, 2).detach().float().cpu().numpy()
    return out


GRADIENT = register(AttributionMethod(
    name="gradient",
    resolution="spectrogram",
    description=("gradient saliency |attribution| of log p(token) w.r.t. the input features, forced decoding "
                 "(captum {method}; Simonyan et al. 2014 / Shrikumar et al. 2016 / Sundararajan et al. 2017)"),
    needs_grad=True,
    fn=gradient_saliency,
    params={"method": "saliency", "n_steps": 16, "batch_size": 8},
    input_kind="audio",
))
