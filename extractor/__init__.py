"""The model side of attnviz: adapters per model family, inputs, attributions, hooks, extraction.

Everything here writes through :mod:`attnviz.store`; nothing in :mod:`attnviz` imports this package
except the ``attnviz extract`` command (lazily). Importing ``extractor`` itself stays light (no torch):
the public names below are loaded on first use.

>>> from extractor import ExtractOptions, extract               # doctest: +SKIP
>>> extract(ExtractOptions(model="models/vit", input="images/", out="run.h5"))
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ExtractOptions",
    "ExtractResult",
    "DryRunEstimate",
    "extract",
    "get_adapter",
    "detect",
    "available_adapters",
    "load_model",
]

_LAZY = {
    "ExtractOptions": "extractor.pipeline",
    "ExtractResult": "extractor.pipeline",
    "DryRunEstimate": "extractor.pipeline",
    "extract": "extractor.pipeline",
    "get_adapter": "extractor.adapters",
    "detect": "extractor.adapters",
    "available_adapters": "extractor.adapters",
    "load_model": "extractor.adapters",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")
