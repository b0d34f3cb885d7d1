"""Adapters: one per model family, registered by name; architecture facts in one table.

>>> from extractor.adapters import load_model                  # doctest: +SKIP
>>> adapter = load_model("sample_data/models/shapes-vit")      # a VitAdapter
>>> adapter.stacks()[0].layout.prefix_names
('cls',)

Adding a family is one module that defines an :class:`Adapter` subclass decorated with
:func:`register_adapter` (and rows in :data:`ARCHITECTURES`), imported below.
"""

from __future__ import annotations

from extractor.adapters.base import (
    ARCHITECTURES,
    Adapter,
    ArchitectureSpec,
    BatchOutput,
    ModelSource,
    PreparedBatch,
    StackModules,
    architecture,
    available_adapters,
    detect,
    find_modules,
    get_adapter,
    load_config,
    load_model,
    register_adapter,
    resolve_model,
    supported_architectures,
)

# each import registers one adapter
from extractor.adapters import vit as _vit  # noqa: E402,F401  isort:skip
from extractor.adapters import lvlm as _lvlm  # noqa: E402,F401  isort:skip
from extractor.adapters import s2t as _s2t  # noqa: E402,F401  isort:skip

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "ArchitectureSpec",
    "BatchOutput",
    "ModelSource",
    "PreparedBatch",
    "StackModules",
    "architecture",
    "available_adapters",
    "detect",
    "find_modules",
    "get_adapter",
    "load_config",
    "load_model",
    "register_adapter",
    "resolve_model",
    "supported_architectures",
]
