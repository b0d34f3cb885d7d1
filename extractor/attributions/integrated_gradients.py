"""Integrated gradients (Sundararajan, Taly & Yan 2017), via ``captum.attr.IntegratedGradients``.

Definition, for input ``x`` and baseline ``x'``::

    IG_c,i,j(x) = (x - x')[c,i,j] * integral_0^1 d logit_target(x' + a (x - x')) / d x[c,i,j] da

approximated with ``n_steps`` Gauss-Legendre points (captum's default rule), then summed over the
colour channels (signed), so that the map keeps the completeness axiom:
``sum_ij IG[i, j] ~= logit_target(x) - logit_target(x')``.

Baseline: the all-zero tensor in the model's normalised input space (``pixel_values = 0``), i.e. an
image of the normalisation mean colour (mid-grey for mean = std = 0.5 processors), not black.
Cost: ``n_steps`` forward + backward passes per image, run in chunks of at most
``max(internal_batch_size, batch)`` examples. Resolution: pixel ``[image_h, image_w]``.
"""

from __future__ import annotations

from typing import Any

from extractor.attributions.base import AttributionMethod, register

__all__ = ["integrated_gradients", "INTEGRATED_GRADIENTS"]


def integrated_gradients(*, forward: Any, pixel_values: Any, targets: Any, n_steps: int = 32,
                         internal_batch_size: int = 64, **_: Any) -> Any:
    """Integrated gradients from the zero baseline, summed over channels.

    Args:
        forward: ``forward(px) -> logits [batch, classes]``.
        pixel_values: float tensor ``[batch, channel, image_h, image_w]`` (normalised model input).
        targets: long tensor ``[batch]``.
        n_steps: integration points.
        internal_batch_size: most examples (images x steps) per forward pass; bounds memory.

    Returns:
        float tensor ``[batch, image_h, image_w]`` (signed).
    """
    import torch
    from captum.attr import IntegratedGradients

    px = pixel_values.detach()
    attr = IntegratedGradients(forward).attribute(
        px,
        baselines=torch.zeros_like(px),
        target=targets.to(px.device),
        n_steps=n_steps,
        method="gausslegendre",
        # captum refuses chunks smaller than the batch; one step of the whole batch is the minimum.
        internal_batch_size=max(int(internal_batch_size), px.shape[0]),
    )  # [batch, channel, h, w]
    return attr.sum(dim=1)


INTEGRATED_GRADIENTS = register(AttributionMethod(
    name="integrated_gradients",
    resolution="pixel",
    description=("integrated gradients of the target logit (captum IntegratedGradients), baseline = zero "
                 "normalised input, n_steps={n_steps} Gauss-Legendre, summed over colour channels; "
                 "Sundararajan et al. 2017"),
    needs_grad=True,
    fn=integrated_gradients,
    params={"n_steps": 32, "internal_batch_size": 64},
))
