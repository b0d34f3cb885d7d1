"""The files the dashboard may open, and the open recordings.

Only the files given to :func:`attnviz.app.create_app` can be opened: callbacks name a file by its
*key* (an opaque short string, not a path), and a key that is not registered is refused with
:class:`UnknownFileError`. A crafted callback value naming a path on disk is therefore never opened.

Recordings are opened lazily and cached per key. Each access checks the file on disk (one
``stat``): a file deleted or replaced while the server runs gives a clear
:class:`~attnviz.errors.RecordingError` (or is reopened when it was rewritten, e.g. by
``attnviz analyze`` adding head metrics), and a file that fails to open never stops the others.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from attnviz.errors import AttnvizError, InputError, RecordingError
from attnviz.store.reader import Recording

__all__ = [
    "FileEntry",
    "FileStatus",
    "FileRegistry",
    "UnknownFileError",
    "expand_paths",
    "set_active_registry",
    "get_registry",
    "get_recording",
    "file_status",
]


class UnknownFileError(AttnvizError):
    """A callback named a file that the dashboard was not given."""


@dataclass(frozen=True)
class FileEntry:
    key: str
    path: Path
    label: str


@dataclass(frozen=True)
class FileStatus:
    """What the banner says about one file. ``ok`` False: ``message`` says why it cannot be shown."""

    key: str
    label: str
    ok: bool
    message: str = ""
    n_samples: int = 0
    n_planned: int = 0
    complete: bool = True

    @property
    def banner(self) -> str:
        """One line for the page banner; empty when there is nothing to say."""
        if not self.ok:
            return self.message
        if not self.complete:
            return (f"{self.label} is incomplete (an interrupted extraction): {self.n_samples} of "
                    f"{self.n_planned} samples are there; shown read-only. "
                    f"Finish it with `attnviz extract --resume`.")
        return ""


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders replaced by the ``*.h5`` files in them (sorted).

    Raises:
        InputError: a path does not exist, or a folder holds no ``.h5`` file.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.h5"))
            if not found:
                raise InputError(f"{p}: no .h5 recordings in this folder")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


class FileRegistry:
    """The fixed set of recordings a dashboard serves, opened lazily and cached.

    Args:
        paths: recording files (folders are expanded to their ``*.h5``).
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        files = expand_paths(paths)
        if not files:
            raise InputError("no recordings to show: give one or more .h5 files or folders")
        self._entries: dict[str, FileEntry] = {}
        seen_paths: set[Path] = set()
        for p in files:
            rp = p.resolve()
            if rp in seen_paths:
                continue
            seen_paths.add(rp)
            key = p.name
            n = 2
            while key in self._entries:
                key = f"{p.name}~{n}"
                n += 1
            self._entries[key] = FileEntry(key=key, path=rp, label=key)
        self._open: dict[str, tuple[Recording, tuple[int, int, int]]] = {}
        self._lock = threading.RLock()

    # -- lookup -------------------------------------------------------------------------------

    @property
    def entries(self) -> list[FileEntry]:
        return list(self._entries.values())

    def keys(self) -> list[str]:
        return list(self._entries)

    def entry(self, key: object) -> FileEntry:
        """The registered file of ``key``; anything else (a path, a made-up key) is refused."""
        if not isinstance(key, str) or key not in self._entries:
            raise UnknownFileError(f"unknown file {str(key)[:80]!r}: this dashboard serves only the files it was started with")
        return self._entries[key]

    def default_key(self) -> str:
        """The first file that opens, else the first file."""
        for key in self._entries:
            if self.status(key).ok:
                return key
        return next(iter(self._entries))

    # -- opening ------------------------------------------------------------------------------

    def get(self, key: str) -> Recording:
        """The open recording of ``key`` (cached; reopened if the file changed on disk).

        Raises:
            UnknownFileError: ``key`` is not one of the given files.
            RecordingError: the file is gone, unreadable, not a recording, another version, ...
        """
        entry = self.entry(key)
        with self._lock:
            try:
                st = os.stat(entry.path)
            except FileNotFoundError:
                self._drop(key)
                raise RecordingError(f"{entry.label}: the file was deleted or moved while the dashboard was running "
                                     f"({entry.path})") from None
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._open.get(key)
            if cached is not None and cached[1] == sig and not cached[0].closed:
                return cached[0]
            self._drop(key)
            rec = Recording(entry.path)
            self._open[key] = (rec, sig)
            return rec

    def status(self, key: str) -> FileStatus:
        """Whether ``key`` opens, and how complete it is (never raises for a registered key)."""
        entry = self.entry(key)
        try:
            rec = self.get(key)
            return FileStatus(key=key, label=entry.label, ok=True, n_samples=rec.n_samples,
                              n_planned=rec.n_planned, complete=rec.complete)
        except AttnvizError as e:
            return FileStatus(key=key, label=entry.label, ok=False, message=str(e))
        except OSError as e:  # damaged on disk after opening
            self._drop(key)
            return FileStatus(key=key, label=entry.label, ok=False, message=f"{entry.label}: cannot be read ({e})")

    def _drop(self, key: str) -> None:
        cached = self._open.pop(key, None)
        if cached is not None:
            try:
                cached[0].close()
            except Exception:  # noqa: BLE001 - closing a broken handle must not hide the real error
                pass

    def close(self) -> None:
        with self._lock:
            for key in list(self._open):
                self._drop(key)


# -- the registry of the running app -----------------------------------------------------------
# Dash pages register callbacks globally (dash.callback), so callbacks find the registry here.
# create_app() sets it; tests that call callbacks as plain functions get it the same way.

_ACTIVE: FileRegistry | None = None


def set_active_registry(registry: FileRegistry | None) -> None:
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE is not registry:
        _ACTIVE.close()
    _ACTIVE = registry


def get_registry() -> FileRegistry:
    if _ACTIVE is None:
        raise RuntimeError("no dashboard is running: call attnviz.app.create_app(files) first")
    return _ACTIVE


def get_recording(file_key: str) -> Recording:
    """The open :class:`~attnviz.store.reader.Recording` of a registered file key (cached).

    Raises:
        UnknownFileError, RecordingError: see :meth:`FileRegistry.get`.
    """
    return get_registry().get(file_key)


def file_status(file_key: str) -> FileStatus:
    return get_registry().status(file_key)
