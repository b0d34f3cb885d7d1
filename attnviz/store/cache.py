"""Adding derived results to a recording: head metrics and cached analyses.

An analysis is cached at ``analyses/<name>`` with the parameters that made it stored as the JSON
attribute ``params``; :func:`load_analysis` returns it only when the parameters are equal, so a
change of parameters means a recomputation, never a stale result. ``params`` is written last, after
every array: a write that is interrupted leaves a group that never matches, never a half result.

Where to write (``target``): a path (the file is opened for update and closed again), an open
:class:`~attnviz.store.reader.Recording` (its read-only handle is reopened for update for the
duration of the write, so a reader that is open in this process does not block the update), or an
open, writable ``h5py.File`` (the extraction's writer).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from attnviz.errors import RecordingError
from attnviz.store import schema as S
from attnviz.store.reader import Recording

__all__ = ["write_head_metric", "save_analysis", "load_analysis", "open_for_update"]

def open_for_update(path: str | os.PathLike) -> h5py.File:
    """Open a complete recording for adding derived results (validated first).

    Raises:
        RecordingError: invalid or incomplete recording, or it cannot be opened for writing (read-only
            file, or open read-only elsewhere in this process: pass that Recording instead of the path).
    """
    with Recording(path) as rec:
        if not rec.complete:
            raise RecordingError(f"{path}: the recording is incomplete; finish it with `attnviz extract --resume` first")
    try:
        return h5py.File(path, "r+", locking=False, rdcc_nbytes=0)  # no chunk cache: see _check_space
    except OSError as e:
        why = str(e).splitlines()[0]
        hint = ("; it is open read-only in this process: pass the open Recording instead of the path"
                if "already open" in why else "")
        raise RecordingError(f"{path}: cannot be opened for writing ({why}){hint}") from None


def write_head_metric(target: str | os.PathLike | Recording | h5py.File, info: S.HeadMetricInfo,
                      values: np.ndarray) -> None:
    """Store one per-head metric ``head_metrics/<name>`` (replaces it).

    Args:
        target: where to write (see the module docstring).
        info: name, stack kind, definition, citation, units, direction and parameters.
        values: float ``[n_layers, n_heads]`` of the ``info.kind`` stack.

    Raises:
        ValueError: ``values`` does not have the shape of the stack, or the file has no such stack.
    """
    values = np.asarray(values, np.float32)
    with _file(target) as f:
        group = f"{S.G_ATTENTION}/{info.kind}"
        if group not in f:
            have = ", ".join(f[S.G_ATTENTION].keys()) if S.G_ATTENTION in f else "none"
            raise ValueError(f"head metric {info.name!r}: the recording has no {info.kind!r} attention ({have})")
        stack = (int(f[group].attrs[S.ATTR_STACK_N_LAYERS]), int(f[group].attrs[S.ATTR_STACK_N_HEADS]))
        if values.shape != stack:
            raise ValueError(f"head metric {info.name!r} has shape {values.shape}, the {info.kind!r} stack is "
                             f"[n_layers, n_heads] = {stack}")
        key = f"{S.G_HEAD_METRICS}/{info.name}"
        if key in f:
            del f[key]
        ds = f.create_dataset(key, data=values)
        ds.attrs[S.ATTR_METRIC_KIND] = info.kind
        ds.attrs[S.ATTR_METRIC_DEFINITION] = info.definition
        ds.attrs[S.ATTR_METRIC_CITATION] = info.citation
        ds.attrs[S.ATTR_METRIC_UNITS] = info.units
        ds.attrs[S.ATTR_METRIC_HIGHER] = bool(info.higher_is_more_important)
        ds.attrs[S.ATTR_METRIC_PARAMS] = S.dumps(info.params)


def save_analysis(target: str | os.PathLike | Recording | h5py.File, name: str, params: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> None:
    """Replace ``analyses/<name>`` with ``arrays``.

    Args:
        target: where to write (see the module docstring).
        name: the analysis, e.g. "spatial_profiles".
        params: JSON-able parameters that determine the result; stored as the ``params`` attribute.
        arrays: name -> array (numbers, bools or strings); nested names with '/' make subgroups.
        attrs: extra attributes of the group (scalars and strings as they are, anything else as JSON).
    """
    reserved = {S.ATTR_ANALYSIS_PARAMS, S.ATTR_ANALYSIS_CREATED} & set(attrs or {})
    if reserved:
        raise ValueError(f"attribute(s) {', '.join(sorted(reserved))} are set by save_analysis itself")
    params_json = S.dumps(dict(params))
    need = (256 << 10) + sum(_nbytes(v) for v in arrays.values())
    with _file(target) as f:
        _check_space(f, need)
        key = f"{S.G_ANALYSES}/{name}"
        if key in f:
            del f[key]
        g = f.create_group(key)
        try:
            for k, v in (attrs or {}).items():
                g.attrs[k] = v if isinstance(v, (str, int, float, bool, np.generic)) else S.dumps(v)
            for k, v in arrays.items():
                arr = np.asarray(v)
                if arr.dtype.kind in "US" or arr.dtype == object:
                    g.create_dataset(k, data=arr.astype(str).astype(object), dtype=h5py.string_dtype())
                else:
                    g.create_dataset(k, data=arr, compression="lzf" if arr.size > 1024 else None)
            g.attrs[S.ATTR_ANALYSIS_CREATED] = S.timestamp()
            # last: the commit mark that load_analysis matches on
            g.attrs[S.ATTR_ANALYSIS_PARAMS] = params_json
        except BaseException:
            del f[key]
            raise


def _nbytes(v: Any) -> int:
    try:
        a = np.asarray(v)
    except ValueError:  # ragged: refused below, where the group is written
        return 0
    return int(a.nbytes if a.dtype != object else 64 * a.size)


def _check_space(f: h5py.File, need: int) -> None:
    """Refuse to write a derived result the file system has no room for (see attnviz.store.writer: a
    write that fails for space inside HDF5 leaves a file that cannot be closed)."""
    import shutil

    from attnviz.errors import DiskFullError

    free = shutil.disk_usage(Path(f.filename).parent).free
    if free < need:
        raise DiskFullError(f"{f.filename}: no space left to store the result ({need / 2**20:.1f} MB needed, "
                            f"{free / 2**20:.1f} MB free); the recording is unchanged: free space and run again")


def load_analysis(rec: Recording, name: str, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``analyses/<name>`` if made with exactly ``params``, else None.

    Returns:
        name -> array as given to :func:`save_analysis` (strings come back as ``str`` arrays of the
        same shape), or None when nothing is cached or the parameters differ (recompute then).
    """
    g = rec.analysis_group(name)
    if g is None or S.ATTR_ANALYSIS_PARAMS not in g.attrs:
        return None
    if _text(g.attrs[S.ATTR_ANALYSIS_PARAMS]) != S.dumps(dict(params)):
        return None
    out: dict[str, np.ndarray] = {}

    def visit(k: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if obj.dtype.kind == "O" or h5py.check_string_dtype(obj.dtype) is not None:
                out[k] = np.asarray(obj.asstr()[()], dtype=str)
            else:
                out[k] = obj[()]

    g.visititems(visit)
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@contextmanager
def _file(target: str | os.PathLike | Recording | h5py.File) -> Iterator[h5py.File]:
    """An h5py.File open for writing: the given one, a Recording reopened for update, or a path."""
    if isinstance(target, h5py.File):
        if target.mode != "r+":
            raise RecordingError(f"{target.filename}: open read-only; cannot add results")
        yield target
    elif isinstance(target, Recording):
        with target._for_update() as f:
            yield f
    else:
        f = open_for_update(Path(target))
        try:
            yield f
        finally:
            f.close()
