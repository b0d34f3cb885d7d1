"""The recording format: names, versions and the small typed records that describe a file.

This module is the single source of truth for every name that appears in an attnviz HDF5 file;
``docs/file-format.md`` is its prose version. Writer, reader and validation import the names from
here, never type them again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FAMILIES",
    "FAMILY_KINDS",
    "MAIN_KIND",
    "STORE_MODES",
    "PARTIAL_SUFFIX",
    "TokenLayout",
    "StackSpec",
    "AttributionSpec",
    "PerSampleSpec",
    "HeadMetricInfo",
    "dumps",
    "loads",
]

FORMAT_NAME = "attnviz-recording"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
# Oldest HDF5 file-format bound the writer uses: files stay readable by HDF5 >= 1.10 (h5py's
# libver "latest" would tie them to the HDF5 version that wrote them).
HDF5_LIBVER_LOW = "v110"
COMPRESSIONS = ("lzf", "gzip", "none")
# Root attribute target_source: what accuracy-type metrics treat as the truth.
TARGET_SOURCES = ("label", "prediction")
# attributions/<name> attribute resolution: image attributions per pixel or per patch; speech saliency
# per (token, feature frame, mel bin) of the input spectrogram or per (token, encoder frame).
RESOLUTIONS = ("pixel", "patch", "spectrogram", "encoder_frame")

# Families and the attention kinds each records. The first kind listed for a family is the one
# `Recording.attention(...)` uses by default when the caller names none.
FAMILIES = ("vit", "s2t", "lvlm")
FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "vit": ("self",),
    # s2t: "self" = encoder self-attention (frames x frames), "decoder_self" (tokens x tokens),
    # "cross" (tokens x frames).
    "s2t": ("cross", "self", "decoder_self"),
    # lvlm: "self" = language-model self-attention (tokens x tokens), "vision" = vision tower.
    "lvlm": ("self", "vision"),
}
# The family's main stack: what rec.n_layers / rec.n_heads describe.
MAIN_KIND: dict[str, str] = {"vit": "self", "s2t": "cross", "lvlm": "self"}
# Families whose inputs are images: samples/thumbnail is REQUIRED for them.
THUMBNAIL_FAMILIES = ("vit", "lvlm")

# Root attributes (all REQUIRED).
ATTR_FORMAT = "format"
ATTR_VERSION = "format_version"
ATTR_FAMILY = "family"
ATTR_MODEL_NAME = "model_name"
ATTR_MODEL_CLASS = "model_class"
ATTR_CREATED = "created"
ATTR_COMPLETE = "complete"
ATTR_N_SAMPLES = "n_samples"
ATTR_N_LAYERS = "n_layers"
ATTR_N_HEADS = "n_heads"
ATTR_MAIN_KIND = "main_kind"
ATTR_PRODUCER = "producer"
ATTR_BATCH_SIZE = "batch_size"
ATTR_PARAMS = "extraction_params"
ATTR_TARGET_SOURCE = "target_source"
# What produced the recording (model class, config/weights/processing hashes), JSON; --resume compares it.
ATTR_MODEL_FINGERPRINT = "model_fingerprint"
# A shard of a distributed extraction (torchrun): its index, the number of shards, its first sample's
# index in the whole recording (attnviz merge joins them).
ATTR_SHARD_INDEX = "shard_index"
ATTR_SHARD_COUNT = "shard_count"
ATTR_SHARD_OFFSET = "shard_offset"
# What the attention stacks hold (`attnviz extract --store`): "full" every map, "rows" only chosen query rows of
# every map, "summary" no maps at all (per-head summaries only). Absent = "full" (files written before it).
ATTR_STORE = "store"
STORE_FULL = "full"
STORE_ROWS = "rows"
STORE_SUMMARY = "summary"
STORE_MODES = (STORE_FULL, STORE_ROWS, STORE_SUMMARY)

# Groups and datasets.
G_SAMPLES = "samples"
D_ID = "samples/id"
D_DONE = "samples/done"
D_LABEL = "samples/label"
D_PREDICTION = "samples/prediction"
D_LOGITS = "samples/logits"
D_THUMBNAIL = "samples/thumbnail"
D_MASK = "samples/mask"
D_META = "samples/meta"
G_MODEL = "model"
D_CLASS_NAMES = "model/class_names"
G_ATTENTION = "attention"
MAPS = "maps"
LENGTHS = "lengths"
# Optional per-head query and key vectors of a stack (`--store-qk`), for the joint query-key view.
QUERIES = "queries"
KEYS = "keys"
QK_POSITIONS = "qk_positions"
# --store rows: the stored query rows of every head's map [sample, layer, head, row, key_pos] and their query
# positions [sample, row] (-1 = padding).
ROWS = "rows"
ROW_POSITIONS = "row_positions"
G_ATTRIBUTIONS = "attributions"
G_HEAD_METRICS = "head_metrics"
# Per-sample arrays a family records besides the maps (input features, per-token statistics), each
# [sample, ...]; attributes description and axes (JSON list of axis names).
G_PER_SAMPLE = "per_sample"
ATTR_AXES = "axes"
G_ANALYSES = "analyses"
D_SKIPPED = "inputs/skipped"

# What the axes of a stack's maps index (TokenLayout.query_axis / key_axis). "answer_steps": row j is the
# position that generates answer token j (an lvlm recording made with --answer-rows-only).
KEY_AXES = ("tokens", "frames")
ANSWER_STEPS = "answer_steps"
QUERY_AXES = KEY_AXES + (ANSWER_STEPS,)

# Attributes of attention/<kind> groups.
ATTR_STACK_N_LAYERS = "n_layers"
ATTR_STACK_N_HEADS = "n_heads"
ATTR_LAYOUT = "layout"
# Attribute of attention/<kind> groups that store query/key vectors: the fraction of token positions kept.
ATTR_QK_FRACTION = "qk_fraction"
# Attribute of attention/<kind> groups without maps (--store rows|summary): [max_query, max_key], the size the
# maps would have had (lengths lie within it).
ATTR_MAX_LENGTHS = "max_lengths"
# Per-sample per-head statistics (--store rows|summary): per_sample/head_<stat> float64 [sample, layer, head],
# the sample's mean over its query positions, so head statistics can be recomputed (resume, --max-samples)
# without the maps.
HEAD_STAT_PREFIX = "head_"
# Attributes of attributions/<name>.
ATTR_RESOLUTION = "resolution"
ATTR_TARGET = "target"
ATTR_DESCRIPTION = "description"
# Attribute of /model.
ATTR_MODEL_CONFIG = "config"
# Attributes of head_metrics/<name>.
ATTR_METRIC_KIND = "kind"
ATTR_METRIC_DEFINITION = "definition"
ATTR_METRIC_CITATION = "citation"
ATTR_METRIC_UNITS = "units"
ATTR_METRIC_HIGHER = "higher_is_more_important"
ATTR_METRIC_PARAMS = "params"
# Attributes of analyses/<name>.
ATTR_ANALYSIS_PARAMS = "params"
ATTR_ANALYSIS_CREATED = "created"

REQUIRED_ROOT_ATTRS = (
    ATTR_FORMAT,
    ATTR_VERSION,
    ATTR_FAMILY,
    ATTR_MODEL_NAME,
    ATTR_CREATED,
    ATTR_COMPLETE,
    ATTR_N_SAMPLES,
    ATTR_N_LAYERS,
    ATTR_N_HEADS,
    ATTR_MAIN_KIND,
)
REQUIRED_DATASETS = (D_ID, D_DONE, D_LABEL, D_PREDICTION, D_LOGITS, D_CLASS_NAMES)


def maps_path(kind: str) -> str:
    """Path of the attention maps of one kind: ``attention/<kind>/maps``."""
    return f"{G_ATTENTION}/{kind}/{MAPS}"


def lengths_path(kind: str) -> str:
    """Path of the per-sample valid (query_len, key_len) of one kind."""
    return f"{G_ATTENTION}/{kind}/{LENGTHS}"


def qk_path(kind: str, what: str) -> str:
    """Path of a stack's stored query/key data: ``attention/<kind>/{queries,keys,qk_positions}``."""
    if what not in (QUERIES, KEYS, QK_POSITIONS):
        raise ValueError(f"what must be {QUERIES}, {KEYS} or {QK_POSITIONS}, got {what!r}")
    return f"{G_ATTENTION}/{kind}/{what}"


def rows_path(kind: str, what: str = ROWS) -> str:
    """Path of a stack's stored query rows (``--store rows``): ``attention/<kind>/{rows,row_positions}``."""
    if what not in (ROWS, ROW_POSITIONS):
        raise ValueError(f"what must be {ROWS} or {ROW_POSITIONS}, got {what!r}")
    return f"{G_ATTENTION}/{kind}/{what}"


def head_stat_name(stat: str) -> str:
    """The per-sample array holding one head statistic per sample (``--store rows|summary``)."""
    return f"{HEAD_STAT_PREFIX}{stat}"


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second: the ``created`` attributes.

    Honours ``SOURCE_DATE_EPOCH`` (seconds since 1970, the reproducible-builds convention), so a
    builder can make byte-identical files (``scripts/make_golden_file.py``).
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def dumps(obj: Any) -> str:
    """JSON for attributes (sorted keys so equal parameters give equal strings)."""
    return json.dumps(obj, sort_keys=True, default=_json_default)


def loads(text: str | bytes | None) -> Any:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    return json.loads(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one attention kind map onto the input.

    A sequence is ``n_prefix`` prefix tokens (CLS, distillation, registers, ... named in
    ``prefix_names``) followed by ``grid[0] * grid[1]`` patch tokens in row-major order, for
    patch stacks; ``grid`` is None for token or frame axes (text, audio).

    Attributes:
        n_prefix: number of prefix tokens before the patches (ViT: 1 for CLS).
        prefix_names: one name per prefix token, e.g. ``("cls",)`` or ``("cls", "distillation")``.
        grid: (grid_h, grid_w) patches, or None.
        patch_size: (patch_h, patch_w) in input pixels, or None.
        image_size: (height, width) of the model input in pixels, or None.
        query_axis / key_axis: what the rows / columns of a map index: "tokens" or "frames"; a query
            axis may also be "answer_steps": row j is the position that generates answer token j (an
            lvlm recording made with --answer-rows-only).
        image_span: (start, stop) token positions of the image tokens on a token axis, when they are
            the same for every sample (an lvlm language model with a fixed chat template), else None.
    """

    n_prefix: int = 0
    prefix_names: tuple[str, ...] = ()
    grid: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    query_axis: str = "tokens"
    key_axis: str = "tokens"
    image_span: tuple[int, int] | None = None

    @property
    def n_patches(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int | None:
        """Total sequence length for patch stacks (prefix + patches); None for variable axes."""
        return None if self.grid is None else self.n_prefix + self.n_patches

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> TokenLayout:
        """Parse a stored layout; keys this version does not know are ignored (forward compatible)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in loads(text).items() if k in known}
        for key in ("grid", "patch_size", "image_size", "image_span"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        d["prefix_names"] = tuple(d.get("prefix_names", ()))
        return cls(**d)


@dataclass(frozen=True)
class StackSpec:
    """One attention stack in a recording: ``maps`` has shape
    ``(n_samples, n_layers, n_heads, max_query, max_key)``.

    ``qk_tokens`` > 0 also stores that many positions' query and key vectors of every head
    (``head_dim`` wide; ``qk_fraction`` of the positions were chosen), see ``docs/file-format.md``.

    ``rows`` is the number of query rows per sample a ``--store rows`` recording keeps of each map (the
    writer's ``store`` says whether maps, rows or neither are allocated).
    """

    kind: str
    n_layers: int
    n_heads: int
    max_query: int
    max_key: int
    layout: TokenLayout = field(default_factory=TokenLayout)
    qk_tokens: int = 0
    head_dim: int = 0
    qk_fraction: float = 0.0
    rows: int = 0


@dataclass(frozen=True)
class AttributionSpec:
    """One stored feature attribution: ``attributions/<name>`` of shape (n_samples, *shape).

    Attributes:
        name: registry name, e.g. "saliency", "integrated_gradients", "occlusion", "rollout".
        shape: per-sample shape, (height, width) at pixel or patch resolution; (token, frame, mel) for
            "spectrogram", (token, encoder_frame) for "encoder_frame" (the largest one for variable sizes:
            smaller rows are zero-padded).
        resolution: "pixel" (model input pixels), "patch" (the patch grid), "spectrogram" (a speech model's
            input features) or "encoder_frame" (a speech encoder's output frames).
        target: what the attribution explains: "predicted" or "label" (a class), a backbone's embedding
            target, or a speech model's per-token target ("token_logprob", "token_distribution").
        description: one line: the method, its library, its parameters.
        dtype: stored dtype, "float32" (default) or "float16" (large speech saliency).
    """

    name: str
    shape: tuple[int, ...]
    resolution: str
    target: str = "predicted"
    description: str = ""
    dtype: str = "float32"


@dataclass(frozen=True)
class PerSampleSpec:
    """One per-sample array ``per_sample/<name>`` of shape (n_samples, *shape).

    Attributes:
        name: dataset name (lowercase, ``[a-z0-9_]``).
        shape: per-sample shape (the largest one for variable sizes: smaller rows are zero-padded).
        dtype: numpy dtype name, e.g. "float16", "float32", "int32".
        axes: a name per per-sample axis, e.g. ("mel", "frame").
        description: one line: what it holds and its units.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    axes: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class HeadMetricInfo:
    """Description of a per-head metric stored at ``head_metrics/<name>`` (shape (L, H) of its stack)."""

    name: str
    kind: str = "self"
    definition: str = ""
    citation: str = ""
    units: str = ""
    higher_is_more_important: bool = True
    params: dict[str, Any] = field(default_factory=dict)
