"""Writing a recording: temporary name, background writer thread, resume.

A recording is written to ``<out>.partial`` and renamed to ``<out>`` once every sample is done
(root attribute ``complete`` set to True just before). Samples are written in fixed batches
(``batch_size`` is stored in the file), and ``samples/done`` is set for a batch only after its data
is written and flushed, so an interrupted run leaves a partial file whose done samples are exact;
:meth:`RecordingWriter.resume` reopens it and the extractor recomputes only the batches not done,
with the same batch boundaries, which makes the resumed file equal to an uninterrupted run.

Compression happens in a background thread (``queue`` of depth 2: bounded memory), so the model
does not wait for HDF5.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from attnviz.errors import InputError, RecordingError
from attnviz.store import schema as S

__all__ = ["RecordingWriter", "SampleBatch", "partial_path", "check_output_path"]

_STR = h5py.string_dtype()


def partial_path(out: str | os.PathLike) -> Path:
    """The temporary name a recording is written under until it is complete."""
    out = Path(out)
    return out.with_name(out.name + S.PARTIAL_SUFFIX)


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to clobber: an existing output needs ``--overwrite`` (or ``--resume`` for a partial one).

    Raises:
        InputError: the output exists and neither flag allows it, or its directory is not writable.
    """
    out = Path(out)
    part = partial_path(out)
    if overwrite and resume:
        raise InputError("--overwrite and --resume cannot be used together")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
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


@dataclass
class SampleBatch:
    """One batch of results for consecutive samples ``start .. start+B-1``.

    Attributes:
        start: index of the first sample of the batch.
        attention: kind -> float array ``[batch, layer, head, query_pos, key_pos]`` (cast to float16).
        lengths: kind -> int array ``[batch, 2]`` of valid (query_len, key_len); None = full size.
        predictions: int ``[batch]``; logits: float ``[batch, n_classes]``.
        labels: int ``[batch]`` (-1 = unknown) or None to keep what the writer was created with.
        thumbnails: uint8 ``[batch, h, w, 3]`` or None; masks: uint8 ``[batch, h, w]`` or None.
        attributions: name -> float ``[batch, *shape]``.
        meta: per-sample JSON-able dicts, or None.
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

    @property
    def size(self) -> int:
        return int(len(self.predictions))


class RecordingWriter:
    """Writes one recording. Use :meth:`create` or :meth:`resume`, then :meth:`write` batches,
    then :meth:`finish`. As a context manager, leaving with an exception flushes what was written
    and leaves the ``.partial`` file for ``--resume``.
    """

    def __init__(self, out: Path, h5: h5py.File, *, background: bool = True) -> None:
        self.out = Path(out)
        self.partial = partial_path(out)
        self._f = h5
        self.batch_size = int(h5.attrs[S.ATTR_BATCH_SIZE])
        self.n_samples = int(h5.attrs[S.ATTR_N_SAMPLES])
        self._error: BaseException | None = None
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
        """
        if family not in S.FAMILIES:
            raise InputError(f"unknown family {family!r}; known: {', '.join(S.FAMILIES)}")
        n = len(sample_ids)
        if n == 0:
            raise InputError("no samples to record")
        out = Path(out)
        part = partial_path(out)
        if part.exists():
            if not overwrite:
                raise InputError(f"{part} exists: pass --resume or --overwrite")
            part.unlink()
        comp = _compression(compression)
        try:
            f = h5py.File(part, "w", libver="latest")
        except OSError as e:  # unwritable directory and the like
            raise InputError(f"cannot write {part}: {_short(e)}") from None
        main = S.MAIN_KIND[family]
        main_stack = next((s for s in stacks if s.kind == main), None)
        if main_stack is None:
            f.close()
            part.unlink()
            raise InputError(f"a {family} recording needs the {main!r} attention stack")
        a = f.attrs
        a[S.ATTR_FORMAT] = S.FORMAT_NAME
        a[S.ATTR_VERSION] = S.FORMAT_VERSION
        a[S.ATTR_FAMILY] = family
        a[S.ATTR_MODEL_NAME] = model_name
        a[S.ATTR_MODEL_CLASS] = model_class
        a[S.ATTR_CREATED] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a[S.ATTR_COMPLETE] = False
        a[S.ATTR_N_SAMPLES] = n
        a[S.ATTR_N_LAYERS] = main_stack.n_layers
        a[S.ATTR_N_HEADS] = main_stack.n_heads
        a[S.ATTR_MAIN_KIND] = main
        a[S.ATTR_BATCH_SIZE] = int(batch_size)
        a[S.ATTR_PARAMS] = S.dumps(extraction_params or {})
        a[S.ATTR_TARGET_SOURCE] = target_source
        from attnviz import __version__

        a[S.ATTR_PRODUCER] = f"attnviz {__version__}"

        f.create_dataset(S.D_ID, data=np.array(list(sample_ids), dtype=object), dtype=_STR)
        f.create_dataset(S.D_DONE, shape=(n,), dtype=bool, fillvalue=False)
        lab = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        if lab.shape != (n,):
            raise InputError(f"labels have shape {lab.shape}, expected ({n},)")
        f.create_dataset(S.D_LABEL, data=lab)
        f.create_dataset(S.D_PREDICTION, shape=(n,), dtype=np.int32, fillvalue=-1)
        n_classes = max(len(class_names), 1)
        f.create_dataset(S.D_LOGITS, shape=(n, n_classes), dtype=np.float32, chunks=(min(n, 256), n_classes))
        model = f.require_group(S.G_MODEL)
        model.create_dataset("class_names", data=np.array(list(class_names), dtype=object), dtype=_STR)
        model.attrs["config"] = S.dumps(model_config or {})
        if thumbnail_shape is not None:
            th, tw = thumbnail_shape
            f.create_dataset(S.D_THUMBNAIL, shape=(n, th, tw, 3), dtype=np.uint8,
                             chunks=(1, th, tw, 3), **comp)
        if mask_shape is not None:
            mh, mw = mask_shape
            f.create_dataset(S.D_MASK, shape=(n, mh, mw), dtype=np.uint8, chunks=(1, mh, mw), **comp)
        if with_meta:
            f.create_dataset(S.D_META, shape=(n,), dtype=_STR)
        for st in stacks:
            g = f.create_group(f"{S.G_ATTENTION}/{st.kind}")
            g.attrs["n_layers"] = st.n_layers
            g.attrs["n_heads"] = st.n_heads
            g.attrs["layout"] = st.layout.to_json()
            # one (sample, layer, head) map per chunk: a head is read alone
            g.create_dataset(S.MAPS, shape=(n, st.n_layers, st.n_heads, st.max_query, st.max_key),
                             dtype=np.float16, chunks=(1, 1, 1, st.max_query, st.max_key), **comp)
            g.create_dataset(S.LENGTHS, data=np.tile(np.array([[st.max_query, st.max_key]], np.int32), (n, 1)))
        for spec in attributions:
            d = f.create_dataset(f"{S.G_ATTRIBUTIONS}/{spec.name}", shape=(n, *spec.shape), dtype=np.float32,
                                 chunks=(1, *spec.shape), **comp)
            d.attrs["resolution"] = spec.resolution
            d.attrs["target"] = spec.target
            d.attrs["description"] = spec.description
        f.create_dataset(S.D_SKIPPED, data=np.array([f"{p}\t{r}" for p, r in skipped], dtype=object), dtype=_STR)
        f.flush()
        return cls(out, f, background=background)

    @classmethod
    def resume(cls, out: str | os.PathLike, *, sample_ids: Sequence[str] | None = None,
               background: bool = True) -> RecordingWriter:
        """Reopen ``<out>.partial`` to continue it. ``sample_ids``, when given, must equal the stored ones
        (same inputs in the same order), otherwise resuming would mix two different runs."""
        out = Path(out)
        part = partial_path(out)
        try:
            f = h5py.File(part, "r+")
        except OSError as e:
            raise RecordingError(f"{part}: cannot be resumed, the file is damaged ({_short(e)}); use --overwrite") from None
        if f.attrs.get(S.ATTR_FORMAT) != S.FORMAT_NAME or int(f.attrs.get(S.ATTR_VERSION, -1)) != S.FORMAT_VERSION:
            f.close()
            raise RecordingError(f"{part}: not a partial attnviz v{S.FORMAT_VERSION} recording; use --overwrite")
        if sample_ids is not None:
            stored = [s.decode() if isinstance(s, bytes) else s for s in f[S.D_ID][()]]
            if stored != list(sample_ids):
                f.close()
                raise InputError(f"{part} was recorded from other inputs ({len(stored)} samples); "
                                 "resume with the same --input and --limit, or use --overwrite")
        return cls(out, f, background=background)

    # -- state ---------------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        return S.loads(self._f.attrs[S.ATTR_PARAMS])

    def pending_batches(self) -> list[tuple[int, int]]:
        """(start, stop) of every batch not yet done, in order."""
        done = self._f[S.D_DONE][()]
        out = []
        for start in range(0, self.n_samples, self.batch_size):
            stop = min(start + self.batch_size, self.n_samples)
            if not done[start:stop].all():
                out.append((start, stop))
        return out

    @property
    def h5(self) -> h5py.File:
        """The open file, for adding things outside the per-sample loop (e.g. head metrics)."""
        return self._f

    # -- writing -------------------------------------------------------------------------------

    def write(self, batch: SampleBatch) -> None:
        """Queue one batch for the background thread (blocks when two batches are waiting)."""
        self._raise_pending()
        if self._queue is None:
            self._write_now(batch)
            return
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._raise_pending()

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

    def _write_now(self, b: SampleBatch) -> None:
        f = self._f
        sl = slice(b.start, b.start + b.size)
        for kind, maps in b.attention.items():
            ds = f[S.maps_path(kind)]
            maps = np.asarray(maps)
            if maps.shape[1:] == ds.shape[1:]:
                ds[sl] = maps.astype(np.float16, copy=False)
            else:  # variable length: pad into the allocated maximum
                q, k = maps.shape[-2:]
                ds[sl, :, :, :q, :k] = maps.astype(np.float16, copy=False)
            if kind in b.lengths:
                f[S.lengths_path(kind)][sl] = np.asarray(b.lengths[kind], np.int32)
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
            f[f"{S.G_ATTRIBUTIONS}/{name}"][sl] = np.asarray(values, np.float32)
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
            raise RecordingError(f"{self.partial}: {missing} samples were not written; run again with --resume")
        self._f.attrs[S.ATTR_COMPLETE] = True
        self._f.close()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        """Flush what is written and close, leaving the partial file (for ``--resume``)."""
        try:
            if self._queue is not None and self._thread is not None and self._thread.is_alive():
                self._queue.join()
        finally:
            self._stop_thread()
            if self._f.id.valid:
                self._f.flush()
                self._f.close()

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
