"""The lazy reader: ``attnviz.open(path)``.

Nothing is read until asked for; one attention map is one HDF5 chunk. The file is validated on
open (format name, version, required datasets, consistent shapes); every problem is one
:class:`~attnviz.errors.RecordingError` naming the file.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from attnviz.errors import RecordingError
from attnviz.store import schema as S

__all__ = ["Recording", "open", "store_refusal"]


def _reads(fn: Any) -> Any:
    """Methods that read data: a damaged chunk (HDF5 errors: OSError, RuntimeError) becomes one
    :class:`RecordingError` naming the file, as every other problem of a recording does."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: "Recording", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            raise RecordingError(f"{self.path}: cannot be read: damaged data ({_first_line(e)})") from None

    return wrapper


def _reads_iter(fn: Any) -> Any:
    """:func:`_reads` for generator methods."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: "Recording", *args: Any, **kwargs: Any) -> Any:
        try:
            yield from fn(self, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            raise RecordingError(f"{self.path}: cannot be read: damaged data ({_first_line(e)})") from None

    return wrapper


def open(path: str | os.PathLike) -> Recording:  # noqa: A001 - the public name is attnviz.open
    """Open a recording read-only (lazily) and validate it.

    Args:
        path: an attnviz ``.h5`` file, complete or ``.partial``.

    Returns:
        A :class:`Recording`; use it as a context manager or call ``close()``.

    Raises:
        RecordingError: missing, not HDF5, truncated, not an attnviz recording, another format
            version, or a required dataset missing.
    """
    return Recording(path)


class Recording:
    """A read-only, lazy view of one recording.

    ``n_samples`` counts the samples that were written: for an incomplete recording (an interrupted
    extraction) that is the leading run of done samples, and ``complete`` is False.

    One convention throughout: **properties are scalars** (identity, sizes, flags: ``family``,
    ``n_samples``, ``complete``, ``accuracy``, ``has_masks``, ...), **everything that returns a
    collection is a method** (``sample_ids()``, ``labels()``, ``predictions()``, ``class_names()``,
    ``kinds()``, ``head_metrics()``, ``attribution_methods()``, ``analyses()``, ``skipped()``,
    ``datasets()``, and every per-sample or per-head read). A method returns a fresh object the
    caller may change; small arrays are read from the file once and copied out.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # per-kind caches: a dashboard reads many single maps, and each HDF5 object lookup or
        # attribute read costs about as much as reading the map itself
        self._datasets: dict[str, h5py.Dataset] = {}
        self._stack_shapes: dict[str, tuple[int, int]] = {}
        self._lengths: dict[str, np.ndarray] = {}
        self._kinds: tuple[str, ...] | None = None
        self._small: dict[str, Any] = {}  # small arrays read once; methods hand out copies
        if not self.path.exists():
            raise RecordingError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise RecordingError(f"{self.path}: is a directory, not a recording (.h5)")
        try:
            # no file locking: the dashboard may read while `attnviz analyze` adds to the file
            self._f = _open_read(self.path)
        except OSError as e:
            msg = str(e).lower()
            why = "truncated (an interrupted copy or write?)" if "truncated" in msg else "not an HDF5 file or damaged"
            raise RecordingError(f"{self.path}: cannot be read: {why}") from None
        try:
            self._validate()
        except RecordingError:
            self._f.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
            # h5py reports damaged metadata or data with these; one line, naming the file
            self._f.close()
            raise RecordingError(f"{self.path}: cannot be read: damaged ({_first_line(e)})") from None
        except BaseException:
            self._f.close()
            raise

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        """Check the whole contract of docs/file-format.md that readers rely on: every attribute the schema
        declares parses and has the right type, and agrees with the datasets' shapes. Cheap: attributes,
        shapes and a few small arrays (done flags, lengths, labels), never the maps themselves."""
        f, a, p = self._f, self._f.attrs, self.path
        fmt = a.get(S.ATTR_FORMAT)
        if fmt is None or _text(fmt) != S.FORMAT_NAME:
            raise RecordingError(f"{p}: not an attnviz recording (root attribute 'format' is not {S.FORMAT_NAME!r})")
        if S.ATTR_VERSION not in a:
            raise RecordingError(f"{p}: root attribute 'format_version' is missing; the file is not a valid recording")
        raw = a[S.ATTR_VERSION]
        version = _integer(raw)
        if version is None:
            raise RecordingError(f"{p}: format version {_text(raw)!r} is not an integer")
        if version != S.FORMAT_VERSION:
            hint = ("written by a newer attnviz; upgrade attnviz (pip install -U attnviz) to read it"
                    if version > S.FORMAT_VERSION else "record it again with this attnviz")
            raise RecordingError(f"{p}: format version {version}, this attnviz reads version {S.FORMAT_VERSION}; {hint}")
        missing = [k for k in S.REQUIRED_ROOT_ATTRS if k not in a]
        if missing:
            raise RecordingError(f"{p}: missing root attribute(s) {', '.join(missing)}")
        for name in (S.ATTR_FAMILY, S.ATTR_MODEL_NAME, S.ATTR_CREATED, S.ATTR_MAIN_KIND, S.ATTR_MODEL_CLASS,
                     S.ATTR_TARGET_SOURCE, S.ATTR_PRODUCER):
            if name in a and _text(a[name], strict=True) is None:
                raise RecordingError(f"{p}: root attribute {name!r} is not a string")
        n = self._int_attr(a, S.ATTR_N_SAMPLES, "/", minimum=0)
        self._int_attr(a, S.ATTR_N_LAYERS, "/", minimum=1)
        self._int_attr(a, S.ATTR_N_HEADS, "/", minimum=1)
        if S.ATTR_BATCH_SIZE in a:
            self._int_attr(a, S.ATTR_BATCH_SIZE, "/", minimum=1)
        if _integer(a[S.ATTR_COMPLETE]) is None:
            raise RecordingError(f"{p}: root attribute 'complete' is not a boolean")
        for name in (S.ATTR_PARAMS, S.ATTR_MODEL_FINGERPRINT):
            if name in a:
                self._json_attr(a, name, "/", dict)
        if S.ATTR_TARGET_SOURCE in a and _text(a[S.ATTR_TARGET_SOURCE]) not in S.TARGET_SOURCES:
            raise RecordingError(f"{p}: root attribute 'target_source' is {_text(a[S.ATTR_TARGET_SOURCE])!r}, "
                                 f"expected one of {', '.join(S.TARGET_SOURCES)}")
        if S.ATTR_STORE in a and _text(a[S.ATTR_STORE], strict=True) not in S.STORE_MODES:
            raise RecordingError(f"{p}: root attribute 'store' is {_text(a[S.ATTR_STORE])!r}, expected one of "
                                 f"{', '.join(S.STORE_MODES)}")
        store = self.store
        family = self.family
        if family not in S.FAMILIES:
            raise RecordingError(f"{p}: unknown family {family!r} (known: {', '.join(S.FAMILIES)})")
        main = self.main_kind
        if main != S.MAIN_KIND[family]:
            raise RecordingError(f"{p}: main_kind {main!r}, a {family} recording's main kind is {S.MAIN_KIND[family]!r}")
        required = list(S.REQUIRED_DATASETS) + [S.lengths_path(main)]
        required += {S.STORE_FULL: [S.maps_path(main)], S.STORE_ROWS: [S.rows_path(main, S.ROWS),
                     S.rows_path(main, S.ROW_POSITIONS)], S.STORE_SUMMARY: []}[store]
        if family in S.THUMBNAIL_FAMILIES:
            required.append(S.D_THUMBNAIL)
        for name in required:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise RecordingError(f"{p}: required dataset /{name} is missing")
        for name in (S.G_SAMPLES, S.G_MODEL, S.G_ATTENTION, S.G_ATTRIBUTIONS, S.G_HEAD_METRICS, S.G_ANALYSES,
                     S.G_PER_SAMPLE):
            if name in f and not isinstance(f[name], h5py.Group):
                raise RecordingError(f"{p}: /{name} is not a group")
        per_sample = [S.D_ID, S.D_DONE, S.D_LABEL, S.D_PREDICTION, S.D_LOGITS, S.D_THUMBNAIL, S.D_MASK, S.D_META]
        for group in (S.G_ATTRIBUTIONS, S.G_PER_SAMPLE):
            if group in f:
                per_sample += [f"{group}/{name}" for name in f[group]]
        for name in per_sample:
            if name in f:
                obj = f[name]
                if not isinstance(obj, h5py.Dataset) or not obj.shape or obj.shape[0] != n:
                    rows = obj.shape[0] if isinstance(obj, h5py.Dataset) and obj.shape else 0
                    raise RecordingError(f"{p}: /{name} has {rows} rows, expected {n}")
        kinds = {S.D_DONE: "biu", S.D_LABEL: "iu", S.D_PREDICTION: "iu", S.D_LOGITS: "f", S.D_THUMBNAIL: "u",
                 S.D_MASK: "biu"}
        for name, ok in kinds.items():
            if name in f and f[name].dtype.kind not in ok:
                raise RecordingError(f"{p}: /{name} has dtype {f[name].dtype}, not what the format says")
        for name in (S.D_ID, S.D_CLASS_NAMES, S.D_META, S.D_SKIPPED):
            if name in f and f[name].dtype.kind not in "OSU":
                raise RecordingError(f"{p}: /{name} is not a string dataset")
        logits = f[S.D_LOGITS].shape
        n_classes = len(f[S.D_CLASS_NAMES])
        if len(logits) != 2 or (n_classes and logits[1] != n_classes):
            raise RecordingError(f"{p}: /{S.D_LOGITS} has shape {logits}, expected ({n}, {n_classes}) "
                                 f"for {n_classes} class names")
        if S.D_THUMBNAIL in f:
            th = f[S.D_THUMBNAIL].shape
            if len(th) != 4 or th[3] != 3 or min(th[1:3], default=0) < 1:
                raise RecordingError(f"{p}: /{S.D_THUMBNAIL} has shape {th}, expected ({n}, height, width, 3)")
            if S.D_MASK in f and f[S.D_MASK].shape[1:] != th[1:3]:
                raise RecordingError(f"{p}: /{S.D_MASK} has shape {f[S.D_MASK].shape}, the thumbnails are {th[1:3]}")
        labels = f[S.D_LABEL][()]
        if n_classes and ((labels < -1) | (labels >= n_classes)).any():
            raise RecordingError(f"{p}: /{S.D_LABEL} holds labels outside -1..{n_classes - 1}")
        done = f[S.D_DONE][()].astype(bool)
        n_done = int(done.size if done.all() else np.argmin(done))
        for kind in self.kinds():
            self._validate_stack(kind, n, n_done, main)
        if S.G_ATTRIBUTIONS in f:
            for name, ds in f[S.G_ATTRIBUTIONS].items():
                self._validate_attribution(name, ds)
        if S.G_HEAD_METRICS in f:
            for name, ds in f[S.G_HEAD_METRICS].items():
                self._validate_head_metric(name, ds)
        try:  # touch the data: a damaged file can open and still fail on reading
            if n_done and store == S.STORE_FULL:
                f[S.maps_path(main)][n_done - 1, -1, -1, :1, :1]
            elif n_done and store == S.STORE_ROWS:
                f[S.rows_path(main)][n_done - 1, -1, -1, :1, :1]
        except (OSError, RuntimeError):
            raise RecordingError(f"{p}: cannot be read: truncated or damaged data") from None

    def _int_attr(self, attrs: Any, name: str, where: str, *, minimum: int) -> int:
        value = _integer(attrs[name]) if name in attrs else None
        if value is None or value < minimum:
            raw = _text(attrs[name]) if name in attrs else "missing"
            raise RecordingError(f"{self.path}: attribute {name!r} of {where} is {raw!r}, expected an integer >= {minimum}")
        return value

    def _json_attr(self, attrs: Any, name: str, where: str, kind: type) -> Any:
        try:
            value = S.loads(attrs[name])
        except (ValueError, TypeError, UnicodeDecodeError):
            raise RecordingError(f"{self.path}: attribute {name!r} of {where} is not valid JSON") from None
        if not isinstance(value, kind):
            raise RecordingError(f"{self.path}: attribute {name!r} of {where} is not a JSON {kind.__name__}")
        return value

    def _validate_stack(self, kind: str, n: int, n_done: int, main: str) -> None:
        f, p = self._f, self.path
        where = f"/{S.G_ATTENTION}/{kind}"
        g = f[where]
        if not isinstance(g, h5py.Group):
            raise RecordingError(f"{p}: {where} is not a group")
        if kind not in S.FAMILY_KINDS[self.family]:
            raise RecordingError(f"{p}: {where}: a {self.family} recording has no {kind!r} attention")
        store = self.store
        needed = {S.STORE_FULL: (S.MAPS,), S.STORE_ROWS: (S.ROWS, S.ROW_POSITIONS), S.STORE_SUMMARY: ()}[store]
        for name in (*needed, S.LENGTHS):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise RecordingError(f"{p}: required dataset {where}/{name} is missing")
        for attr in (S.ATTR_STACK_N_LAYERS, S.ATTR_STACK_N_HEADS, S.ATTR_LAYOUT):
            if attr not in g.attrs:
                raise RecordingError(f"{p}: {where} lacks its attribute {attr!r}")
        L = self._int_attr(g.attrs, S.ATTR_STACK_N_LAYERS, where, minimum=1)
        H = self._int_attr(g.attrs, S.ATTR_STACK_N_HEADS, where, minimum=1)
        layout = self._layout_attr(g, where)
        if store == S.STORE_FULL:
            shape = g[S.MAPS].shape
            if len(shape) != 5 or shape[:3] != (n, L, H):
                raise RecordingError(f"{p}: /{S.maps_path(kind)} has shape {shape}, expected ({n}, {L}, {H}, Q, K)")
            if g[S.MAPS].dtype.kind != "f":
                raise RecordingError(f"{p}: /{S.maps_path(kind)} has dtype {g[S.MAPS].dtype}, expected float16")
            max_q, max_k = shape[3], shape[4]
        else:
            raw = g.attrs.get(S.ATTR_MAX_LENGTHS)
            pair = np.asarray(raw) if raw is not None else None
            if pair is None or pair.shape != (2,) or pair.dtype.kind not in "iu" or (pair < 1).any():
                raise RecordingError(f"{p}: {where} lacks its attribute {S.ATTR_MAX_LENGTHS!r} "
                                     "([max_query, max_key] integers >= 1)")
            max_q, max_k = int(pair[0]), int(pair[1])
        if store == S.STORE_ROWS:
            rs, ps = g[S.ROWS].shape, g[S.ROW_POSITIONS].shape
            if len(rs) != 5 or rs[:3] != (n, L, H) or rs[4] != max_k or ps != (n, rs[3]) or \
                    g[S.ROWS].dtype.kind != "f" or g[S.ROW_POSITIONS].dtype.kind not in "iu":
                raise RecordingError(f"{p}: {where}: rows {rs} and row positions {ps} do not fit "
                                     f"({n}, {L}, {H}, R, {max_k}) floats and ({n}, R) integers")
            pos = g[S.ROW_POSITIONS][: n_done]
            if (pos < -1).any() or (pos >= max_q).any():
                raise RecordingError(f"{p}: /{S.rows_path(kind, S.ROW_POSITIONS)} holds positions outside "
                                     f"-1..{max_q - 1}")
        if kind == main and (L, H) != (self.n_layers, self.n_heads):
            raise RecordingError(f"{p}: root n_layers x n_heads {self.n_layers}x{self.n_heads} differ from "
                                 f"the {kind!r} stack's {L}x{H}")
        if layout.grid is not None and layout.n_tokens not in (max_q, None) or \
                layout.grid is not None and max_q != max_k:
            raise RecordingError(f"{p}: {where}: the layout's {layout.n_prefix} prefix token(s) + "
                                 f"{layout.grid[0]}x{layout.grid[1]} patches do not fit maps of {max_q}x{max_k}")
        lengths = g[S.LENGTHS]
        if lengths.shape != (n, 2) or lengths.dtype.kind not in "iu":
            raise RecordingError(f"{p}: /{S.lengths_path(kind)} has shape {lengths.shape}, expected ({n}, 2) integers")
        lens = lengths[()]
        if (lens < 0).any() or (lens[:, 0] > max_q).any() or (lens[:, 1] > max_k).any():
            raise RecordingError(f"{p}: /{S.lengths_path(kind)} has lengths outside the maps' {max_q}x{max_k}")
        if n_done and (lens[:n_done] < 1).any():
            raise RecordingError(f"{p}: /{S.lengths_path(kind)} has zero lengths for written samples")
        self._validate_qk(kind, g, n, L, H, max(max_q, max_k))

    def _layout_attr(self, g: h5py.Group, where: str) -> S.TokenLayout:
        d = self._json_attr(g.attrs, S.ATTR_LAYOUT, where, dict)
        try:
            lay = S.TokenLayout.from_json(S.dumps(d))
        except (TypeError, ValueError):
            raise RecordingError(f"{self.path}: {where}: attribute 'layout' does not describe a token layout") from None

        def pair(v: Any) -> bool:
            return v is None or (isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v))

        ok = (_is_int(lay.n_prefix) and lay.n_prefix >= 0 and all(isinstance(x, str) for x in lay.prefix_names)
              and len(lay.prefix_names) in (0, lay.n_prefix) and pair(lay.grid) and pair(lay.patch_size)
              and pair(lay.image_size) and lay.query_axis in S.QUERY_AXES and lay.key_axis in S.KEY_AXES
              and (lay.image_span is None or (isinstance(lay.image_span, tuple) and len(lay.image_span) == 2
                                              and all(_is_int(x) and x >= 0 for x in lay.image_span)
                                              and lay.image_span[0] < lay.image_span[1])))
        if not ok:
            raise RecordingError(f"{self.path}: {where}: attribute 'layout' has values of the wrong type or range")
        return lay

    def _validate_attribution(self, name: str, ds: Any) -> None:
        where = f"/{S.G_ATTRIBUTIONS}/{name}"
        if not isinstance(ds, h5py.Dataset) or len(ds.shape) < 2 or ds.dtype.kind != "f":
            raise RecordingError(f"{self.path}: {where} is not a float array [sample, ...]")
        res = ds.attrs.get(S.ATTR_RESOLUTION)
        if res is not None and _text(res) not in S.RESOLUTIONS and self.family in S.THUMBNAIL_FAMILIES:
            raise RecordingError(f"{self.path}: {where}: resolution {_text(res)!r} is not one of {', '.join(S.RESOLUTIONS)}")
        for attr in (S.ATTR_TARGET, S.ATTR_DESCRIPTION):
            if attr in ds.attrs and _text(ds.attrs[attr], strict=True) is None:
                raise RecordingError(f"{self.path}: {where}: attribute {attr!r} is not a string")

    def _validate_head_metric(self, name: str, ds: Any) -> None:
        where = f"/{S.G_HEAD_METRICS}/{name}"
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "fiu":
            raise RecordingError(f"{self.path}: {where} is not a numeric array")
        kind = _text(ds.attrs.get(S.ATTR_METRIC_KIND, self.main_kind))
        if kind not in self.kinds():
            raise RecordingError(f"{self.path}: {where} belongs to a {kind!r} stack this recording does not have")
        g = self._f[f"{S.G_ATTENTION}/{kind}"]
        stack = (_integer(g.attrs[S.ATTR_STACK_N_LAYERS]), _integer(g.attrs[S.ATTR_STACK_N_HEADS]))
        if ds.shape != stack:
            raise RecordingError(f"{self.path}: {where} has shape {ds.shape}, its {kind!r} stack is {stack}")
        if S.ATTR_METRIC_PARAMS in ds.attrs:
            self._json_attr(ds.attrs, S.ATTR_METRIC_PARAMS, where, dict)
        if S.ATTR_METRIC_HIGHER in ds.attrs and _integer(ds.attrs[S.ATTR_METRIC_HIGHER]) is None:
            raise RecordingError(f"{self.path}: {where}: attribute {S.ATTR_METRIC_HIGHER!r} is not a boolean")

    def _validate_qk(self, kind: str, g: h5py.Group, n: int, n_layers: int, n_heads: int, n_tokens: int) -> None:
        """The optional query/key vectors of a stack: all three datasets or none, consistent shapes."""
        present = [what for what in (S.QUERIES, S.KEYS, S.QK_POSITIONS) if what in g]
        if not present:
            return
        p = self.path
        if len(present) != 3:
            missing = sorted({S.QUERIES, S.KEYS, S.QK_POSITIONS} - set(present))
            raise RecordingError(f"{p}: /{S.G_ATTENTION}/{kind} stores query/key vectors but lacks {', '.join(missing)}")
        qs, ks, ps = g[S.QUERIES].shape, g[S.KEYS].shape, g[S.QK_POSITIONS].shape
        if len(qs) != 5 or qs[:3] != (n, n_layers, n_heads) or ks != qs or ps != (n, qs[3]):
            raise RecordingError(f"{p}: /{S.G_ATTENTION}/{kind} query/key shapes {qs}, {ks}, positions {ps} do not "
                                 f"fit ({n}, {n_layers}, {n_heads}, T, head_dim) and ({n}, T)")
        pos = g[S.QK_POSITIONS][()]
        if (pos < -1).any() or (pos >= n_tokens).any():
            raise RecordingError(f"{p}: /{S.qk_path(kind, S.QK_POSITIONS)} holds positions outside -1..{n_tokens - 1}")

    # -- identity --------------------------------------------------------------------------

    @cached_property
    def family(self) -> str:
        return _str(self._f.attrs[S.ATTR_FAMILY])

    @property
    def model_name(self) -> str:
        return _str(self._f.attrs[S.ATTR_MODEL_NAME])

    @property
    def model_class(self) -> str:
        return _str(self._f.attrs.get(S.ATTR_MODEL_CLASS, ""))

    @property
    def created(self) -> str:
        return _str(self._f.attrs[S.ATTR_CREATED])

    @property
    def format_version(self) -> int:
        return int(self._f.attrs[S.ATTR_VERSION])

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs[S.ATTR_COMPLETE])

    @cached_property
    def store(self) -> str:
        """What the attention stacks hold (``attnviz extract --store``): "full" (every map; also every file
        written before the option existed), "rows" (chosen query rows of every map: :meth:`attention_rows`) or
        "summary" (no maps: per-head summaries only)."""
        raw = self._f.attrs.get(S.ATTR_STORE)
        return S.STORE_FULL if raw is None else _str(_text(raw))

    def has_maps(self) -> bool:
        """True when every attention map is stored (``store == "full"``)."""
        return self.store == S.STORE_FULL

    @cached_property
    def main_kind(self) -> str:
        return _str(self._f.attrs[S.ATTR_MAIN_KIND])

    @property
    def extraction_params(self) -> dict[str, Any]:
        return S.loads(self._f.attrs.get(S.ATTR_PARAMS, "{}"))

    @property
    def target_source(self) -> str:
        """"label" when accuracy-type metrics used true labels, "prediction" when they used the
        model's own predictions (a recording without labels)."""
        return _str(self._f.attrs.get(S.ATTR_TARGET_SOURCE, "label"))

    @property
    def model_config(self) -> dict[str, Any]:
        return S.loads(self._f[S.G_MODEL].attrs.get(S.ATTR_MODEL_CONFIG, "{}"))

    @property
    def model_fingerprint(self) -> dict[str, Any]:
        """What produced the recording: model class, sha256 of the config, of the weights (all bytes, or
        header + sampled blocks for large weights) and of the processing files; {} for older files."""
        raw = self._f.attrs.get(S.ATTR_MODEL_FINGERPRINT)
        return S.loads(raw) if raw is not None else {}

    # -- sizes -----------------------------------------------------------------------------

    @property
    def n_planned(self) -> int:
        """Samples the extraction set out to record (rows allocated in the file)."""
        return int(self._f.attrs[S.ATTR_N_SAMPLES])

    @cached_property
    def n_samples(self) -> int:
        """Samples written and readable: all of them when complete, else the leading done run."""
        done = self._f[S.D_DONE][()]
        if done.all():
            return int(done.size)
        return int(np.argmin(done))

    @property
    def n_layers(self) -> int:
        return int(self._f.attrs[S.ATTR_N_LAYERS])

    @property
    def n_heads(self) -> int:
        return int(self._f.attrs[S.ATTR_N_HEADS])

    def kinds(self) -> tuple[str, ...]:
        """Attention kinds present, the main kind first."""
        if self._kinds is None:
            present = tuple(self._f[S.G_ATTENTION].keys()) if S.G_ATTENTION in self._f else ()
            self._kinds = tuple(sorted(present, key=lambda k: (k != self.main_kind, k)))
        return self._kinds

    def stack_shape(self, kind: str | None = None) -> tuple[int, int]:
        """(n_layers, n_heads) of one attention kind."""
        kind = kind or self.main_kind
        if kind not in self._stack_shapes:
            g = self._group(kind)
            self._stack_shapes[kind] = int(g.attrs[S.ATTR_STACK_N_LAYERS]), int(g.attrs[S.ATTR_STACK_N_HEADS])
        return self._stack_shapes[kind]

    def layout(self, kind: str | None = None) -> S.TokenLayout:
        """How the tokens of ``kind`` map onto the input (prefix tokens, patch grid, ...)."""
        return S.TokenLayout.from_json(self._group(kind).attrs[S.ATTR_LAYOUT])

    # -- attention ------------------------------------------------------------------------

    @_reads
    def attention(self, sample: int, layer: int, head: int, kind: str | None = None) -> np.ndarray:
        """One attention map as the model computed it.

        Returns:
            float32 ``[query_pos, key_pos]``, cropped to the sample's valid lengths; rows sum to 1.
        """
        self._check(sample, layer, head, kind)
        if self.store == S.STORE_ROWS:
            pos = self.row_positions(sample, kind)
            raise RecordingError(f"{self.path}: this recording stores only query rows (--store rows), not whole maps: "
                                 f"sample {sample} has the rows of query positions {', '.join(map(str, pos.tolist()))}; "
                                 "read them with attention_rows(sample, layer, head)")
        self._need_maps("attention(...) (one whole map)")
        q, k = self.lengths(sample, kind)
        return self._maps(kind)[sample, layer, head, :q, :k].astype(np.float32)

    @_reads
    def attention_heads(self, sample: int, layer: int, kind: str | None = None) -> np.ndarray:
        """All heads of one layer: float32 ``[head, query_pos, key_pos]``."""
        self._check(sample, layer, 0, kind)
        self._need_maps("attention_heads(...) (whole maps)")
        q, k = self.lengths(sample, kind)
        return self._maps(kind)[sample, layer, :, :q, :k].astype(np.float32)

    @_reads
    def attention_query(self, sample: int, layer: int, query: int, kind: str | None = None,
                        head: int | None = None) -> np.ndarray:
        """One query row: float32 ``[key_pos]`` for one head, or ``[head, key_pos]`` for all heads.

        On a ``--store rows`` recording only the stored query positions (:meth:`row_positions`) can be read; any
        other raises :class:`RecordingError` naming them."""
        self._check(sample, layer, 0 if head is None else head, kind)
        q, k = self.lengths(sample, kind)
        if not 0 <= query < q:
            raise IndexError(f"query {query} out of range 0..{q - 1}")
        sel = slice(None) if head is None else head
        if self.store == S.STORE_ROWS:
            pos = self.row_positions(sample, kind)
            hit = np.flatnonzero(pos == query)
            if not hit.size:
                raise RecordingError(f"{self.path}: this recording stores only query rows (--store rows); query "
                                     f"{query} of sample {sample} is not one of them (stored: "
                                     f"{', '.join(map(str, pos.tolist()))})")
            return self._rows(kind)[sample, layer, sel, int(hit[0]), :k].astype(np.float32)
        self._need_maps("attention_query(...)")
        return self._maps(kind)[sample, layer, sel, query, :k].astype(np.float32)

    @_reads
    def row_positions(self, sample: int, kind: str | None = None) -> np.ndarray:
        """int64 ``[n]``: the query positions whose rows are stored for ``sample``, ascending: every position
        on a full recording, the stored ones on a ``--store rows`` recording, none on a summary."""
        self._check_sample(sample)
        if self.store == S.STORE_FULL:
            return np.arange(self.lengths(sample, kind)[0], dtype=np.int64)
        if self.store == S.STORE_SUMMARY:
            return np.zeros(0, np.int64)
        pos = self._group(kind)[S.ROW_POSITIONS][sample]
        return pos[pos >= 0].astype(np.int64)

    @_reads
    def attention_rows(self, sample: int, layer: int, head: int,
                       kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored query rows of one head's map, on a full or a ``--store rows`` recording.

        Returns:
            (positions int64 ``[n]``, rows float32 ``[n, key_pos]``): the query positions (ascending) and their
            rows, exactly as :meth:`attention` would give them (``attention(...)[positions]`` on a full file).

        Raises:
            RecordingError: a ``--store summary`` recording stores no rows.
        """
        self._check(sample, layer, head, kind)
        _, k = self.lengths(sample, kind)
        if self.store == S.STORE_FULL:
            m = self.attention(sample, layer, head, kind)
            return np.arange(m.shape[0], dtype=np.int64), m
        if self.store == S.STORE_SUMMARY:
            raise RecordingError(f"{self.path}: " + str(store_refusal(self, "attention_rows(...)",
                                                                    allowed=(S.STORE_FULL, S.STORE_ROWS))))
        raw = self._group(kind)[S.ROW_POSITIONS][sample]
        keep = raw >= 0
        rows = self._rows(kind)[sample, layer, head][keep, :k].astype(np.float32)
        return raw[keep].astype(np.int64), rows

    @_reads_iter
    def iter_rows(self, kind: str | None = None, *, samples: Sequence[int] | None = None,
                  batch_size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Stream the stored rows of a ``--store rows`` recording in batches of samples.

        Yields:
            (indices ``[b]``, positions int ``[b, row]`` (-1 = none), rows float16 ``[b, layer, head, row, key_pos]``).
        """
        if self.store != S.STORE_ROWS:
            raise RecordingError(f"{self.path}: iter_rows needs a --store rows recording; this one is "
                                 f"store={self.store!r}" + (" (use iter_attention)" if self.has_maps() else ""))
        rd, pd = self._rows(kind), self._group(kind)[S.ROW_POSITIONS]
        idx = self._sample_indices(samples)
        for j in idx:
            self._check_sample(int(j))
        yield from _batched(idx, max(1, batch_size), pd, rd)

    def _sample_indices(self, samples: Sequence[int] | None) -> np.ndarray:
        """int64 ``[n]``: the chosen samples in order (None: every written one)."""
        return np.arange(self.n_samples) if samples is None else np.asarray(samples, dtype=np.int64).reshape(-1)

    @_reads
    def lengths(self, sample: int, kind: str | None = None) -> tuple[int, int]:
        """Valid (query_len, key_len) of one sample (maps are padded to the longest sample)."""
        self._check_sample(sample)
        kind = kind or self.main_kind
        if kind not in self._lengths:  # [n_samples, 2] int32: small, read once
            self._lengths[kind] = self._group(kind)[S.LENGTHS][: self.n_samples]
        q, k = self._lengths[kind][sample]
        return int(q), int(k)

    @_reads_iter
    def iter_attention(self, kind: str | None = None, *, samples: Sequence[int] | None = None,
                       batch_size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream maps in batches so analyses never hold more than one batch.

        Yields:
            (indices ``[b]``, maps float16 ``[b, layer, head, max_query, max_key]``), padded; use
            :meth:`lengths` where lengths vary.
        """
        self._need_maps("iter_attention(...) (whole maps)")
        ds = self._maps(kind)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        idx = self._sample_indices(samples)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_samples):
            bad = idx[(idx < 0) | (idx >= self.n_samples)][0]
            raise IndexError(f"sample {bad} out of range 0..{self.n_samples - 1}")
        yield from _batched(idx, batch_size, ds)

    # -- query and key vectors (optional: `attnviz extract --store-qk`) ----------------------

    def has_qk(self, kind: str | None = None) -> bool:
        """True when the stack stores per-head query and key vectors (``--store-qk``)."""
        return S.QUERIES in self._group(kind)

    def qk_fraction(self, kind: str | None = None) -> float:
        """Fraction of each sample's token positions whose query/key vectors are stored (0: none)."""
        g = self._group(kind)
        return float(g.attrs.get(S.ATTR_QK_FRACTION, 0.0)) if S.QUERIES in g else 0.0

    @_reads
    def qk_positions(self, sample: int, kind: str | None = None) -> np.ndarray:
        """int ``[n]``: the token positions (in the maps' order) whose vectors are stored for ``sample``."""
        self._check_sample(sample)
        pos = self._qk_dataset(kind, S.QK_POSITIONS)[sample]
        return pos[pos >= 0].astype(np.int64)

    @_reads
    def queries_keys(self, sample: int, layer: int, head: int,
                     kind: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One head's stored vectors of one sample.

        Returns:
            (positions int ``[n]``, queries float32 ``[n, head_dim]``, keys float32 ``[n, head_dim]``): the
            outputs of the head's query and key projections (``q_h = W_Q,h x``, before the 1/sqrt(d) scale)
            at those token positions, so that ``softmax(q . k / sqrt(d))`` over all keys is the stored map.
        """
        self._check(sample, layer, head, kind)
        pos = self._qk_dataset(kind, S.QK_POSITIONS)[sample]
        keep = pos >= 0
        q = self._qk_dataset(kind, S.QUERIES)[sample, layer, head][keep].astype(np.float32)
        k = self._qk_dataset(kind, S.KEYS)[sample, layer, head][keep].astype(np.float32)
        return pos[keep].astype(np.int64), q, k

    @_reads_iter
    def iter_qk(self, kind: str | None = None, *, samples: Sequence[int] | None = None,
                batch_size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Stream the stored vectors in batches of samples.

        Yields:
            (indices ``[b]``, positions int ``[b, T]`` (-1 = none), queries and keys float16
            ``[b, layer, head, T, head_dim]``).
        """
        qd, kd, pd = (self._qk_dataset(kind, w) for w in (S.QUERIES, S.KEYS, S.QK_POSITIONS))
        idx = self._sample_indices(samples)
        for j in idx:
            self._check_sample(int(j))
        yield from _batched(idx, max(1, batch_size), pd, qd, kd)

    def _qk_dataset(self, kind: str | None, what: str) -> h5py.Dataset:
        g = self._group(kind)
        if what not in g:
            raise KeyError(f"the {kind or self.main_kind!r} attention of {self.path.name} stores no query/key "
                           "vectors; record with `attnviz extract --store-qk`")
        return g[what]

    # -- per-sample data -----------------------------------------------------------------

    @_reads
    def sample_ids(self) -> list[str]:
        """The stable id (normally the input's relative path) of each written sample."""
        return list(self._cached("sample_ids", lambda: [_str(s) for s in self._f[S.D_ID][: self.n_samples]]))

    @_reads
    def labels(self) -> np.ndarray:
        """int32 ``[n_samples]``; -1 where the input had no label."""
        return self._labels().copy()

    @_reads
    def predictions(self) -> np.ndarray:
        """int32 ``[n_samples]``: argmax of the logits; -1 where the model predicts no class
        (a backbone without a classification head)."""
        return self._predictions().copy()

    @property
    def has_labels(self) -> bool:
        return bool(self.n_samples) and bool((self._labels() >= 0).any())

    @property
    def has_predictions(self) -> bool:
        """False for a backbone without a classification head (every prediction is -1)."""
        return bool(self.n_samples) and bool((self._predictions() >= 0).any())

    @property
    def accuracy(self) -> float | None:
        """Fraction of labelled samples predicted right; None without labels or without predictions."""
        if not self.has_predictions:
            return None
        lab = self._labels()
        known = lab >= 0
        if not known.any():
            return None
        return float((self._predictions()[known] == lab[known]).mean())

    @_reads
    def logits(self, sample: int | slice | None = None) -> np.ndarray:
        """float32 ``[n_classes]`` for one sample, or ``[n, n_classes]``."""
        if sample is None:
            return self._f[S.D_LOGITS][: self.n_samples]
        if isinstance(sample, slice):
            start, stop, step = sample.indices(self.n_samples)
            if step > 0:
                return self._f[S.D_LOGITS][start:stop:step] if start < stop else self._f[S.D_LOGITS][0:0]
            return self._f[S.D_LOGITS][: self.n_samples][sample]
        self._check_sample(sample)
        return self._f[S.D_LOGITS][sample]

    @_reads
    def class_names(self) -> list[str]:
        """Class index -> name (empty for a model without classes)."""
        return list(self._cached("class_names", lambda: [_str(s) for s in self._f[S.D_CLASS_NAMES][()]]))

    @_reads
    def thumbnail(self, sample: int) -> np.ndarray:
        """uint8 ``[h, w, 3]``: the input as the model saw it (resized), for display."""
        self._check_sample(sample)
        return self._f[S.D_THUMBNAIL][sample]

    @property
    def has_masks(self) -> bool:
        return S.D_MASK in self._f

    @property
    def has_thumbnails(self) -> bool:
        """False for recordings of non-image inputs (a speech recording's clips have no thumbnail)."""
        return S.D_THUMBNAIL in self._f

    @_reads
    def mask(self, sample: int) -> np.ndarray | None:
        """uint8 ``[h, w]`` object mask (nonzero = object), or None when the recording has none."""
        self._check_sample(sample)
        return self._f[S.D_MASK][sample] if self.has_masks else None

    @_reads
    def meta(self, sample: int) -> dict[str, Any]:
        """Per-sample metadata (tokens, words, timings, prompts), {} when none."""
        self._check_sample(sample)
        if S.D_META not in self._f:
            return {}
        raw = self._f[S.D_META][sample]
        if not raw:
            return {}
        try:
            value = S.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RecordingError(f"{self.path}: /{S.D_META} of sample {sample} is not valid JSON (damaged)") from None
        return value if isinstance(value, dict) else {}

    @_reads
    def skipped(self) -> list[tuple[str, str]]:
        """Inputs the extraction skipped, as (path, reason)."""
        if S.D_SKIPPED not in self._f:
            return []
        out = []
        for s in self._f[S.D_SKIPPED][()]:
            p, _, r = _str(s).partition("\t")
            out.append((p, r))
        return out

    # -- attributions --------------------------------------------------------------------

    def attribution_methods(self) -> list[str]:
        return sorted(self._f[S.G_ATTRIBUTIONS].keys()) if S.G_ATTRIBUTIONS in self._f else []

    @_reads
    def attribution(self, sample: int, method: str) -> np.ndarray:
        """One sample's attribution as stored: ``[h, w]`` at pixel or patch resolution; ``[token, frame, mel]``
        ("spectrogram") or ``[token, encoder_frame]`` for speech, zero-padded (see :meth:`attribution_info`)."""
        ds = self._dataset(f"{S.G_ATTRIBUTIONS}/{method}", "attribution", self.attribution_methods())
        self._check_sample(sample)
        return ds[sample]

    def attribution_info(self, method: str) -> S.AttributionSpec:
        ds = self._dataset(f"{S.G_ATTRIBUTIONS}/{method}", "attribution", self.attribution_methods())
        return S.AttributionSpec(name=method, shape=tuple(ds.shape[1:]),
                                 resolution=_str(ds.attrs.get(S.ATTR_RESOLUTION, "pixel")),
                                 target=_str(ds.attrs.get(S.ATTR_TARGET, "predicted")),
                                 description=_str(ds.attrs.get(S.ATTR_DESCRIPTION, "")), dtype=str(ds.dtype))

    # -- per-sample arrays (family-specific: input features, per-token statistics) ----------

    def per_sample_arrays(self) -> list[str]:
        """Names of the per-sample arrays stored at ``per_sample/<name>``."""
        return sorted(self._f[S.G_PER_SAMPLE].keys()) if S.G_PER_SAMPLE in self._f else []

    @_reads
    def per_sample(self, name: str, sample: int) -> np.ndarray:
        """One sample's row of ``per_sample/<name>`` (its declared per-sample shape, zero-padded)."""
        ds = self._dataset(f"{S.G_PER_SAMPLE}/{name}", "per-sample array", self.per_sample_arrays())
        self._check_sample(sample)
        return ds[sample]

    def per_sample_info(self, name: str) -> S.PerSampleSpec:
        ds = self._dataset(f"{S.G_PER_SAMPLE}/{name}", "per-sample array", self.per_sample_arrays())
        axes = S.loads(ds.attrs.get(S.ATTR_AXES, "[]")) or []
        return S.PerSampleSpec(name=name, shape=tuple(ds.shape[1:]), dtype=str(ds.dtype), axes=tuple(axes),
                               description=_str(ds.attrs.get(S.ATTR_DESCRIPTION, "")))

    # -- head metrics --------------------------------------------------------------------

    def head_metrics(self) -> list[str]:
        """Names of the per-head metrics stored in the file."""
        return sorted(self._f[S.G_HEAD_METRICS].keys()) if S.G_HEAD_METRICS in self._f else []

    @_reads
    def head_metric(self, name: str) -> np.ndarray:
        """float32 ``[n_layers, n_heads]`` of the stack the metric was computed on."""
        return self._dataset(f"{S.G_HEAD_METRICS}/{name}", "head metric", self.head_metrics())[()].astype(np.float32)

    def head_metric_info(self, name: str) -> S.HeadMetricInfo:
        ds = self._dataset(f"{S.G_HEAD_METRICS}/{name}", "head metric", self.head_metrics())
        at = ds.attrs
        return S.HeadMetricInfo(
            name=name, kind=_str(at.get(S.ATTR_METRIC_KIND, self.main_kind)),
            definition=_str(at.get(S.ATTR_METRIC_DEFINITION, "")),
            citation=_str(at.get(S.ATTR_METRIC_CITATION, "")), units=_str(at.get(S.ATTR_METRIC_UNITS, "")),
            higher_is_more_important=bool(at.get(S.ATTR_METRIC_HIGHER, True)),
            params=S.loads(at.get(S.ATTR_METRIC_PARAMS, "{}")),
        )

    # -- analyses cache -------------------------------------------------------------------

    def analyses(self) -> list[str]:
        return sorted(self._f[S.G_ANALYSES].keys()) if S.G_ANALYSES in self._f else []

    def analysis_group(self, name: str) -> h5py.Group | None:
        """The cached group ``analyses/<name>`` (read-only) or None; see :mod:`attnviz.store.cache`."""
        key = f"{S.G_ANALYSES}/{name}"
        if key not in self._f or not isinstance(self._f[key], h5py.Group):
            return None
        g = self._f[key]
        raw = g.attrs.get(S.ATTR_ANALYSIS_PARAMS)
        if raw is not None:
            try:
                S.loads(raw)
            except (ValueError, TypeError, UnicodeDecodeError):
                return None  # damaged parameters: as absent (the cache rule), recomputed by `attnviz analyze`
        return g

    # -- sizes on disk -------------------------------------------------------------------

    def datasets(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        """Every dataset as (path, shape, dtype, bytes on disk)."""
        out: list[tuple[str, tuple[int, ...], str, int]] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out.append((name, tuple(obj.shape), str(obj.dtype), int(obj.id.get_storage_size())))

        self._f.visititems(visit)
        return out

    # -- plumbing ------------------------------------------------------------------------

    def _labels(self) -> np.ndarray:
        return self._cached("labels", lambda: self._f[S.D_LABEL][: self.n_samples])

    def _predictions(self) -> np.ndarray:
        return self._cached("predictions", lambda: self._f[S.D_PREDICTION][: self.n_samples])

    def _cached(self, key: str, make: Any) -> Any:
        """``make()`` once per open file (the internal copy; public methods return copies)."""
        if key not in self._small:
            self._small[key] = make()
        return self._small[key]

    @contextmanager
    def _for_update(self) -> Iterator[h5py.File]:
        """The file opened for update (r+) during the block, read-only again after it.

        HDF5 refuses to open a file for writing that this process holds open read-only, so the
        read handle is closed for the duration; h5py objects taken from :attr:`h5` before become
        invalid. Used by :mod:`attnviz.store.cache`.
        """
        if not self.complete:
            raise RecordingError(f"{self.path}: the recording is incomplete; finish it with "
                                 "`attnviz extract --resume` first")
        self._f.close()
        self._datasets.clear()
        try:
            f = h5py.File(self.path, "r+", locking=False, rdcc_nbytes=0)
        except OSError as e:
            self._f = _open_read(self.path)
            why = _first_line(e)
            hint = "; another handle of it is open in this process" if "already open" in why else ""
            raise RecordingError(f"{self.path}: cannot be opened for writing ({why}){hint}") from None
        try:
            yield f
        finally:
            f.close()
            self._f = _open_read(self.path)


    @property
    def h5(self) -> h5py.File:
        return self._f

    def _group(self, kind: str | None) -> h5py.Group:
        kind = kind or self.main_kind
        key = f"{S.G_ATTENTION}/{kind}"
        if key not in self._f:
            raise KeyError(f"this {self.family} recording has no {kind!r} attention; it has: {', '.join(self.kinds())}")
        return self._f[key]

    def _maps(self, kind: str | None) -> h5py.Dataset:
        kind = kind or self.main_kind
        if kind not in self._datasets:
            self._datasets[kind] = self._group(kind)[S.MAPS]
        return self._datasets[kind]

    def _rows(self, kind: str | None) -> h5py.Dataset:
        key = f"rows/{kind or self.main_kind}"
        if key not in self._datasets:
            self._datasets[key] = self._group(kind)[S.ROWS]
        return self._datasets[key]

    def _need_maps(self, what: str) -> None:
        problem = store_refusal(self, what)
        if problem:
            raise RecordingError(f"{self.path}: {problem}")

    def _check_sample(self, sample: int) -> None:
        if not 0 <= sample < self.n_samples:
            raise IndexError(f"sample {sample} out of range 0..{self.n_samples - 1}")

    def _check(self, sample: int, layer: int, head: int, kind: str | None) -> None:
        n_layers, n_heads = self.stack_shape(kind)
        self._check_sample(sample)
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range 0..{n_layers - 1}")
        if not 0 <= head < n_heads:
            raise IndexError(f"head {head} out of range 0..{n_heads - 1}")

    def _dataset(self, key: str, what: str, known: list[str]) -> h5py.Dataset:
        if key not in self._f:
            raise KeyError(f"no {what} {key.rsplit('/', 1)[-1]!r} in {self.path.name}; available: {', '.join(known) or 'none'}")
        return self._f[key]

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    @property
    def closed(self) -> bool:
        return not self._f.id.valid

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self.complete else f", incomplete {self.n_samples}/{self.n_planned}"
        return (f"<Recording {self.path.name}: {self.family} {self.model_name!r}, {self.n_samples} samples, "
                f"{self.n_layers}x{self.n_heads} heads{state}>")


def store_refusal(rec: Recording, what: str, allowed: Sequence[str] = (S.STORE_FULL,)) -> str | None:
    """One line saying why ``what`` (an analysis, a view, a read) cannot run on ``rec``'s store mode, or None
    when the mode is one of ``allowed``. The analyses and the dashboard say it instead of failing."""
    store = rec.store
    if store in allowed:
        return None
    needs = "full maps" if S.STORE_ROWS not in allowed else "attention rows (--store rows or full)"
    if store == S.STORE_ROWS:
        return f"this recording stores only query rows (--store rows): {what} needs {needs}"
    return (f"this recording stores no attention maps, only per-head summaries (--store summary): {what} "
            f"needs {needs}")


def _batched(idx: np.ndarray, batch_size: int, *datasets: h5py.Dataset) -> Iterator[tuple[np.ndarray, ...]]:
    """``(chunk, *rows)`` per ``batch_size`` samples of ``idx``: each dataset's rows of those samples, read as one
    slice when the samples are consecutive (one HDF5 read per dataset), else sample by sample."""
    for i in range(0, len(idx), batch_size):
        chunk = idx[i : i + batch_size]
        if np.all(np.diff(chunk) == 1):
            sl = slice(int(chunk[0]), int(chunk[-1]) + 1)
            yield (chunk, *(d[sl] for d in datasets))
        else:
            yield (chunk, *(np.stack([d[int(j)] for j in chunk]) for d in datasets))


def _open_read(path: Path) -> h5py.File:
    """Read-only, without file locking (a dashboard reads while ``attnviz analyze`` adds results). A file
    that a writer holds open (an extraction, or ``--resume``, in single-writer/multiple-reader mode) is
    opened in SWMR read mode, so that it shows a consistent prefix of done samples while the writer
    appends. Every other file is opened plainly: an SWMR reader retries every metadata read that fails its
    checksum (it may be half-written), which on a damaged file means waiting instead of failing."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if "already open for write" not in str(e):
            raise
    return h5py.File(path, "r", locking=False, swmr=True)


def _str(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _text(v: Any, strict: bool = False) -> str | None:
    """An attribute as text; with ``strict``, None unless it is a string (str, bytes, or a string scalar)."""
    if isinstance(v, (str, bytes)):
        return _str(v)
    if isinstance(v, np.generic) and v.dtype.kind in "SUO":
        return _str(v.item())
    if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "SUO":
        return _str(v.item())
    return None if strict else _str(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _integer(v: Any) -> int | None:
    """An attribute that must be an integer (or a boolean, stored as one): its value, else None."""
    if isinstance(v, np.ndarray):
        if v.shape != () and v.size != 1:
            return None
        v = v.reshape(()).item()
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
