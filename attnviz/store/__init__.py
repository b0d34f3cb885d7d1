"""The HDF5 recording format: schema (the contract), writer, lazy reader, cache of derived results.

See ``docs/file-format.md`` for the specification.
"""

from __future__ import annotations

from attnviz.store.cache import load_analysis, save_analysis, write_head_metric
from attnviz.store.reader import Recording, open, store_refusal
from attnviz.store.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    AttributionSpec,
    HeadMetricInfo,
    StackSpec,
    TokenLayout,
)
from attnviz.store.writer import RecordingWriter, SampleBatch, check_output_path, partial_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AttributionSpec",
    "HeadMetricInfo",
    "Recording",
    "RecordingWriter",
    "SampleBatch",
    "StackSpec",
    "TokenLayout",
    "check_output_path",
    "load_analysis",
    "open",
    "partial_path",
    "save_analysis",
    "store_refusal",
    "write_head_metric",
]
