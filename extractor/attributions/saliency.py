"""Gradient saliency (Simonyan, Vedaldi & Zisserman 2014), via ``captum.attr.Saliency``.

Definition: ``S[i, j] = max_c | d logit_target(x) / d x[c, i, j] |`` — the absolute gradient of the
target class logit with respect to each input pixel of the model's (normalised) input, reduced over
the colour channels by the maximum (the paper's choice; ``channel_reduction="sum"`` sums instead).
One forward and one backward pass per image. Resolution: pixel ``[image_h, image_w]``.
"""

from __future__ import annotations

from typing import Any

from extractor.attributions.base import AttributionMethod, register

__all__ = ["saliency", "SALIENCY"]

CHANNEL_REDUCTIONS = ("max", "sum")


def saliency(*, forward: Any, pixel_values: Any, targets: Any, channel_reduction: str = "max", **_: Any) -> Any:
    """Absolute input gradients of the target logit.

    Args:
        forward: ``forward(px) -> logits [batch, classes]``.
        pixel_values: float tensor ``[batch, channel, image_h, image_w]``.
        targets: long tensor ``[batch]``.
        channel_reduction: "max" or "sum" over the channel axis.

    Returns:
        float tensor ``[batch, image_h, image_w]``, >= 0.
    """
    from captum.attr import Saliency

    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction must be one of {CHANNEL_REDUCTIONS}, got {channel_reduction!r}")
    # A detached leaf of our own that already requires grad: the caller's tensor is never touched and
    # captum does not warn that it had to switch requires_grad on.
    px = pixel_values.detach().requires_grad_(True)
    grads = Saliency(forward).attribute(px, target=targets.to(px.device), abs=True)  # [batch, channel, h, w]
    return grads.amax(dim=1) if channel_reduction == "max" else grads.sum(dim=1)


SALIENCY = register(AttributionMethod(
    name="saliency",
    resolution="pixel",
    description=("gradient saliency |d logit_target / d pixel| (captum Saliency), {channel_reduction} over "
                 "colour channels; Simonyan et al. 2014"),
    needs_grad=True,
    fn=saliency,
    params={"channel_reduction": "max"},
))
