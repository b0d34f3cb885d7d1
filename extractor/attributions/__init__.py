"""Feature attributions recorded beside the attention maps: a registry of methods.

>>> from extractor import attributions as A
>>> A.available("image")
['saliency', 'integrated_gradients', 'occlusion', 'rollout']
>>> A.available("audio")
['gradient', 'perturbation', 'encoder_perturbation']
>>> A.spec("rollout", layout=layout, target="predicted")          # doctest: +SKIP
>>> A.compute("saliency", forward=f, pixel_values=px, targets=t,   # doctest: +SKIP
...           attentions=maps, layout=layout)                       # float32 [batch, h, w]

One method per module; each registers one :class:`AttributionMethod` entry (name, resolution,
description, needs_grad, function, default parameters). Adding a method is one new module imported
below. The gradient and perturbation methods use captum; torch and captum are imported only when a
method runs, so listing methods stays cheap. Definitions: ``docs/attributions.md``.
"""

from __future__ import annotations

from extractor.attributions.base import (
    RESOLUTIONS,
    TARGETS,
    AttributionMethod,
    available,
    compute,
    get,
    register,
    spec,
)

# Registration order is the order of available() (and of the CLI choices).
from extractor.attributions import saliency as _saliency  # noqa: E402,F401  isort:skip
from extractor.attributions import integrated_gradients as _integrated_gradients  # noqa: E402,F401  isort:skip
from extractor.attributions import occlusion as _occlusion  # noqa: E402,F401  isort:skip
from extractor.attributions import rollout as _rollout  # noqa: E402,F401  isort:skip
# audio (speech-to-text) methods
from extractor.attributions import gradient as _gradient  # noqa: E402,F401  isort:skip
from extractor.attributions import spectrogram_perturbation as _perturbation  # noqa: E402,F401  isort:skip
from extractor.attributions import encoder_perturbation as _encoder_perturbation  # noqa: E402,F401  isort:skip

__all__ = ["AttributionMethod", "RESOLUTIONS", "TARGETS", "available", "compute", "get", "register", "spec"]
