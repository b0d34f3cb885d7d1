"""What an attribution explains: the scalar per image that saliency, integrated gradients and occlusion
take the derivative (or the difference) of. One table row per target (``--target``).

Classifiers (the model has a classification head, :attr:`Adapter.has_classifier`):

* ``predicted``: the logit of the predicted class, ``z_c(x)`` with ``c = argmax z(x)``;
* ``label``: the logit of the sample's label (every input needs one).

Backbones without a classification head (DINOv2, CLIP and SigLIP towers, ``ViTModel``, ...) output a
pooled embedding ``e(x)`` (the architecture table's ``output``: CLS token, pooler output, projected
image embedding, or mean patch token):

* ``embedding_norm``: ``||e(x)||_2``, the Euclidean norm of the embedding: which pixels make the
  representation large. A scalar that needs no reference, so every method (saliency included) is
  defined for it. Caveat: an embedding taken right after a LayerNorm (the CLS token of DINOv2 and
  ``ViTModel``, CLIP's pooler output) varies in length only through the norm's learned scale and shift;
  where those are close to 1 and 0 its length is almost constant and its gradients almost vanish. Prefer
  ``embedding_similarity`` with integrated gradients or occlusion for such a model;
* ``embedding_similarity``: ``cos(e(x'), e(x))``, the cosine similarity of the embedding of a perturbed
  input ``x'`` to the embedding of the unperturbed image ``x`` (held fixed): which pixels the
  representation of *this* image depends on (as in occlusion analyses of self-supervised features).
  It is 1 at ``x`` and maximal there, so its gradient at ``x`` is zero: plain saliency is refused for
  it; integrated gradients (from the zero baseline) and occlusion are well defined.

``auto`` (the default) is ``predicted`` for a classifier and ``embedding_norm`` for a backbone.

Each target turns into a ``forward(px) -> scores [batch, k]`` and an index ``targets [batch]`` into the
scores, the interface captum's methods take. Captum evaluates perturbed copies of a batch in chunks
whose rows are copy-major (row ``c * b + j`` is copy ``c`` of sample ``j``); the similarity target
lines its references up the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from attnviz.errors import InputError

__all__ = ["Target", "TARGETS", "TARGET_NAMES", "resolve_target", "target_forward", "check_methods"]


@dataclass(frozen=True)
class Target:
    """One attribution target.

    Attributes:
        name: the ``--target`` value.
        classifier: True = for models with a classification head; False = for backbones.
        definition: the formula, in words (stored in the recording beside each attribution).
        zero_gradient: its gradient at the input is zero by construction (plain saliency is refused).
    """

    name: str
    classifier: bool
    definition: str
    zero_gradient: bool = False


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("predicted", True, "logit of the predicted class z_c(x), c = argmax z(x)"),
    Target("label", True, "logit of the sample's label z_y(x)"),
    Target("embedding_norm", False, "Euclidean norm of the pooled embedding ||e(x)||_2"),
    Target("embedding_similarity", False,
           "cosine similarity cos(e(x'), e(x)) of the perturbed input's embedding to the unperturbed one",
           zero_gradient=True),
)}
TARGET_NAMES = ("auto", *TARGETS)


def resolve_target(name: str, *, has_classifier: bool) -> Target:
    """``--target`` -> the :class:`Target` for a model with or without a classification head.

    Raises:
        InputError: unknown name, or a target of the other kind of model (one line saying which fit).
    """
    if name == "auto":
        return TARGETS["predicted" if has_classifier else "embedding_norm"]
    if name not in TARGETS:
        raise InputError(f"unknown --target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    t = TARGETS[name]
    if t.classifier != has_classifier:
        fits = [n for n, x in TARGETS.items() if x.classifier == has_classifier]
        what = "has a classification head" if has_classifier else "has no classification head (a backbone)"
        raise InputError(f"--target {name} does not fit this model: it {what}; use {' or '.join(fits)}")
    return t


def check_methods(target: Target, methods: list[str]) -> None:
    """Refuse method/target pairs that are undefined (saliency of a target whose gradient is zero)."""
    if target.zero_gradient and "saliency" in methods:
        raise InputError(f"saliency of --target {target.name} is zero everywhere (the target is maximal at the "
                         "input); use integrated_gradients or occlusion with it, or --target embedding_norm")


def target_forward(adapter: Any, target: Target, pixel_values: Any, *, labels: np.ndarray | None = None,
                   predictions: np.ndarray | None = None) -> tuple[Callable[[Any], Any], Any]:
    """The captum-style ``(forward, targets)`` of one batch.

    Args:
        adapter: the loaded model (:class:`extractor.adapters.Adapter`).
        target: from :func:`resolve_target`.
        pixel_values: float tensor ``[batch, 3, h, w]`` on the model's device (the batch to explain).
        labels, predictions: int ``[batch]`` (classifier targets).

    Returns:
        ``forward(px) -> scores float [n, k]`` (differentiable) and ``targets`` long ``[batch]``.
    """
    import torch

    b = int(pixel_values.shape[0])
    device = pixel_values.device
    if target.classifier:
        chosen = labels if target.name == "label" else predictions
        assert chosen is not None
        return adapter.logits_fn(), torch.as_tensor(np.asarray(chosen), dtype=torch.long, device=device)
    embed = adapter.embedding_fn()
    zeros = torch.zeros(b, dtype=torch.long, device=device)
    if target.name == "embedding_norm":
        return (lambda px: embed(px).norm(dim=-1, keepdim=True)), zeros
    with torch.no_grad():
        reference = torch.nn.functional.normalize(embed(pixel_values.detach()), dim=-1)  # [batch, dim]

    def similarity(px: Any) -> Any:
        n = int(px.shape[0])
        if n % b:
            raise RuntimeError(f"embedding_similarity: {n} rows are not copies of the batch of {b}")
        ref = reference.repeat(n // b, 1)  # copy-major, as captum expands a batch
        return torch.nn.functional.cosine_similarity(embed(px), ref, dim=-1).unsqueeze(-1)

    return similarity, zeros
