"""Errors that attnviz reports to the user as one line (``error: ...``, exit code 2)."""

from __future__ import annotations

__all__ = ["AttnvizError", "RecordingError", "InputError", "ModelError", "DiskFullError"]


class AttnvizError(Exception):
    """Base of every error the CLI turns into one ``error: ...`` line (exit code 2, no traceback).

    The message must be a single line that says what is wrong and, where possible, what to do.
    """


class RecordingError(AttnvizError):
    """A recording (HDF5 file) cannot be opened, is of another format/version, or is damaged."""


class InputError(AttnvizError):
    """Bad user input: missing or unreadable input files, bad manifests, bad options, bad paths."""


class ModelError(AttnvizError):
    """A model cannot be found, loaded or is not supported by any adapter."""


class DiskFullError(RecordingError):
    """The output's file system is full (or refuses writes): what is finished is kept for ``--resume``."""
