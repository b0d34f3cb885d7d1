"""Writing a recording: temporary name, background writer thread, resume.

A recording is written to ``<out>.partial`` and renamed to ``<out>`` once every sample is done
(root attribute ``complete`` set to True just before). Samples are written in fixed batches
(``batch_size`` is stored in the file), and ``samples/done`` is set for a batch only after its data
is written and flushed, so an interrupted run leaves a partial file whose done samples are exact;
:meth:`RecordingWriter.resume` reopens it and the extractor recomputes only the batches not done,
with the same batch boundaries, which makes the resumed file equal to an uninterrupted run.

Compression happens in a background thread (``queue`` of depth 2: bounded memory), so the model
does not wait for HDF5.

The file is written in HDF5's single-writer/multiple-reader (SWMR) mode once its layout is allocated, so
readers (:func:`attnviz.open` opens with ``swmr=True``) may open it at any time, also while ``--resume``
appends, and see a consistent prefix of done samples (tested with a reader process polling a writer).

A full disk must never reach HDF5: once a write fails for lack of space the library can neither flush
nor close the file, and the process dies with a segmentation fault when it exits (measured: h5py 3.16,
HDF5 2.0, on a full tmpfs). So the writer (1) checks the free space before every batch against the
batch's size and stops with :class:`~attnviz.errors.DiskFullError` before writing anything, and (2)
keeps a *reserve* file ``<out>.partial.reserve`` (allocated blocks, a few batches large) beside the
output: if a write still fails for space (another process filled the disk meanwhile), it deletes the
reserve, which lets HDF5 flush and close the file cleanly. The file is opened without a chunk cache
(``rdcc_nbytes=0``: every chunk is written whole, so a cache gains nothing), so a chunk's bytes reach the
disk inside the write call that can report the failure, never later in a dataset's destructor, where
h5py can only print the error and the file is left unclosable. Either way the finished batches stay on
disk, done-flagged, and ``--resume`` after freeing space completes the recording.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from attnviz.errors import DiskFullError, InputError, RecordingError
from attnviz.store import schema as S

__all__ = ["RecordingWriter", "SampleBatch", "partial_path", "reserve_path", "check_output_path"]

#: bytes kept free as the reserve file: this many times the largest batch, within these bounds
RESERVE_BATCHES = 2
RESERVE_MIN = 512 << 10
RESERVE_MAX = 256 << 20
#: extra room a batch needs besides its data (chunk index and metadata updates)
BATCH_OVERHEAD = 256 << 10

_STR = h5py.string_dtype()


def partial_path(out: str | os.PathLike) -> Path:
    """The temporary name a recording is written under until it is complete."""
    out = Path(out)
    return out.with_name(out.name + S.PARTIAL_SUFFIX)


def reserve_path(out: str | os.PathLike) -> Path:
    """The reserve file kept beside ``<out>.partial`` while it is written (see the module docstring)."""
    return partial_path(out).with_name(partial_path(out).name + ".reserve")


def _is_disk_full(e: BaseException) -> bool:
    """An OSError/RuntimeError from the OS or HDF5 that says the device has no space (or quota) left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                      probe: bool = True) -> None:
    """Refuse to clobber: an existing output needs ``--overwrite`` (or ``--resume`` for a partial one).

    ``probe`` checks that the directory is writable by creating and deleting a file (``os.access`` says yes to
    root everywhere); a dry run, which must write nothing, asks ``os.access`` only.

    Raises:
        InputError: the output exists and neither flag allows it, or its directory is not writable.
    """
    out = Path(out)
    part = partial_path(out)
    if overwrite and resume:
        raise InputError("--overwrite and --resume cannot be used together")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    if out.is_dir():
        raise InputError(f"{out} is a directory; --out must name a file such as run.h5")
    if probe:
        _probe_writable(parent)
    elif not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable")
    if resume:
        if out.exists() and not part.exists():
            raise InputError(f"{out} is already complete: nothing to resume (use --overwrite to record again)")
        if not part.exists():
            raise InputError(f"nothing to resume: {part} does not exist")
        return
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it or choose another --out")
    if part.exists() and not overwrite:
        raise InputError(f"{part} exists (an interrupted run): pass --resume to continue it or --overwrite to start again")


def _probe_writable(directory: Path) -> None:
    """Create and delete a file: ``os.access`` says yes to root even on read-only directories."""
    try:
        fd, name = tempfile.mkstemp(prefix=".attnviz-probe-", dir=directory)
    except OSError as e:
        raise InputError(f"output directory {directory} is not writable ({e.strerror or _short(e)})") from None
    os.close(fd)
    os.unlink(name)


@dataclass
class SampleBatch:
    """One batch of results for consecutive samples ``start .. start+B-1``.

    Attributes:
        start: index of the first sample of the batch.
        attention: kind -> float array ``[batch, layer, head, query_pos, key_pos]`` (cast to float16).
        lengths: kind -> int array ``[batch, 2]`` of valid (query_len, key_len); a kind left out gets the
            size of the maps given for every sample of the batch (maps may be smaller than the file's
            maximum: they are padded with zeros).
        predictions: int ``[batch]``; logits: float ``[batch, n_classes]``.
        labels: int ``[batch]`` (-1 = unknown) or None to keep what the writer was created with.
        thumbnails: uint8 ``[batch, h, w, 3]`` or None; masks: uint8 ``[batch, h, w]`` or None.
        attributions: name -> float ``[batch, *shape]``.
        meta: per-sample JSON-able dicts, or None.
        qk: kind -> (positions int ``[batch, qk_token]`` (-1 = none), queries and keys float
            ``[batch, layer, head, qk_token, head_dim]``) for stacks created with ``qk_tokens``.
        per_sample: name -> array ``[batch, *shape]`` of the per-sample arrays declared at creation
            (trailing axes may be shorter: zero-padded).
        rows: kind -> (positions int ``[batch, row]`` (-1 = none), rows float ``[batch, layer, head, row, key_pos]``)
            for a ``store="rows"`` file (whose ``attention`` is then empty: the file has no maps).
    """

    start: int
    attention: dict[str, np.ndarray]
    predictions: np.ndarray
    logits: np.ndarray
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    thumbnails: np.ndarray | None = None
    masks: np.ndarray | None = None
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    meta: list[dict[str, Any]] | None = None
    qk: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(len(self.predictions))


class RecordingWriter:
    """Writes one recording. Use :meth:`create` or :meth:`resume`, then :meth:`write` batches,
    then :meth:`finish`. As a context manager, leaving with an exception flushes what was written
    and leaves the ``.partial`` file for ``--resume``.
    """

    def __init__(self, out: Path, h5: h5py.File, *, background: bool = True, in_memory: bool = False) -> None:
        self.out = Path(out)
        self.partial = partial_path(out)
        self._f = h5
        self.batch_size = int(h5.attrs[S.ATTR_BATCH_SIZE])
        self.n_samples = int(h5.attrs[S.ATTR_N_SAMPLES])
        # per-sample shapes, read once so that write() checks a batch in the caller's thread
        self.store = _str(h5.attrs.get(S.ATTR_STORE, S.STORE_FULL))
        self._maps_shape = {kind: tuple(h5[S.maps_path(kind)].shape[1:]) for kind in h5[S.G_ATTENTION]
                            if S.maps_path(kind) in h5}
        self._rows_shape = {kind: tuple(h5[S.rows_path(kind)].shape[1:]) for kind in h5[S.G_ATTENTION]
                            if S.rows_path(kind) in h5}
        self._kinds = tuple(h5[S.G_ATTENTION])
        self._per_sample_shape = {name: tuple(ds.shape[1:]) for name, ds in h5[S.G_PER_SAMPLE].items()} \
            if S.G_PER_SAMPLE in h5 else {}
        self._qk_shape = {kind: tuple(h5[S.qk_path(kind, S.QUERIES)].shape[1:]) for kind in h5[S.G_ATTENTION]
                          if S.qk_path(kind, S.QUERIES) in h5}
        self._attr_shape = {name: tuple(ds.shape[1:]) for name, ds in h5[S.G_ATTRIBUTIONS].items()} \
            if S.G_ATTRIBUTIONS in h5 else {}
        self._n_classes = int(h5[S.D_LOGITS].shape[1])
        self._thumb_shape = tuple(h5[S.D_THUMBNAIL].shape[1:]) if S.D_THUMBNAIL in h5 else None
        self._mask_shape = tuple(h5[S.D_MASK].shape[1:]) if S.D_MASK in h5 else None
        self._error: BaseException | None = None
        self._sample_bytes = _per_sample_bytes(h5)
        self._reserve = reserve_path(out)
        self._reserve_bytes = int(min(RESERVE_MAX, max(RESERVE_MIN, RESERVE_BATCHES * self.batch_size * self._sample_bytes)))
        self._broken = False  # a write failed for space: nothing more may be written
        self._in_memory = in_memory  # estimate_size: a file laid out in memory, nothing on disk
        if not in_memory:
            self._make_reserve()
            # single-writer/multiple-reader mode: a dashboard (or `attnviz info`) reading the file while it is
            # written, or resumed, sees a consistent prefix of done samples (readers open it with swmr=True)
            h5.flush()
            h5.swmr_mode = True
        self._queue: queue.Queue[SampleBatch | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(target=self._run, name="attnviz-writer", daemon=True)
            self._thread.start()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        out: str | os.PathLike,
        *,
        family: str,
        model_name: str,
        model_class: str,
        sample_ids: Sequence[str],
        stacks: Sequence[S.StackSpec],
        class_names: Sequence[str],
        labels: Sequence[int] | np.ndarray | None = None,
        thumbnail_shape: tuple[int, int] | None = None,
        mask_shape: tuple[int, int] | None = None,
        attributions: Sequence[S.AttributionSpec] = (),
        batch_size: int = 8,
        compression: str = "lzf",
        model_config: dict[str, Any] | None = None,
        extraction_params: dict[str, Any] | None = None,
        target_source: str = "label",
        skipped: Sequence[tuple[str, str]] = (),
        with_meta: bool = False,
        per_sample: Sequence[S.PerSampleSpec] = (),
        model_fingerprint: dict[str, Any] | None = None,
        shard: tuple[int, int, int] | None = None,
        store: str = "full",
        overwrite: bool = False,
        background: bool = True,
    ) -> RecordingWriter:
        """Create ``<out>.partial`` with every dataset allocated for ``len(sample_ids)`` samples.

        Args:
            out: final path of the recording (``.h5``).
            family: "vit" | "s2t" | "lvlm".
            stacks: one :class:`~attnviz.store.schema.StackSpec` per attention kind recorded.
            labels: int ``[n_samples]``, -1 where unknown; None = no labels.
            compression: "lzf" (default, fast), "gzip" or "none".
            target_source: "label" or "prediction": what accuracy-type metrics treat as the truth.
            with_meta: allocate ``samples/meta`` (one JSON object per sample).
            per_sample: further per-sample arrays (``per_sample/<name>``).
            model_fingerprint: what identifies the model (``extractor.loading.model_fingerprint``).
            shard: (index, count, offset) when this file is one shard of a distributed run.
            store: "full" (every map), "rows" (``StackSpec.rows`` query rows of every map: datasets ``rows`` and
                ``row_positions``) or "summary" (no maps: only ``lengths`` per stack).
        """
        # everything is checked before the file exists: a refused call leaves nothing behind
        if family not in S.FAMILIES:
            raise InputError(f"unknown family {family!r}; known: {', '.join(S.FAMILIES)}")
        n = len(sample_ids)
        if n == 0:
            raise InputError("no samples to record")
        if int(batch_size) < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        comp = _compression(compression)
        if store not in S.STORE_MODES:
            raise InputError(f"unknown store mode {store!r}; choose one of {', '.join(S.STORE_MODES)}")
        kinds = [st.kind for st in stacks]
        unknown = [k for k in kinds if k not in S.FAMILY_KINDS[family]]
        if unknown:
            raise InputError(f"a {family} recording has no {unknown[0]!r} attention; "
                             f"its kinds are {', '.join(S.FAMILY_KINDS[family])}")
        if len(set(kinds)) != len(kinds):
            raise InputError(f"attention kinds given twice: {kinds}")
        main = S.MAIN_KIND[family]
        main_stack = next((st for st in stacks if st.kind == main), None)
        if main_stack is None:
            raise InputError(f"a {family} recording needs the {main!r} attention stack")
        for st in stacks:
            if min(st.n_layers, st.n_heads, st.max_query, st.max_key) < 1:
                raise InputError(f"attention stack {st.kind!r} has an empty dimension: {st}")
            if st.qk_tokens and (st.head_dim < 1 or st.qk_tokens > max(st.max_query, st.max_key)
                                 or not 0 < st.qk_fraction <= 1):
                raise InputError(f"attention stack {st.kind!r}: query/key storage needs head_dim >= 1, "
                                 f"qk_tokens <= the sequence length and 0 < qk_fraction <= 1: {st}")
            if store == S.STORE_ROWS and not 1 <= st.rows <= st.max_query:
                raise InputError(f"attention stack {st.kind!r}: --store rows needs 1 <= rows <= {st.max_query} "
                                 f"query rows per sample, got {st.rows}")
        if target_source not in S.TARGET_SOURCES:
            raise InputError(f"target_source must be one of {', '.join(S.TARGET_SOURCES)}, got {target_source!r}")
        import re

        for ps in per_sample:
            if not re.fullmatch(r"[a-z0-9_]+", ps.name) or not ps.shape or min(ps.shape) < 1:
                raise InputError(f"per-sample array {ps.name!r}: a lowercase name and a non-empty shape, got {ps}")
            if ps.axes and len(ps.axes) != len(ps.shape):
                raise InputError(f"per-sample array {ps.name!r}: {len(ps.axes)} axis names for {len(ps.shape)} axes")
        for spec in attributions:
            if spec.resolution not in S.RESOLUTIONS:
                raise InputError(f"attribution {spec.name!r}: resolution must be one of {', '.join(S.RESOLUTIONS)}")
            if spec.dtype not in ("float32", "float16"):
                raise InputError(f"attribution {spec.name!r}: dtype must be float32 or float16, got {spec.dtype!r}")
        if family in S.THUMBNAIL_FAMILIES and thumbnail_shape is None:
            raise InputError(f"a {family} recording needs thumbnails (thumbnail_shape)")
        lab = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        if lab.shape != (n,):
            raise InputError(f"labels have shape {lab.shape}, expected ({n},)")
        out = Path(out)
        part = partial_path(out)
        if part.exists():
            if not overwrite:
                raise InputError(f"{part} exists: pass --resume or --overwrite")
            part.unlink()
        try:
            # low bound v110: readable by any HDF5 >= 1.10, not only by the HDF5 that wrote it
            f = h5py.File(part, "w", libver=(S.HDF5_LIBVER_LOW, "latest"), rdcc_nbytes=0)
        except OSError as e:  # unwritable directory and the like
            raise InputError(f"cannot write {part}: {_short(e)}") from None
        try:
            cls._allocate(f, family=family, model_name=model_name, model_class=model_class, sample_ids=sample_ids,
                          stacks=stacks, main_stack=main_stack, class_names=class_names, labels=lab,
                          thumbnail_shape=thumbnail_shape, mask_shape=mask_shape, attributions=attributions,
                          batch_size=batch_size, comp=comp, model_config=model_config,
                          extraction_params=extraction_params, target_source=target_source, skipped=skipped,
                          with_meta=with_meta, per_sample=per_sample, store=store)
            if model_fingerprint is not None:
                f.attrs[S.ATTR_MODEL_FINGERPRINT] = S.dumps(model_fingerprint)
            if shard is not None:
                f.attrs[S.ATTR_SHARD_INDEX], f.attrs[S.ATTR_SHARD_COUNT], f.attrs[S.ATTR_SHARD_OFFSET] = \
                    (int(v) for v in shard)
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise
        try:
            return cls(out, f, background=background)
        except BaseException:  # e.g. no room for the reserve: nothing was recorded yet
            f.close()
            part.unlink(missing_ok=True)
            raise

    @staticmethod
    def _allocate(f: h5py.File, *, family: str, model_name: str, model_class: str, sample_ids: Sequence[str],
                  stacks: Sequence[S.StackSpec], main_stack: S.StackSpec, class_names: Sequence[str],
                  labels: np.ndarray, thumbnail_shape: tuple[int, int] | None, mask_shape: tuple[int, int] | None,
                  attributions: Sequence[S.AttributionSpec], batch_size: int, comp: dict[str, Any],
                  model_config: dict[str, Any] | None, extraction_params: dict[str, Any] | None,
                  target_source: str, skipped: Sequence[tuple[str, str]], with_meta: bool,
                  per_sample: Sequence[S.PerSampleSpec] = (), store: str = S.STORE_FULL) -> None:
        n = len(sample_ids)
        main = main_stack.kind
        a = f.attrs
        a[S.ATTR_FORMAT] = S.FORMAT_NAME
        a[S.ATTR_VERSION] = S.FORMAT_VERSION
        a[S.ATTR_FAMILY] = family
        a[S.ATTR_MODEL_NAME] = model_name
        a[S.ATTR_MODEL_CLASS] = model_class
        a[S.ATTR_CREATED] = S.timestamp()
        a[S.ATTR_COMPLETE] = False
        a[S.ATTR_N_SAMPLES] = n
        a[S.ATTR_N_LAYERS] = main_stack.n_layers
        a[S.ATTR_N_HEADS] = main_stack.n_heads
        a[S.ATTR_MAIN_KIND] = main
        a[S.ATTR_BATCH_SIZE] = int(batch_size)
        a[S.ATTR_PARAMS] = S.dumps(extraction_params or {})
        a[S.ATTR_TARGET_SOURCE] = target_source
        a[S.ATTR_STORE] = store
        from attnviz import __version__

        a[S.ATTR_PRODUCER] = f"attnviz {__version__}"

        f.create_dataset(S.D_ID, data=np.array(list(sample_ids), dtype=object), dtype=_STR)
        f.create_dataset(S.D_DONE, shape=(n,), dtype=bool, fillvalue=False)
        f.create_dataset(S.D_LABEL, data=labels)
        f.create_dataset(S.D_PREDICTION, shape=(n,), dtype=np.int32, fillvalue=-1)
        n_classes = max(len(class_names), 1)
        # at most ~1 MB of logits per chunk (a language model has tens of thousands of classes)
        rows = max(1, min(n, 256, (1 << 20) // (4 * n_classes)))
        f.create_dataset(S.D_LOGITS, shape=(n, n_classes), dtype=np.float32, chunks=(rows, n_classes))
        f.create_dataset(S.D_CLASS_NAMES, data=np.array(list(class_names), dtype=object), dtype=_STR)
        f[S.G_MODEL].attrs[S.ATTR_MODEL_CONFIG] = S.dumps(model_config or {})
        if thumbnail_shape is not None:
            th, tw = thumbnail_shape
            f.create_dataset(S.D_THUMBNAIL, shape=(n, th, tw, 3), dtype=np.uint8,
                             chunks=(1, th, tw, 3), **comp)
        if mask_shape is not None:
            mh, mw = mask_shape
            f.create_dataset(S.D_MASK, shape=(n, mh, mw), dtype=np.uint8, chunks=(1, mh, mw), **comp)
        if with_meta:
            f.create_dataset(S.D_META, shape=(n,), dtype=_STR)
        for ps in per_sample:
            d = f.create_dataset(f"{S.G_PER_SAMPLE}/{ps.name}", shape=(n, *ps.shape), dtype=np.dtype(ps.dtype),
                                 chunks=(1, *ps.shape), **comp)
            d.attrs[S.ATTR_DESCRIPTION] = ps.description
            d.attrs[S.ATTR_AXES] = S.dumps(list(ps.axes))
        for st in stacks:
            g = f.create_group(f"{S.G_ATTENTION}/{st.kind}")
            g.attrs[S.ATTR_STACK_N_LAYERS] = st.n_layers
            g.attrs[S.ATTR_STACK_N_HEADS] = st.n_heads
            g.attrs[S.ATTR_LAYOUT] = st.layout.to_json()
            if store == S.STORE_FULL:
                # one (sample, layer, head) map per chunk: a head is read alone
                g.create_dataset(S.MAPS, shape=(n, st.n_layers, st.n_heads, st.max_query, st.max_key),
                                 dtype=np.float16, chunks=(1, 1, 1, st.max_query, st.max_key), **comp)
            else:
                g.attrs[S.ATTR_MAX_LENGTHS] = np.array([st.max_query, st.max_key], np.int64)
            if store == S.STORE_ROWS:  # one (sample, layer, head) block of rows per chunk, like the maps
                r = int(st.rows)
                g.create_dataset(S.ROWS, shape=(n, st.n_layers, st.n_heads, r, st.max_key), dtype=np.float16,
                                 chunks=(1, 1, 1, r, st.max_key), **comp)
                g.create_dataset(S.ROW_POSITIONS, shape=(n, r), dtype=np.int32, fillvalue=-1)
            g.create_dataset(S.LENGTHS, data=np.tile(np.array([[st.max_query, st.max_key]], np.int32), (n, 1)))
            if st.qk_tokens:
                t, d = int(st.qk_tokens), int(st.head_dim)
                g.attrs[S.ATTR_QK_FRACTION] = float(st.qk_fraction)
                for what in (S.QUERIES, S.KEYS):  # one (sample, layer, head) per chunk, like the maps
                    g.create_dataset(what, shape=(n, st.n_layers, st.n_heads, t, d), dtype=np.float16,
                                     chunks=(1, 1, 1, t, d), **comp)
                g.create_dataset(S.QK_POSITIONS, shape=(n, t), dtype=np.int32, fillvalue=-1)
        for spec in attributions:
            d = f.create_dataset(f"{S.G_ATTRIBUTIONS}/{spec.name}", shape=(n, *spec.shape), dtype=np.dtype(spec.dtype),
                                 chunks=(1, *spec.shape), **comp)
            d.attrs[S.ATTR_RESOLUTION] = spec.resolution
            d.attrs[S.ATTR_TARGET] = spec.target
            d.attrs[S.ATTR_DESCRIPTION] = spec.description
        f.create_dataset(S.D_SKIPPED, data=np.array([f"{p}\t{r}" for p, r in skipped], dtype=object), dtype=_STR)
        f.flush()

    @classmethod
    def resume(cls, out: str | os.PathLike, *, sample_ids: Sequence[str] | None = None,
               background: bool = True) -> RecordingWriter:
        """Reopen ``<out>.partial`` to continue it. ``sample_ids``, when given, must equal the stored ones
        (same inputs in the same order), otherwise resuming would mix two different runs."""
        out = Path(out)
        part = partial_path(out)
        try:
            f = h5py.File(part, "r+", libver=(S.HDF5_LIBVER_LOW, "latest"), rdcc_nbytes=0)
        except OSError as e:
            raise RecordingError(f"{part}: cannot be resumed, the file is damaged ({_short(e)}); use --overwrite") from None
        try:
            if (_str(f.attrs.get(S.ATTR_FORMAT, "")) != S.FORMAT_NAME
                    or f.attrs.get(S.ATTR_VERSION) != S.FORMAT_VERSION):
                raise RecordingError(f"{part}: not a partial attnviz v{S.FORMAT_VERSION} recording; use --overwrite")
            if sample_ids is not None:
                stored = [_str(s) for s in f[S.D_ID][()]]
                if stored != [str(s) for s in sample_ids]:
                    raise InputError(f"{part} was recorded from other inputs ({len(stored)} samples, "
                                     f"now {len(sample_ids)}); resume with the same --input and --limit, "
                                     "or use --overwrite")
            return cls(out, f, background=background)
        except DiskFullError:
            f.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            f.close()
            raise RecordingError(f"{part}: cannot be resumed, the file is damaged ({_short(e)}); use --overwrite") from None
        except BaseException:
            f.close()
            raise

    # -- state ---------------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        return S.loads(self._f.attrs[S.ATTR_PARAMS])

    @property
    def model_fingerprint(self) -> dict[str, Any] | None:
        raw = self._f.attrs.get(S.ATTR_MODEL_FINGERPRINT)
        return S.loads(raw) if raw is not None else None

    @property
    def model_config(self) -> dict[str, Any]:
        return S.loads(self._f[S.G_MODEL].attrs.get(S.ATTR_MODEL_CONFIG, "{}"))

    def pending_batches(self) -> list[tuple[int, int]]:
        """(start, stop) of every batch not yet done, in order."""
        done = self._f[S.D_DONE][()]
        out = []
        for start in range(0, self.n_samples, self.batch_size):
            stop = min(start + self.batch_size, self.n_samples)
            if not done[start:stop].all():
                out.append((start, stop))
        return out

    def rows_per_sample(self, kind: str) -> int:
        """Query rows per sample the file stores for ``kind`` (``store="rows"``; 0 otherwise)."""
        return int(self._rows_shape[kind][2]) if kind in self._rows_shape else 0

    def qk_tokens(self, kind: str) -> int:
        """Token positions per sample whose query/key vectors the file stores for ``kind`` (0: none)."""
        return int(self._qk_shape[kind][2]) if kind in self._qk_shape else 0

    @property
    def n_logit_columns(self) -> int:
        """Columns of ``samples/logits``: the number of class names, at least 1."""
        return self._n_classes

    @property
    def h5(self) -> h5py.File:
        """The open file, for adding things outside the per-sample loop (e.g. head metrics)."""
        return self._f

    # -- writing -------------------------------------------------------------------------------

    def write(self, batch: SampleBatch) -> None:
        """Check one batch and queue it for the background thread (blocks when two batches are waiting).

        Raises:
            ValueError: the batch does not fit the file (sample range, kinds, shapes); raised here, in
                the caller's thread, before anything is written.
            Exception: whatever failed in the background thread while writing an earlier batch.
        """
        self._raise_pending()
        if not self._f.id.valid or (self._queue is not None and self._thread is None):
            raise RecordingError(f"{self.partial}: the writer is already finished or closed")
        self._check_batch(batch)
        self._check_space(batch.size)
        if self._queue is None:
            self._write_now(batch)
            return
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._raise_pending()

    # -- disk space ----------------------------------------------------------------------------

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample's rows take uncompressed (maps, vectors, attributions, thumbnails, ...)."""
        return self._sample_bytes

    def _make_reserve(self) -> None:
        """Allocate the reserve file (real blocks, so deleting it frees them)."""
        try:
            with open(self._reserve, "wb") as fh:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fh.fileno(), 0, self._reserve_bytes)
                else:  # pragma: no cover - non-POSIX: write zeros
                    fh.write(b"\0" * self._reserve_bytes)
        except OSError as e:
            self._reserve.unlink(missing_ok=True)
            if _is_disk_full(e):
                raise DiskFullError(self._full_message(self._reserve_bytes, starting=True)) from None
            raise RecordingError(f"{self._reserve}: cannot be created ({_short(e)})") from None

    def _drop_reserve(self) -> None:
        self._reserve.unlink(missing_ok=True)

    def _free_bytes(self) -> int:
        return int(shutil.disk_usage(self.partial.parent).free)

    def _check_space(self, n: int) -> None:
        """Refuse a batch the file system has no room for, before anything of it is written."""
        if self._in_memory:
            return
        need = n * self._sample_bytes + BATCH_OVERHEAD
        free = self._free_bytes()
        if free < need:
            if self._queue is not None:  # the batches already queued are written first: the message counts them
                self._queue.join()
            raise DiskFullError(self._full_message(need, free))

    def _full_message(self, need: int, free: int | None = None, *, starting: bool = False) -> str:
        free = self._free_bytes() if free is None else free
        done = int(self._f[S.D_DONE][()].sum()) if self._f.id.valid else 0
        rest = (self.n_samples - done) * self._sample_bytes
        if starting and done == 0:
            return (f"not enough free space to record {self.out} on {self.partial.parent}: {_mb(free)} free; the "
                    f"recording needs about {_mb(rest)} uncompressed, plus {_mb(self._reserve_bytes)} kept in reserve "
                    "while it is written; free space or choose another --out")
        return (f"no space left for {self.partial} on {self.partial.parent}: the next write needs about "
                f"{_mb(need)} and {_mb(free)} are free (the rest of the recording needs about {_mb(rest)} "
                f"uncompressed); the {done} finished sample(s) are kept: free space and run the same command with "
                "--resume")

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write_now(item)
            except BaseException as e:  # reported to the producer on its next call
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _check_batch(self, b: SampleBatch) -> None:
        if b.lengths is None:  # tolerated: the same as no explicit lengths
            b.lengths = {}
        n = b.size
        if n < 1 or b.start < 0 or b.start + n > self.n_samples:
            raise ValueError(f"batch of {n} samples at {b.start} does not fit samples 0..{self.n_samples - 1}")

        def rows(what: str, arr: Any, per_sample: tuple[int, ...] | None = None) -> None:
            shape = np.shape(arr)
            if not shape or shape[0] != n:
                raise ValueError(f"{what}: {shape[0] if shape else 'no'} rows for a batch of {n} samples")
            if per_sample is not None and tuple(shape[1:]) != per_sample:
                raise ValueError(f"{what}: per-sample shape {tuple(shape[1:])}, the file has {per_sample}")

        rows("logits", b.logits, (self._n_classes,))
        if b.labels is not None:
            rows("labels", b.labels, ())
        for kind, maps in b.attention.items():
            if kind not in self._maps_shape and self.store != S.STORE_FULL:
                raise ValueError(f"attention maps for {kind!r}, but this file is written with store={self.store!r} "
                                 "(no maps): give rows / lengths instead")
            if kind not in self._maps_shape:
                raise ValueError(f"attention kind {kind!r} is not in this file ({', '.join(self._maps_shape)})")
            L, H, Q, K = self._maps_shape[kind]
            shape = np.shape(maps)
            rows(f"attention {kind!r}", maps)
            if len(shape) != 5 or shape[1:3] != (L, H) or shape[3] > Q or shape[4] > K:
                raise ValueError(f"attention {kind!r}: shape {shape}, expected ({n}, {L}, {H}, <={Q}, <={K})")
            if kind in b.lengths:
                lens = np.asarray(b.lengths[kind])
                rows(f"lengths {kind!r}", lens, (2,))
                if (lens < 1).any() or (lens[:, 0] > shape[3]).any() or (lens[:, 1] > shape[4]).any():
                    raise ValueError(f"lengths {kind!r}: {lens.tolist()} outside 1..{shape[3:]}")
        for kind in b.lengths:
            if kind not in self._kinds:
                raise ValueError(f"lengths for {kind!r}, which is not in this file ({', '.join(self._kinds)})")
            if self.store == S.STORE_FULL and kind not in b.attention:
                raise ValueError(f"lengths for {kind!r} without its attention maps")
            if self.store != S.STORE_FULL:
                rows(f"lengths {kind!r}", np.asarray(b.lengths[kind]), (2,))
        for kind, (pos, values) in b.rows.items():
            if kind not in self._rows_shape:
                raise ValueError(f"attention rows for {kind!r}, but this file stores "
                                 f"{'no rows' if self.store != S.STORE_ROWS else 'rows of ' + ', '.join(self._rows_shape)}")
            L, H, R, K = self._rows_shape[kind]
            shape = np.shape(values)
            rows(f"rows {kind!r}", values)
            if len(shape) != 5 or shape[1:4] != (L, H, R) or shape[4] > K:
                raise ValueError(f"rows {kind!r}: shape {shape}, expected ({n}, {L}, {H}, {R}, <={K})")
            rows(f"row positions {kind!r}", pos, (R,))
        for name, values in b.per_sample.items():
            if name not in self._per_sample_shape:
                raise ValueError(f"per-sample array {name!r} was not declared when the file was created")
            shape = np.shape(values)
            rows(f"per-sample {name!r}", values)
            full = self._per_sample_shape[name]
            if len(shape) != 1 + len(full) or any(a > b for a, b in zip(shape[1:], full)):
                raise ValueError(f"per-sample {name!r}: shape {shape}, the file holds at most ({n}, *{full})")
        for kind, (pos, q, k) in b.qk.items():
            if kind not in self._qk_shape:
                raise ValueError(f"query/key vectors for {kind!r}, which was created without them")
            rows(f"queries {kind!r}", q, self._qk_shape[kind])
            rows(f"keys {kind!r}", k, self._qk_shape[kind])
            rows(f"qk positions {kind!r}", pos, (self._qk_shape[kind][2],))
        if b.thumbnails is not None and self._thumb_shape is not None:
            rows("thumbnails", b.thumbnails, self._thumb_shape)
        if b.masks is not None and self._mask_shape is not None:
            rows("masks", b.masks, self._mask_shape)
        if b.meta is not None:
            rows("meta", b.meta)
        for name, values in b.attributions.items():
            if name not in self._attr_shape:
                raise ValueError(f"attribution {name!r} was not declared when the file was created")
            rows(f"attribution {name!r}", values)
            shape, full = np.shape(values), self._attr_shape[name]
            if len(shape) != 1 + len(full) or any(a > b for a, b in zip(shape[1:], full)):
                raise ValueError(f"attribution {name!r}: per-sample shape {tuple(shape[1:])}, the file has {full}")

    def _write_now(self, b: SampleBatch) -> None:
        if self._broken:
            raise DiskFullError(self._full_message(b.size * self._sample_bytes))
        try:
            self._write_rows(b)
        except (OSError, RuntimeError) as e:
            if not _is_disk_full(e):
                raise
            # HDF5 cannot flush or close a file after a failed write unless space appears: release the
            # reserve, so the file is flushed (without this batch's done flags) and can be closed
            self._broken = True
            self._drop_reserve()
            try:
                self._f.flush()
            except (OSError, RuntimeError):
                pass
            raise DiskFullError(self._full_message(b.size * self._sample_bytes)) from None

    def _write_rows(self, b: SampleBatch) -> None:
        f = self._f
        sl = slice(b.start, b.start + b.size)
        for kind, (pos, values) in b.rows.items():
            _write_padded(f[S.rows_path(kind)], sl, values)
            f[S.rows_path(kind, S.ROW_POSITIONS)][sl] = np.asarray(pos, np.int32)
        if not b.attention:
            for kind, lens in b.lengths.items():
                f[S.lengths_path(kind)][sl] = np.asarray(lens, np.int32)
        for kind, maps in b.attention.items():
            ds = f[S.maps_path(kind)]
            maps = np.asarray(maps)
            q, k = maps.shape[-2:]
            if (q, k) != ds.shape[-2:]:
                # variable length: pad to the allocated maximum here, so every chunk is written whole
                # (a partial chunk write makes HDF5 read and decompress the chunk first) and the
                # padding is zero even where an earlier, interrupted attempt left other values
                padded = np.zeros((b.size, *ds.shape[1:]), np.float16)
                padded[..., :q, :k] = maps
                maps = padded
            ds[sl] = maps.astype(np.float16, copy=False)
            # without explicit lengths a sample's valid size is the size of the maps given
            lens = b.lengths.get(kind)
            lens = np.tile(np.array([[q, k]], np.int32), (b.size, 1)) if lens is None else np.asarray(lens, np.int32)
            f[S.lengths_path(kind)][sl] = lens
        f[S.D_PREDICTION][sl] = np.asarray(b.predictions, np.int32)
        f[S.D_LOGITS][sl] = np.asarray(b.logits, np.float32)
        if b.labels is not None:
            f[S.D_LABEL][sl] = np.asarray(b.labels, np.int32)
        if b.thumbnails is not None and S.D_THUMBNAIL in f:
            f[S.D_THUMBNAIL][sl] = b.thumbnails
        if b.masks is not None and S.D_MASK in f:
            f[S.D_MASK][sl] = b.masks
        if b.meta is not None and S.D_META in f:
            f[S.D_META][sl] = np.array([S.dumps(m) for m in b.meta], dtype=object)
        for name, values in b.attributions.items():
            _write_padded(f[f"{S.G_ATTRIBUTIONS}/{name}"], sl, values)
        for name, values in b.per_sample.items():
            _write_padded(f[f"{S.G_PER_SAMPLE}/{name}"], sl, values)
        for kind, (pos, q, k) in b.qk.items():
            f[S.qk_path(kind, S.QK_POSITIONS)][sl] = np.asarray(pos, np.int32)
            f[S.qk_path(kind, S.QUERIES)][sl] = np.asarray(q).astype(np.float16, copy=False)
            f[S.qk_path(kind, S.KEYS)][sl] = np.asarray(k).astype(np.float16, copy=False)
        f.flush()
        # done only after the data is on disk: a crash before this line leaves the batch pending
        f[S.D_DONE][sl] = True
        f.flush()

    def drain(self) -> None:
        """Wait until every queued batch is written (errors from the thread are raised here)."""
        if self._queue is not None:
            self._queue.join()
        self._raise_pending()

    def finish(self) -> Path:
        """Write everything, mark the file complete and rename it to its final name.

        Raises:
            RecordingError: some samples are still not done.
        """
        self.drain()
        self._stop_thread()
        done = self._f[S.D_DONE][()]
        if not done.all():
            missing = int((~done).sum())
            self._f.close()
            self._drop_reserve()
            raise RecordingError(f"{self.partial}: {missing} samples were not written; run again with --resume")
        self._f.close()
        # the completion mark is an attribute: written outside SWMR mode, after every batch is on disk
        with h5py.File(self.partial, "r+", rdcc_nbytes=0) as f:
            f.attrs[S.ATTR_COMPLETE] = True
        self._drop_reserve()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        """Flush what is written and close, leaving the partial file (for ``--resume``)."""
        try:
            if self._queue is not None and self._thread is not None and self._thread.is_alive():
                self._queue.join()
        finally:
            self._stop_thread()
            try:
                if self._f.id.valid:
                    if self._broken:
                        self._drop_reserve()  # room for the close's own metadata writes
                    try:
                        self._f.flush()
                    finally:
                        self._f.close()
            finally:
                self._drop_reserve()

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f.id.valid:
            self.close()


def estimate_size(probe: SampleBatch | None = None, finish: Any = None, **create_args: Any) -> tuple[int, int]:
    """The size of the recording :meth:`RecordingWriter.create` would write with ``create_args``, nothing on disk.

    The file is laid out in memory (HDF5's core driver, no backing store) exactly as ``create`` lays it out, once
    without compression and once with the chosen one. Its size after allocation (metadata, ids, labels) is the
    fixed part; ``probe`` (a real first batch) is then written into it, and what the file grew by, per sample of
    the probe (data, chunk indices, with the filter's real effect on real data), times the number of samples is
    the rest. Without a probe, each per-sample dataset's raw bytes stand in for the growth. ``finish(h5file)``,
    when given, adds what is written after the samples (head metrics) before the file is measured.

    Returns:
        (bytes uncompressed, bytes with the chosen compression).
    """
    comp = create_args.get("compression", "lzf")
    uncompressed = _layout_bytes(probe, finish, dict(create_args, compression="none"))
    compressed = uncompressed if _compression(comp) == {} else _layout_bytes(probe, finish, create_args)
    return uncompressed, compressed


def _layout_bytes(probe: SampleBatch | None, finish: Any, create_args: dict[str, Any]) -> int:
    import uuid

    args = dict(create_args)
    for key in ("overwrite", "background", "shard"):
        args.pop(key, None)
    fingerprint = args.pop("model_fingerprint", None)
    main = next(st for st in args["stacks"] if st.kind == S.MAIN_KIND[args["family"]])
    comp = _compression(args.pop("compression", "lzf"))
    labels = args.pop("labels", None)
    n = len(args["sample_ids"])
    lab = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    # block_size: the in-memory file grows in steps of 512 bytes (the default, 64 KB, would hide small files)
    f = h5py.File(f"attnviz-estimate-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False,
                  block_size=512, libver=(S.HDF5_LIBVER_LOW, "latest"))
    try:
        RecordingWriter._allocate(f, main_stack=main, labels=lab, comp=comp, **args)
        if fingerprint is not None:
            f.attrs[S.ATTR_MODEL_FINGERPRINT] = S.dumps(fingerprint)
        if finish is not None:
            finish(f)
        f.flush()
        fixed = int(f.id.get_filesize())
        if probe is None:
            return fixed + n * _per_sample_bytes(f)
        w = RecordingWriter(Path(f.filename), f, background=False, in_memory=True)
        w.write(probe)
        per_sample = (int(f.id.get_filesize()) - fixed) / probe.size
        return int(fixed + n * per_sample)
    finally:
        f.close()


def _per_sample_bytes(h5: h5py.File) -> int:
    """Uncompressed bytes of one sample's rows over every per-sample dataset of the file."""
    n = int(h5.attrs[S.ATTR_N_SAMPLES])
    total = 0

    def visit(name: str, obj: Any) -> None:
        nonlocal total
        if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0] == n and not name.startswith(S.G_ANALYSES):
            per = int(np.prod(obj.shape[1:], dtype=np.int64)) if len(obj.shape) > 1 else 1
            total += per * (obj.dtype.itemsize if obj.dtype.kind != "O" else 64)

    h5.visititems(visit)
    return max(total, 1)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
def _write_padded(ds: h5py.Dataset, sl: slice, values: Any) -> None:
    """Write a batch of per-sample rows; rows smaller than the declared per-sample shape are zero-padded
    here, so that every chunk is written whole."""
    values = np.asarray(values)
    if values.shape[1:] != ds.shape[1:]:
        padded = np.zeros((values.shape[0], *ds.shape[1:]), ds.dtype)
        padded[(slice(None), *(slice(0, m) for m in values.shape[1:]))] = values
        values = padded
    ds[sl] = values.astype(ds.dtype, copy=False)


def _compression(name: str) -> dict[str, Any]:
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if name in ("none", ""):
        return {}
    raise InputError(f"unknown compression {name!r}; choose lzf, gzip or none")


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
