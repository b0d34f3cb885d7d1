"""Views of the Speech page (speech-to-text recordings; skipped for other families or missing data)."""

from __future__ import annotations

import numpy as np

from attnviz.app.exports import ViewResult, register_view
from attnviz.app.speech_views import (
    analysis,
    clip_data,
    clip_figure,
    correlation_figure,
    deletion_figure,
    saliency_methods,
    token_figure,
)
from attnviz.analysis.crossattn import text_rows
from attnviz.store.reader import Recording


def _best_head(rec: Recording, method: str | None) -> tuple[int, int]:
    a = analysis(rec)
    if a is None or method is None or (method, "mean") not in a.tables:
        return rec.n_layers - 1, 0
    hp = a.tables[(method, "mean")]["head_pearson"]
    if not np.isfinite(hp).any():
        return rec.n_layers - 1, 0
    layer, head = np.unravel_index(np.nanargmax(hp), hp.shape)
    return int(layer), int(head)


@register_view("speech_heads", "Cross-attention vs saliency of every decoder head (Fisher-z mean of token rows)", order=70)
def _heads(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "s2t" or analysis(rec) is None:
        return None
    methods = saliency_methods(rec)
    if not methods:
        return None
    layer, head = _best_head(rec, methods[0])
    return [(f"{m}_{p}", correlation_figure(rec, layer, head, m, p)) for m in methods for p in ("mean", "max")]


@register_view("speech_deletion", "Deletion curves of cross-attention, saliency and a random order", order=71)
def _deletion(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "s2t" or analysis(rec) is None or not analysis(rec).deletion_curves:
        return None
    return deletion_figure(rec)


@register_view("speech_clip", "A clip: waveform, spectrogram, reference and DTW word timings", per_sample=True, order=72)
def _clip(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "s2t" or sample is None:
        return None
    return clip_figure(rec, sample)


@register_view("speech_tokens", "Each text token of a clip: the best head's cross-attention against the saliency",
               per_sample=True, order=73)
def _tokens(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "s2t" or sample is None:
        return None
    methods = saliency_methods(rec)
    method = methods[0] if methods else None
    layer, head = _best_head(rec, method)
    rows = text_rows(clip_data(rec, sample).meta, "text")
    return [(f"token{int(r)}", token_figure(rec, sample, layer, head, int(r), method)) for r in rows] or None
