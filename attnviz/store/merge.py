"""Shards of one recording joined into one: ``attnviz merge OUT SHARD...`` (and the end of a ``torchrun``
extraction).

``attnviz extract`` under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) gives rank r of w the r-th contiguous
slice of the inputs and writes a complete recording of it, ``<out>.shard<r>-of-<w>.h5``, with the root
attributes ``shard_index``, ``shard_count`` and ``shard_offset`` (its first sample's index in the whole).
Merging lays the shards end to end along the sample axis:

* **virtual** (default): every per-sample dataset of the merged file is an HDF5 virtual dataset whose
  rows map onto the shards' rows (nothing is copied; the shards must stay beside the merged file — their
  paths are stored relative to it — and reading one map reads one chunk of one shard);
* **copy** (``--copy``): the rows are copied into ordinary datasets with the shards' chunking and filters,
  one chunk-aligned block at a time (bounded memory); the shards can then be deleted.

Everything else is taken from the first shard (model, class names, stack layouts), after checking that
every shard has the same model (fingerprint), stacks, classes and per-sample shapes. The per-head
statistics (entropy, confidence, CLS attention) are merged exactly — each is a mean over query positions,
so the merged one weighs the shards by their query counts; other head metrics and cached analyses are
left out (they depend on all samples: run ``attnviz analyze`` / ``attnviz importance`` on the merged file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from attnviz.errors import InputError, RecordingError
from attnviz.store import schema as S
from attnviz.store.reader import Recording

__all__ = ["shard_path", "merge_shards", "ATTR_SHARD_INDEX", "ATTR_SHARD_COUNT", "ATTR_SHARD_OFFSET"]

ATTR_SHARD_INDEX = S.ATTR_SHARD_INDEX
ATTR_SHARD_COUNT = S.ATTR_SHARD_COUNT
ATTR_SHARD_OFFSET = S.ATTR_SHARD_OFFSET
_MERGEABLE_STATS = ("entropy", "confidence", "cls_attention")
_STR = h5py.string_dtype()


def shard_path(out: str | os.PathLike, index: int, count: int) -> Path:
    """``run.h5`` -> ``run.shard000-of-002.h5``: where rank ``index`` of ``count`` writes."""
    out = Path(out)
    width = max(3, len(str(count)))
    return out.with_name(f"{out.stem}.shard{index:0{width}d}-of-{count:0{width}d}{out.suffix or '.h5'}")


def _per_sample_paths(f: h5py.File) -> list[str]:
    """Every dataset of a recording with one row per sample (not analyses, not head metrics)."""
    n = int(f.attrs[S.ATTR_N_SAMPLES])
    out: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith((S.G_ANALYSES, S.G_HEAD_METRICS, "inputs/")) \
                and name != S.D_CLASS_NAMES and obj.shape and obj.shape[0] == n:
            out.append(name)

    f.visititems(visit)
    return sorted(out)


def _check(shards: list[Recording]) -> None:
    first = shards[0]
    for rec in shards:
        if not rec.complete:
            raise InputError(f"{rec.path}: the shard is incomplete; finish it with `attnviz extract --resume` first")
    for rec in shards[1:]:
        what = None
        if rec.family != first.family or rec.model_class != first.model_class:
            what = f"a {rec.family} {rec.model_class}, the first shard a {first.family} {first.model_class}"
        elif rec.model_fingerprint != first.model_fingerprint:
            what = "another model (its fingerprint differs)"
        elif rec.kinds() != first.kinds() or any(rec.layout(k) != first.layout(k) or rec.stack_shape(k) !=
                                                 first.stack_shape(k) for k in rec.kinds()):
            what = "other attention stacks"
        elif rec.class_names() != first.class_names():
            what = "other class names"
        elif rec.attribution_methods() != first.attribution_methods():
            what = "other attributions"
        if what:
            raise InputError(f"{rec.path} cannot be merged with {first.path.name}: it holds {what}")
    ids = [i for rec in shards for i in rec.sample_ids()]
    if len(set(ids)) != len(ids):
        raise InputError("the shards share samples (the same id in two shards); merge the shards of one run")


def merge_shards(out: str | os.PathLike, shards: Sequence[str | os.PathLike], *, copy: bool = False,
                 overwrite: bool = False, block_bytes: int = 64 << 20) -> Path:
    """Join complete shard recordings into ``out`` (see the module docstring).

    Args:
        out: the merged recording to write.
        shards: shard files, in any order (ordered by their ``shard_index``, else as given).
        copy: copy the data instead of virtual datasets.
        overwrite: replace an existing ``out``.

    Raises:
        InputError: fewer than one shard, a missing shard, shards of different runs, ``out`` exists.
        RecordingError: a shard cannot be read.
    """
    out = Path(out)
    paths = [Path(p) for p in shards]
    if not paths:
        raise InputError("give the shard files to merge")
    for p in paths:
        if not p.is_file():
            raise InputError(f"shard {p} does not exist")
        if p.resolve() == out.resolve():
            raise InputError(f"{out} is one of the shards; choose another output")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it or choose another output")
    recs = [Recording(p) for p in paths]
    try:
        recs.sort(key=lambda r: int(r.h5.attrs.get(ATTR_SHARD_INDEX, 0)))
        _check(recs)
        part = out.with_name(out.name + S.PARTIAL_SUFFIX)
        part.unlink(missing_ok=True)
        try:
            with h5py.File(part, "w", libver=(S.HDF5_LIBVER_LOW, "latest")) as f:
                _write_merged(f, recs, out, copy=copy, block_bytes=block_bytes)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    finally:
        for r in recs:
            r.close()
    if out.exists():
        out.unlink()
    os.replace(part, out)
    with Recording(out) as rec:  # the merged file must read like any other
        if rec.n_samples != sum(_n(p) for p in paths):
            raise RecordingError(f"{out}: the merged file has {rec.n_samples} samples, not the shards' total")
    return out


def _n(path: Path) -> int:
    with h5py.File(path, "r", locking=False) as f:
        return int(f.attrs[S.ATTR_N_SAMPLES])


def _write_merged(f: h5py.File, recs: list[Recording], out: Path, *, copy: bool, block_bytes: int) -> None:
    first = recs[0].h5
    sizes = [int(r.h5.attrs[S.ATTR_N_SAMPLES]) for r in recs]
    total = sum(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    # root attributes: the first shard's, for the whole
    for k, v in first.attrs.items():
        if k not in (ATTR_SHARD_INDEX, ATTR_SHARD_COUNT, ATTR_SHARD_OFFSET):
            f.attrs[k] = v
    f.attrs[S.ATTR_N_SAMPLES] = total
    f.attrs[S.ATTR_COMPLETE] = True
    f.attrs[S.ATTR_CREATED] = S.timestamp()
    params = S.loads(first.attrs.get(S.ATTR_PARAMS, "{}"))
    params["merged_from"] = [r.path.name for r in recs]
    params["merge"] = "copy" if copy else "virtual"
    f.attrs[S.ATTR_PARAMS] = S.dumps(params)
    sources = {"label": 0, "prediction": 0}
    for r in recs:
        sources[r.target_source] = sources.get(r.target_source, 0) + 1
    f.attrs[S.ATTR_TARGET_SOURCE] = "label" if sources["label"] else "prediction"
    # groups and their attributes (stacks' layouts, model config, attribution descriptions)
    first.copy(first[S.G_MODEL], f, name=S.G_MODEL)
    if "inputs" in first:
        first.copy(first["inputs"], f, name="inputs")  # every rank checked the same inputs: one list

    def ensure_group(name: str, src: Any) -> None:
        g = f.require_group(name)
        for k, v in src.attrs.items():
            g.attrs[k] = v

    for name in _per_sample_paths(first):
        parent = name.rsplit("/", 1)[0]
        ensure_group(parent, first[parent])
        src = first[name]
        shape = (total, *src.shape[1:])
        if copy:
            d = f.create_dataset(name, shape=shape, dtype=src.dtype, chunks=src.chunks, compression=src.compression,
                                 compression_opts=src.compression_opts, shuffle=src.shuffle)
            row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
            step = max(1, block_bytes // row_bytes)
            for r, off, n in zip(recs, offsets, sizes):
                ds = r.h5[name]
                for i in range(0, n, step):
                    d[off + i: off + min(n, i + step)] = ds[i: min(n, i + step)]
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype=src.dtype)
            for r, off, n in zip(recs, offsets, sizes):
                rel = os.path.relpath(r.path.resolve(), out.resolve().parent)
                layout[off: off + n] = h5py.VirtualSource(rel, name, shape=(n, *src.shape[1:]), dtype=src.dtype)
            fill = "" if src.dtype.kind == "O" else 0
            d = f.create_virtual_dataset(name, layout, fillvalue=fill if src.dtype.kind != "O" else None)
        for k, v in src.attrs.items():
            d.attrs[k] = v
    _merge_head_stats(f, recs)


def _merge_head_stats(f: h5py.File, recs: list[Recording]) -> None:
    """Entropy, confidence, CLS attention of the whole: means over query positions, so the shards' means
    weighted by their query counts (the sum of the stored query lengths of their samples)."""
    first = recs[0]
    for name in _MERGEABLE_STATS:
        if not all(name in r.head_metrics() for r in recs):
            continue
        info = first.head_metric_info(name)
        kind = info.kind
        weights = np.array([float(r.h5[S.lengths_path(kind)][: r.n_samples, 0].sum()) for r in recs])
        if weights.sum() <= 0:
            continue
        values = sum(w * r.head_metric(name).astype(np.float64) for w, r in zip(weights, recs)) / weights.sum()
        d = f.create_dataset(f"{S.G_HEAD_METRICS}/{name}", data=values.astype(np.float32))
        src = first.h5[f"{S.G_HEAD_METRICS}/{name}"]
        for k, v in src.attrs.items():
            d.attrs[k] = v
        params = S.loads(src.attrs.get(S.ATTR_METRIC_PARAMS, "{}"))
        params.update(n_samples=int(sum(r.n_samples for r in recs)), merged_from=len(recs))
        d.attrs[S.ATTR_METRIC_PARAMS] = S.dumps(params)
