"""Device and dtype choices for the forward pass (``--device``, ``--dtype``)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from attnviz.errors import InputError

__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype", "autocast"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when available, else cpu; ``cuda`` without CUDA is an InputError."""
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward, or None for plain float32.

    Reduced precision runs the matrix products in float16/bfloat16 under ``torch.autocast`` (the model
    keeps float32 weights; softmax, and so the attention maps, stay float32). It is a GPU option.
    """
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if name == "float32":
        return None
    if device.type != "cuda":
        raise InputError(f"--dtype {name} is for the GPU forward; on the CPU use --dtype float32")
    return DTYPES[name]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for reduced precision, nothing for float32."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
