"""The attribution registry: one :class:`AttributionMethod` entry per method, and the three calls the
extractor makes (:func:`available`, :func:`spec`, :func:`compute`).

Listing and describing methods imports neither torch nor captum (the CLI builds its help from the
registry); only :func:`compute` does, inside the method that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from attnviz.errors import InputError
from attnviz.store.schema import AttributionSpec, TokenLayout
from extractor.targets import TARGETS as _TARGET_TABLE

__all__ = ["AttributionMethod", "RESOLUTIONS", "TARGETS", "register", "get", "available", "spec", "compute"]

RESOLUTIONS = ("pixel", "patch")
# What an attribution explains (extractor.targets): the predicted class's or the label's logit of a
# classifier, the embedding norm or similarity of a backbone. The extractor turns it into the
# `forward` and `targets` it passes to compute().
TARGETS = tuple(_TARGET_TABLE)


@dataclass(frozen=True)
class AttributionMethod:
    """One registered attribution method.

    Attributes:
        name: registry name (``--attributions`` choice, dataset name ``attributions/<name>``).
        resolution: "pixel" (result ``[batch, image_h, image_w]``) or "patch" (``[batch, grid_h, grid_w]``).
        description: one line: what is computed, with which library, channel reduction, citation;
            ``{param}`` fields are filled from ``params``.
        needs_grad: True when the method back-propagates (run under ``torch.enable_grad()``);
            False runs it under ``torch.no_grad()`` (perturbation methods) or without torch.
        fn: ``fn(*, forward, pixel_values, targets, attentions, layout, **params) -> float [batch, h, w]``.
        params: default parameters, passed to ``fn`` and shown in the description.
        input_kind: what the method explains: "image" (these four), later "audio" (s2t saliency); an
            adapter takes the methods of its own input kind (``Adapter.input_kind``).
    """

    name: str
    resolution: str
    description: str
    needs_grad: bool
    fn: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    input_kind: str = "image"

    def describe(self, **overrides: Any) -> str:
        return self.description.format(**{**self.params, **overrides})

    def shape(self, layout: TokenLayout) -> tuple[int, int]:
        """Per-sample result shape for inputs laid out as ``layout``."""
        size = layout.image_size if self.resolution == "pixel" else layout.grid
        if size is None:
            what = "image size" if self.resolution == "pixel" else "patch grid"
            raise InputError(f"attribution {self.name!r} needs the model's {what}, which this model does not have")
        return (int(size[0]), int(size[1]))


_REGISTRY: dict[str, AttributionMethod] = {}


def register(method: AttributionMethod) -> AttributionMethod:
    """Add a method to the registry (one call per method module)."""
    if method.input_kind == "image" and method.resolution not in RESOLUTIONS:
        raise ValueError(f"{method.name}: resolution must be one of {RESOLUTIONS}, got {method.resolution!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"attribution method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def available(input_kind: str | None = None) -> list[str]:
    """Names of the registered methods (of one input kind, or all), in registration order."""
    return [n for n, m in _REGISTRY.items() if input_kind is None or m.input_kind == input_kind]


def get(name: str) -> AttributionMethod:
    """The registry entry of ``name``; an unknown name raises InputError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown attribution method {name!r}; available: {', '.join(available())} (or 'none')"
        ) from None


def spec(name: str, *, layout: TokenLayout, target: str) -> AttributionSpec:
    """The :class:`~attnviz.store.AttributionSpec` the writer needs for method ``name``.

    Args:
        name: a registry name.
        layout: the token layout of the self-attention stack (image size, patch grid).
        target: "predicted" or "label".

    Returns:
        ``AttributionSpec(name, shape=(h, w), resolution, target, description)``; ``shape`` equals
        ``compute(name, ...).shape[1:]`` for inputs of this layout.
    """
    method = get(name)
    if target not in TARGETS:
        raise InputError(f"unknown attribution target {target!r}; choose one of {', '.join(TARGETS)}")
    description = method.describe()
    if not _TARGET_TABLE[target].classifier:  # the methods describe logits; say what a backbone's score is
        description += f"; target: {_TARGET_TABLE[target].definition} in place of the logit"
    return AttributionSpec(
        name=method.name,
        shape=method.shape(layout),
        resolution=method.resolution,
        target=target,
        description=description,
    )


def compute(
    name: str,
    *,
    forward: Callable[[Any], Any],
    pixel_values: Any,
    targets: Any,
    attentions: np.ndarray | None,
    layout: TokenLayout,
    **params: Any,
) -> np.ndarray:
    """Run method ``name`` on one batch.

    Args:
        name: a registry name.
        forward: ``forward(px) -> logits [batch, classes]``, a closure over the model (in eval mode).
        pixel_values: float tensor ``[batch, 3, image_h, image_w]`` on the model's device, the model's
            own (normalised) input; not modified.
        targets: long tensor ``[batch]``: the class each sample's attribution explains.
        attentions: float32 ``[batch, layer, head, tokens, tokens]`` (prefix tokens first), used by
            attention-based methods; may be None for the others.
        layout: the token layout (``n_prefix``, ``grid``, ``patch_size``, ``image_size``).
        **params: overrides of the method's default parameters (e.g. ``n_steps=64``).

    Returns:
        float32 numpy ``[batch, h, w]`` with ``(h, w) == spec(name, ...).shape``.
    """
    method = get(name)
    unknown = set(params) - set(method.params)
    if unknown:
        raise InputError(f"attribution {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(method.params) or 'none'}")
    kwargs = {**method.params, **params}
    expected = method.shape(layout)
    call = dict(forward=forward, pixel_values=pixel_values, targets=targets, attentions=attentions, layout=layout)
    if method.needs_grad:
        import torch

        # Gradients w.r.t. the input only: captum uses torch.autograd.grad, so no .grad is left
        # on the model's parameters; the extractor may run its own forward under no_grad.
        with torch.enable_grad():
            result = method.fn(**call, **kwargs)
    else:
        result = method.fn(**call, **kwargs)
    result = _to_numpy(result)
    batch = len(targets)
    if result.shape != (batch, *expected):
        raise RuntimeError(f"attribution {name!r} returned shape {result.shape}, expected {(batch, *expected)}")
    return result


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)
