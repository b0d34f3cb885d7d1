"""Adding derived results to a recording: head metrics and cached analyses.

An analysis is cached at ``analyses/<name>`` with the parameters that made it stored as the JSON
attribute ``params``; :func:`load_analysis` returns it only when the parameters are equal, so a
change of parameters means a recomputation, never a stale result.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from attnviz.errors import RecordingError
from attnviz.store import schema as S
from attnviz.store.reader import Recording

__all__ = ["write_head_metric", "save_analysis", "load_analysis", "open_for_update"]


def open_for_update(path: str | os.PathLike) -> h5py.File:
    """Open a complete recording for adding derived results (validated first)."""
    with Recording(path) as rec:
        if not rec.complete:
            raise RecordingError(f"{path}: the recording is incomplete; finish it with `attnviz extract --resume` first")
    try:
        return h5py.File(path, "r+", locking=False)
    except OSError as e:
        raise RecordingError(f"{path}: cannot be opened for writing ({str(e).splitlines()[0]})") from None


def write_head_metric(target: str | os.PathLike | h5py.File, info: S.HeadMetricInfo, values: np.ndarray) -> None:
    """Store one per-head metric ``head_metrics/<name>``, float32 ``[n_layers, n_heads]`` (replaces it)."""
    values = np.asarray(values, np.float32)
    if values.ndim != 2:
        raise ValueError(f"a head metric is [n_layers, n_heads], got shape {values.shape}")
    with _file(target) as f:
        key = f"{S.G_HEAD_METRICS}/{info.name}"
        if key in f:
            del f[key]
        ds = f.create_dataset(key, data=values)
        ds.attrs["kind"] = info.kind
        ds.attrs["definition"] = info.definition
        ds.attrs["citation"] = info.citation
        ds.attrs["units"] = info.units
        ds.attrs["higher_is_more_important"] = info.higher_is_more_important
        ds.attrs["params"] = S.dumps(info.params)


def save_analysis(target: str | os.PathLike | h5py.File, name: str, params: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> None:
    """Replace ``analyses/<name>`` with ``arrays`` (name -> array; nested names with '/' allowed)."""
    with _file(target) as f:
        key = f"{S.G_ANALYSES}/{name}"
        if key in f:
            del f[key]
        g = f.create_group(key)
        g.attrs["params"] = S.dumps(dict(params))
        g.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for k, v in (attrs or {}).items():
            g.attrs[k] = v if isinstance(v, (str, int, float, bool, np.generic)) else S.dumps(v)
        for k, v in arrays.items():
            arr = np.asarray(v)
            if arr.dtype.kind in "US" or arr.dtype == object:
                g.create_dataset(k, data=arr.astype(object), dtype=h5py.string_dtype())
            else:
                g.create_dataset(k, data=arr, compression="lzf" if arr.size > 1024 else None)


def load_analysis(rec: Recording, name: str, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``analyses/<name>`` if made with exactly ``params``, else None."""
    g = rec.analysis_group(name)
    if g is None or g.attrs.get("params") != S.dumps(dict(params)):
        return None
    out: dict[str, np.ndarray] = {}

    def visit(k: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            v = obj[()]
            if obj.dtype.kind == "O":
                v = np.array([x.decode() if isinstance(x, bytes) else x for x in np.atleast_1d(v)])
            out[k] = v

    g.visititems(visit)
    return out


class _file:
    """Use an open h5py.File as is, or open a path for update and close it after."""

    def __init__(self, target: str | os.PathLike | h5py.File) -> None:
        self._given = isinstance(target, h5py.File)
        self._target = target

    def __enter__(self) -> h5py.File:
        if self._given:
            return self._target  # type: ignore[return-value]
        self._f = open_for_update(Path(self._target))  # type: ignore[arg-type]
        return self._f

    def __exit__(self, *exc: object) -> None:
        if not self._given:
            self._f.close()
