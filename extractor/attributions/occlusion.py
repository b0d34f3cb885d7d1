"""Occlusion (Zeiler & Fergus 2014), via ``captum.attr.Occlusion``, one window per ViT patch.

Definition: for each patch ``p`` (window = stride = the model's patch size, all colour channels),
``O[i, j] = logit_target(x) - logit_target(x with patch p set to the baseline 0)`` for every pixel
``(i, j)`` in ``p``: how much the target logit drops when the patch is hidden. The baseline is 0 in
the normalised input space (the normalisation mean colour). Each pixel lies in exactly one window,
so the map is constant on patches; it is stored at pixel resolution ``[image_h, image_w]``.
Cost: ``grid_h * grid_w`` forward passes per image (no backward), ``max(1, internal_batch_size //
batch)`` occluded copies of the batch per pass.
"""

from __future__ import annotations

from typing import Any

from extractor.attributions.base import AttributionMethod, register

__all__ = ["occlusion", "OCCLUSION"]


def occlusion(*, forward: Any, pixel_values: Any, targets: Any, layout: Any, internal_batch_size: int = 64,
              **_: Any) -> Any:
    """Patch occlusion of the target logit.

    Args:
        forward: ``forward(px) -> logits [batch, classes]``.
        pixel_values: float tensor ``[batch, channel, image_h, image_w]``.
        targets: long tensor ``[batch]``.
        layout: TokenLayout with ``patch_size`` (the window and stride).
        internal_batch_size: most examples per forward pass (bounds memory).

    Returns:
        float tensor ``[batch, image_h, image_w]`` (signed; positive = the patch supports the target).
    """
    import torch
    from captum.attr import Occlusion

    if layout.patch_size is None:
        raise ValueError("occlusion needs layout.patch_size")
    px = pixel_values.detach()
    batch, channels = px.shape[:2]
    window = (channels, int(layout.patch_size[0]), int(layout.patch_size[1]))
    with torch.no_grad():
        attr = Occlusion(forward).attribute(
            px,
            sliding_window_shapes=window,
            strides=window,
            baselines=0.0,
            target=targets.to(px.device),
            perturbations_per_eval=max(1, int(internal_batch_size) // batch),
        )  # [batch, channel, h, w], equal over channels (the window spans them all)
    return attr.mean(dim=1)


OCCLUSION = register(AttributionMethod(
    name="occlusion",
    resolution="pixel",
    description=("occlusion of the target logit (captum Occlusion), window = stride = one patch, all channels, "
                 "baseline = zero normalised input; Zeiler & Fergus 2014"),
    needs_grad=False,
    fn=occlusion,
    params={"internal_batch_size": 64},
))
