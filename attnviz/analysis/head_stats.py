"""Basic per-head attention statistics: entropy, confidence, attention to prefix tokens (CLS).

For one head, one input and one query position ``q`` with attention row ``a = A[q, :]``
(a probability distribution over the key positions ``k``; rows sum to 1):

* ``entropy``: attention entropy in nats, ``H(a) = -sum_k a_k log a_k`` (with ``0 log 0 = 0``).
  0 when the query attends to a single key; ``log(n_keys)`` for uniform attention.
  (Shannon entropy of the attention distribution, as used for heads by e.g. Clark et al. 2019,
  "What Does BERT Look At?", BlackboxNLP, Sec. 3.3.)
* ``confidence``: the largest weight, ``max_k a_k``; 1 for one-hot attention, ``1/n_keys`` for
  uniform. (Voita et al. 2019, "Analyzing Multi-Head Self-Attention: Specialized Heads Do the
  Heavy Lifting, the Rest Can Be Pruned", ACL, Sec. 4.1: "the average of its maximum attention
  weight excluding the end of sentence symbol"; here no token is excluded.)
* ``cls_attention``: the mass on the prefix tokens (CLS, distillation, registers: the first
  ``layout.n_prefix`` keys), ``sum_{k < n_prefix} a_k``; only for stacks with prefix tokens.

Each statistic is averaged over every valid query position of every sample (each (sample, query)
pair weighs the same), giving float ``[n_layers, n_heads]``. Computed by streaming over samples
with :meth:`Recording.iter_attention` (one batch in memory), in float64 accumulators.

A recording without maps (``attnviz extract --store rows|summary``) gets them from the full maps while they
are in memory during the extraction, and keeps each sample's own means (``per_sample/head_<stat>``), so
that they can be recomputed from the file (``attnviz analyze``, ``--resume``, ``--max-samples``).
"""

from __future__ import annotations

import functools

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnviz.store.reader import Recording
from attnviz.store.schema import HeadMetricInfo

__all__ = [
    "HeadStats",
    "HeadStatsAccumulator",
    "store_head_stats",
    "METRIC_INFO",
    "STAT_NAMES",
    "map_stats",
    "compute_head_stats",
    "compute_and_store",
]

STAT_NAMES = ("entropy", "confidence", "cls_attention")

_CLARK = ("Clark, Khandelwal, Levy & Manning (2019), What Does BERT Look At? An Analysis of BERT's Attention, "
          "BlackboxNLP, Sec. 3.3")
_VOITA = ("Voita, Talbot, Moiseev, Sennrich & Titov (2019), Analyzing Multi-Head Self-Attention: Specialized Heads "
          "Do the Heavy Lifting, the Rest Can Be Pruned, ACL, Sec. 4.1")

METRIC_INFO: dict[str, HeadMetricInfo] = {
    "entropy": HeadMetricInfo(
        name="entropy", definition="mean over samples and query positions of -sum_k a_qk log a_qk (nats)",
        citation=_CLARK, units="nats", higher_is_more_important=False),
    "confidence": HeadMetricInfo(
        name="confidence", definition="mean over samples and query positions of max_k a_qk",
        citation=_VOITA, units="", higher_is_more_important=True),
    "cls_attention": HeadMetricInfo(
        name="cls_attention",
        definition="mean over samples and query positions of sum_{k < n_prefix} a_qk (mass on CLS/prefix tokens)",
        citation="attention to the [CLS] token as in Clark et al. (2019), Sec. 3.2", units="",
        higher_is_more_important=True),
}


@dataclass(frozen=True)
class HeadStats:
    """Per-head statistics of one attention stack, each float64 ``[n_layers, n_heads]``.

    ``cls_attention`` is None for a stack without prefix tokens. ``n_samples`` samples were used.
    """

    kind: str
    entropy: np.ndarray
    confidence: np.ndarray
    cls_attention: np.ndarray | None
    n_samples: int

    def as_dict(self) -> dict[str, np.ndarray]:
        d = {"entropy": self.entropy, "confidence": self.confidence}
        if self.cls_attention is not None:
            d["cls_attention"] = self.cls_attention
        return d


def map_stats(maps: np.ndarray, n_prefix: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query statistics of attention maps.

    Args:
        maps: float ``[..., query_pos, key_pos]``, rows summing to 1.
        n_prefix: number of prefix keys (CLS, ...) whose mass is ``cls_attention``.

    Returns:
        ``(entropy, confidence, prefix_mass)``, each float64 ``[..., query_pos]``.
    """
    a = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    entropy = -plogp.sum(axis=-1)
    confidence = a.max(axis=-1)
    prefix = a[..., :n_prefix].sum(axis=-1) if n_prefix else np.zeros(a.shape[:-1])
    return entropy, confidence, prefix


@functools.lru_cache(maxsize=1)
def _float16_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every float16 bit pattern: ``-x log x`` (0 for x <= 0, as :func:`compute_head_stats` clips) and
    ``max(x, 0)`` (NaN kept), float32 ``[65536]``."""
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = x > 0
        plogp = np.where(positive & np.isfinite(x), -x * np.log(np.where(positive, x, 1.0)), 0.0)
        value = np.where(positive | np.isnan(x), x, 0.0)
        return plogp.astype(np.float32), value.astype(np.float32)


class HeadStatsAccumulator:
    """The statistics of :func:`compute_head_stats` accumulated batch by batch from maps in memory (the
    extractor feeds it while it records, so nothing is read back from disk). Sums and counts only: two
    accumulators over disjoint samples :meth:`merge` into the one over both (shards, ranks).

    Args:
        kind: the stack; n_layers / n_heads its shape; n_prefix its prefix tokens.
    """

    def __init__(self, kind: str, n_layers: int, n_heads: int, n_prefix: int) -> None:
        self.kind, self.n_prefix = kind, n_prefix
        self.sums = np.zeros((3, n_layers, n_heads), np.float64)
        self.n_queries = 0
        self.n_samples = 0

    def add(self, maps: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """One batch: maps float ``[batch, layer, head, query_pos, key_pos]`` (padded), lengths int
        ``[batch, 2]`` valid (query_len, key_len) or None for fixed-size maps.

        Returns:
            float64 ``[batch, stat, layer, head]``: each sample's own statistics (means over its query positions,
            stats in :data:`STAT_NAMES` order; cls_attention 0 without prefix tokens), what a ``--store rows`` or
            ``summary`` recording keeps per sample (``per_sample/head_<stat>``) to recompute the means later.
        """
        maps = np.asarray(maps)
        per_sample = np.zeros((maps.shape[0], *self.sums.shape), np.float64)
        for j in range(maps.shape[0]):
            q, k = (maps.shape[-2], maps.shape[-1]) if lengths is None else (int(lengths[j][0]), int(lengths[j][1]))
            sums = per_sample[j]
            if maps.dtype == np.float16:
                self._add_float16(maps[j, :, :, :q, :k], sums)
            else:
                for layer in range(maps.shape[1]):
                    # float32 here: the sums are float64; one layer at a time keeps the temporaries small
                    a = np.clip(maps[j, layer, :, :q, :k].astype(np.float32), 0.0, None)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
                    sums[0, layer] = -plogp.sum((-1, -2), dtype=np.float64)
                    sums[1, layer] = a.max(-1).sum(-1, dtype=np.float64)
                    if self.n_prefix:
                        sums[2, layer] = a[..., : self.n_prefix].sum((-1, -2), dtype=np.float64)
            self.sums += sums  # one addition per sample and element: the same sums as summing layer by layer
            self.n_queries += q
            self.n_samples += 1
            sums /= max(q, 1)
        return per_sample

    def _add_float16(self, a: np.ndarray, sums: np.ndarray) -> None:
        """One sample's float16 maps ``[layer, head, q, k]`` (what the extractor records) into ``sums``
        ``[stat, layer, head]``, without converting them: float16 has 65,536 values, so ``-a log a`` is a
        table look-up by bit pattern (the table computed once in float64, exact for every float16), and
        for non-negative float16 the bit patterns as int16 are ordered as the values, so the row maximum is
        an integer maximum. About 3x less CPU than the float32 path on ViT-sized maps (measured: 22-35 vs
        72-90 ms per 12 x 12 x 197 x 197 sample), which matters because it runs beside the forward."""
        plogp, value = _float16_tables()
        bits = a.view(np.uint16)
        # mode="wrap": no bounds check (every uint16 is an index of the 65,536-entry tables)
        sums[0] = np.take(plogp, bits, mode="wrap").sum((-1, -2), dtype=np.float64)
        row_max = a.view(np.int16).max(-1).view(np.uint16)  # negative values (sign bit) lose to any >= 0
        sums[1] = np.take(value, row_max, mode="wrap").sum(-1, dtype=np.float64)
        if self.n_prefix:
            sums[2] = np.clip(a[..., : self.n_prefix].astype(np.float32), 0.0, None).sum((-1, -2), dtype=np.float64)

    def merge(self, other: HeadStatsAccumulator) -> HeadStatsAccumulator:
        self.sums += other.sums
        self.n_queries += other.n_queries
        self.n_samples += other.n_samples
        return self

    def result(self) -> HeadStats:
        n_layers, n_heads = self.sums.shape[1:]
        if self.n_queries == 0:
            nan = np.full((n_layers, n_heads), np.nan)
            return HeadStats(self.kind, nan, nan.copy(), nan.copy() if self.n_prefix else None, 0)
        mean = self.sums / self.n_queries
        return HeadStats(kind=self.kind, entropy=mean[0], confidence=mean[1],
                         cls_attention=mean[2] if self.n_prefix else None, n_samples=self.n_samples)


def compute_head_stats(rec: Recording, kind: str | None = None, *, max_samples: int | None = None,
                       batch_size: int = 4) -> HeadStats:
    """Stream over the (first ``max_samples``) samples and average the statistics per head.

    Args:
        rec: an open recording.
        kind: attention kind (default: the recording's main kind).
        max_samples: use only the first N samples (None: all written samples).
        batch_size: samples read per HDF5 read.

    Returns:
        :class:`HeadStats` of shape ``[n_layers, n_heads]`` of that stack.
    """
    kind = kind or rec.main_kind
    n_layers, n_heads = rec.stack_shape(kind)
    n_prefix = rec.layout(kind).n_prefix
    n = rec.n_samples if max_samples is None else min(rec.n_samples, max(0, int(max_samples)))
    if not rec.has_maps():
        return _from_per_sample(rec, kind, n, n_prefix)
    sums = np.zeros((3, n_layers, n_heads), np.float64)
    n_queries = 0
    for idx, batch in rec.iter_attention(kind, samples=np.arange(n), batch_size=batch_size):
        for j, s in enumerate(idx):
            q, k = rec.lengths(int(s), kind)
            for layer in range(n_layers):  # one layer at a time keeps float64 copies small
                ent, conf, pre = map_stats(batch[j, layer, :, :q, :k], n_prefix)
                sums[0, layer] += ent.sum(-1)
                sums[1, layer] += conf.sum(-1)
                sums[2, layer] += pre.sum(-1)
            n_queries += q
    if n_queries == 0:
        nan = np.full((n_layers, n_heads), np.nan)
        return HeadStats(kind, nan, nan.copy(), nan.copy() if n_prefix else None, 0)
    mean = sums / n_queries
    return HeadStats(kind=kind, entropy=mean[0], confidence=mean[1],
                     cls_attention=mean[2] if n_prefix else None, n_samples=n)


def per_sample_specs(n_layers: int, n_heads: int, n_prefix: int) -> list[Any]:
    """The per-sample arrays a ``--store rows|summary`` recording keeps the statistics in:
    ``per_sample/head_<stat>`` float64 ``[sample, layer, head]`` (cls_attention only with prefix tokens)."""
    from attnviz.store.schema import PerSampleSpec, head_stat_name

    return [PerSampleSpec(name=head_stat_name(stat), shape=(n_layers, n_heads), dtype="float64", axes=("layer", "head"),
                          description=f"the sample's mean over its query positions of {METRIC_INFO[stat].definition.split(' of ', 1)[1]}")
            for stat in STAT_NAMES if stat != "cls_attention" or n_prefix]


def per_sample_values(per_sample: np.ndarray, n_prefix: int) -> dict[str, np.ndarray]:
    """:meth:`HeadStatsAccumulator.add`'s ``[batch, stat, layer, head]`` as the per-sample arrays of
    :func:`per_sample_specs` (name -> ``[batch, layer, head]``)."""
    from attnviz.store.schema import head_stat_name

    return {head_stat_name(stat): per_sample[:, i] for i, stat in enumerate(STAT_NAMES)
            if stat != "cls_attention" or n_prefix}


def _from_per_sample(rec: Recording, kind: str, n: int, n_prefix: int) -> HeadStats:
    """The statistics of a recording without maps (``--store rows|summary``), from its per-sample statistics:
    the mean over samples weighted by each sample's query count (the same mean as over every query)."""
    from attnviz.errors import RecordingError
    from attnviz.store.schema import head_stat_name

    names = [head_stat_name(s) for s in STAT_NAMES if s != "cls_attention" or n_prefix]
    missing = [m for m in names if m not in rec.per_sample_arrays()]
    if missing or kind != rec.main_kind:
        raise RecordingError(f"{rec.path}: this recording stores no attention maps (--store {rec.store}) and no "
                             f"per-sample head statistics of its {kind!r} stack ({', '.join(missing) or kind}); "
                             "head statistics cannot be recomputed")
    n_layers, n_heads = rec.stack_shape(kind)
    if n == 0:
        nan = np.full((n_layers, n_heads), np.nan)
        return HeadStats(kind, nan, nan.copy(), nan.copy() if n_prefix else None, 0)
    weights = np.array([rec.lengths(s, kind)[0] for s in range(n)], np.float64)
    means = []
    for name in names:
        values = rec.h5[f"per_sample/{name}"][:n].astype(np.float64)  # [n, layer, head]: small
        means.append(np.tensordot(weights, values, axes=(0, 0)) / weights.sum())
    return HeadStats(kind=kind, entropy=means[0], confidence=means[1],
                     cls_attention=means[2] if n_prefix else None, n_samples=n)


def compute_and_store(path: str | os.PathLike, *, max_samples: int | None = None,
                      kind: str | None = None) -> HeadStats:
    """Compute the statistics of a complete recording and store them as head metrics.

    Writes ``head_metrics/entropy``, ``head_metrics/confidence`` and (with prefix tokens)
    ``head_metrics/cls_attention`` with their definitions and citations (:data:`METRIC_INFO`).

    Raises:
        RecordingError: the file is not a complete recording.
    """
    with Recording(path) as rec:
        stats = compute_head_stats(rec, kind, max_samples=max_samples)
    store_head_stats(path, stats, max_samples=max_samples)
    return stats


def store_head_stats(path: str | os.PathLike, stats: HeadStats, *, max_samples: int | None = None) -> None:
    """Write computed (or accumulated) statistics as head metrics ``entropy``, ``confidence``,
    ``cls_attention`` with their definitions and citations."""
    from attnviz.store.cache import open_for_update

    f = open_for_update(path)
    try:
        write_head_stats(f, stats, max_samples=max_samples)
    finally:
        f.close()


def write_head_stats(f: Any, stats: HeadStats, *, max_samples: int | None = None) -> None:
    """:func:`store_head_stats` into an open, writable ``h5py.File``."""
    from attnviz.store.cache import write_head_metric

    params = {"max_samples": max_samples, "n_samples": stats.n_samples}
    for name, values in stats.as_dict().items():
        base = METRIC_INFO[name]
        info = HeadMetricInfo(name=name, kind=stats.kind, definition=base.definition, citation=base.citation,
                              units=base.units, higher_is_more_important=base.higher_is_more_important,
                              params=params)
        write_head_metric(f, info, values)
