"""Speech recording -> figures and tables, shared by the Speech page and ``attnviz report`` (no Dash).

Everything one clip needs (its cross-attention, saliency, waveform envelope, features, words) is read once per
clip and kept for the last few clips (:func:`clip_data`), so switching the token or the head reads nothing from
the file; the recording-level analysis and the word timings are read once per open recording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from attnviz.analysis.alignment import WordTimings, load_word_timings, matched_words
from attnviz.analysis.crossattn import (
    POOLINGS,
    CrossAttnAnalysis,
    load_crossattn,
    pearson_rows,
    pool_frames,
    primary_reference,
    reduce_frequency,
    text_rows,
)
from attnviz.app.data import lru, memo
from attnviz.figures import fig_message
from attnviz.figures.speech import fig_clip, fig_correlation_grid, fig_deletion, fig_token_alignment
from attnviz.store.reader import Recording

__all__ = ["ClipData", "clip_data", "analysis", "timings", "saliency_methods", "default_token", "token_span", "clip_figure",
           "token_figure", "correlation_figure", "deletion_figure", "token_table", "aggregate_table", "summary_line",
           "CORRELATIONS"]

CORRELATIONS = ("pearson", "spearman")


@dataclass(frozen=True)
class ClipData:
    """One clip, cropped to what holds audio.

    Attributes:
        meta: ``samples/meta``.
        cross: float32 ``[L, H, T, E]``.
        saliency: method -> float32 ``[T, F, M]`` (spectrogram) or ``[T, E]`` (encoder frames).
        pooled: method -> pooling -> float64 ``[T, E]``.
        envelope: float32 ``[2, bins]``; log_mel: float32 ``[M, F]`` (None when not recorded).
        words: per transcript word (word, rows, DTW start, DTW end) (times NaN without word timings).
        reference_of_row: row -> (reference word, start, end) of the reference word matched to the row's word.
    """

    meta: dict[str, Any]
    cross: np.ndarray
    saliency: dict[str, np.ndarray]
    pooled: dict[str, dict[str, np.ndarray]]
    envelope: np.ndarray | None
    log_mel: np.ndarray | None
    words: list[tuple[str, list[int], float, float]]
    reference_of_row: dict[int, tuple[str, float, float]]

    @property
    def n_rows(self) -> int:
        return int(self.cross.shape[2])


def _family(rec: Recording) -> dict[str, Any]:
    return memo(rec, ("s2t_family",), lambda: dict(rec.extraction_params.get("family", {})))


def saliency_methods(rec: Recording) -> list[str]:
    """The recording's speech attributions, the primary reference first."""
    def make() -> list[str]:
        ms = [m for m in rec.attribution_methods()
              if rec.attribution_info(m).resolution in ("spectrogram", "encoder_frame")]
        first = primary_reference(ms)
        return ([first] if first else []) + [m for m in ms if m != first]

    return memo(rec, ("s2t_methods",), make)


def analysis(rec: Recording) -> CrossAttnAnalysis | None:
    return memo(rec, ("s2t_analysis",), lambda: load_crossattn(rec))


def timings(rec: Recording) -> WordTimings | None:
    return memo(rec, ("s2t_timings",), lambda: load_word_timings(rec))


def clip_data(rec: Recording, sample: int) -> ClipData:
    """The clip's data (the last 8 clips are kept)."""
    return lru(rec, "s2t_clip", sample, lambda: _read_clip(rec, sample), maxsize=8)


def _read_clip(rec: Recording, sample: int) -> ClipData:
    meta = rec.meta(sample)
    t, e = rec.lengths(sample, "cross")
    n_layers, _ = rec.stack_shape("cross")
    cross = np.stack([rec.attention_heads(sample, layer, "cross") for layer in range(n_layers)])
    f = int(meta.get("n_feature_frames", 0))
    saliency, pooled = {}, {}
    for m in saliency_methods(rec):
        raw = rec.attribution(sample, m)
        if rec.attribution_info(m).resolution == "spectrogram":
            s = np.asarray(raw[:t, :f], np.float32)
            saliency[m] = s
            reduced = reduce_frequency(s)
            pooled[m] = {p: pool_frames(reduced, p)[:, :e] for p in POOLINGS}
        else:
            s = np.asarray(raw[:t, :e], np.float32)
            saliency[m] = s
            pooled[m] = {p: s.astype(np.float64) for p in POOLINGS}
    arrays = rec.per_sample_arrays()
    envelope = None
    if "waveform_envelope" in arrays:
        dt = float(_family(rec).get("envelope_seconds", 0.005))
        bins = int(np.ceil(float(meta.get("duration", 0.0)) / dt))
        envelope = np.asarray(rec.per_sample("waveform_envelope", sample)[:, :bins], np.float32)
    log_mel = np.asarray(rec.per_sample("log_mel", sample)[:, :f], np.float32) if "log_mel" in arrays else None
    words = []
    tm = timings(rec)
    dtw = {k: (a, b) for k, (_, a, b) in enumerate(tm.of_sample(sample))} if tm is not None else {}
    for k, w in enumerate(meta.get("words") or []):
        a, b = dtw.get(k, (np.nan, np.nan))
        words.append((w["word"], list(w["rows"]), a, b))
    ref_words = {tuple(rows): (a, b) for rows, a, b in matched_words(meta)}
    reference_of_row: dict[int, tuple[str, float, float]] = {}
    for w, rows, _, _ in words:
        if tuple(rows) in ref_words:
            a, b = ref_words[tuple(rows)]
            for r in rows:
                reference_of_row[r] = (w, a, b)
    return ClipData(meta, cross, saliency, pooled, envelope, log_mel, words, reference_of_row)


def default_token(meta: dict[str, Any]) -> int:
    """The first text token's row (else row 0)."""
    rows = text_rows(meta, "text")
    return int(rows[0]) if rows.size else 0


def _word_of_row(clip: ClipData, row: int) -> tuple[str, float, float] | None:
    for w, rows, a, b in clip.words:
        if row in rows:
            return w, a, b
    return None


def token_span(rec: Recording, sample: int, token: int | None) -> tuple[float, float] | None:
    """(start, end) in seconds of the selected token's word: its DTW timing, else its matched reference word."""
    if token is None:
        return None
    clip = clip_data(rec, sample)
    hit = _word_of_row(clip, token)
    if hit is not None and np.isfinite(hit[1]):
        return float(hit[1]), float(hit[2])
    ref = clip.reference_of_row.get(token)
    return (float(ref[1]), float(ref[2])) if ref else None


def clip_figure(rec: Recording, sample: int, token: int | None = None) -> go.Figure:
    """Waveform and spectrogram of one clip with its reference words and DTW word timings; the selected token's
    word outlined (the figure's last shape)."""
    clip = clip_data(rec, sample)
    fam = _family(rec)
    duration = float(clip.meta.get("duration", 0.0))
    if clip.envelope is None or clip.log_mel is None:
        return fig_message("This recording stores no waveform or features (per_sample/waveform_envelope, log_mel).")
    ref = [(w["word"], float(w["start"]), float(w["end"])) for w in clip.meta.get("reference_words") or []]
    aligned = [(w, a, b) for w, _, a, b in clip.words if np.isfinite(a)]
    highlight = token_span(rec, sample, token)
    text = clip.meta.get("text") or "(no words)"
    return fig_clip(clip.envelope, float(fam.get("envelope_seconds", 0.005)), clip.log_mel,
                    float(fam.get("feature_frame_seconds", 0.01)), duration=duration, reference=ref, aligned=aligned,
                    highlight=highlight, title=f"#{sample} {rec.sample_ids()[sample]}: “{text}”")


def _token_label(meta: dict[str, Any], row: int) -> str:
    tokens = meta.get("tokens", [])
    return tokens[row].strip() or repr(tokens[row]) if 0 <= row < len(tokens) else f"row {row}"


def token_figure(rec: Recording, sample: int, layer: int, head: int, token: int, method: str | None,
                 pooling: str = "mean") -> go.Figure:
    """The selected token: its saliency over the spectrogram, and the head's / layer's / all layers' cross-attention
    against the pooled saliency over time."""
    clip = clip_data(rec, sample)
    fam = _family(rec)
    if not 0 <= token < clip.n_rows:
        return fig_message("Select a token of the transcript.")
    ca = clip.cross[:, :, token].astype(np.float64)  # [L, H, E]
    curves = {"head": ca[layer, head], "layer mean": ca[layer].mean(0), "all-layer mean": ca.mean((0, 1))}
    sub = ""
    sal_map = None
    if method in clip.pooled:
        ref = clip.pooled[method][pooling][token]
        curves[f"saliency ({pooling})"] = ref
        r = {k: float(pearson_rows(v[None], ref[None])[0]) for k, v in curves.items() if not k.startswith("saliency")}
        sub = (f"Pearson r with {method} saliency ({pooling}-pooled): head {r['head']:.2f}, layer mean "
               f"{r['layer mean']:.2f}, all-layer mean {r['all-layer mean']:.2f}")
        if clip.saliency[method].ndim == 3:
            sal_map = clip.saliency[method][token].T  # [mel, frame]
    else:
        sub = "No saliency recorded: record with --attributions perturbation,gradient to compare."
    word = _word_of_row(clip, token)
    span = clip.reference_of_row.get(token)
    aligned = (word[1], word[2]) if word is not None and np.isfinite(word[1]) else None
    lp = clip.meta.get("logprob", [])
    prob = f", p = {np.exp(lp[token]):.3f}" if token < len(lp) else ""
    title = f"token {token} “{_token_label(clip.meta, token)}”{prob} · L{layer} H{head}"
    return fig_token_alignment(sal_map, float(fam.get("feature_frame_seconds", 0.01)), curves,
                               float(fam.get("encoder_frame_seconds", 0.02)),
                               duration=float(clip.meta.get("duration", 0.0)),
                               span=span[1:] if span else None, aligned_span=aligned, title=title, subtitle=sub)


def correlation_figure(rec: Recording, layer: int, head: int, method: str | None, pooling: str = "mean",
                       corr: str = "pearson") -> go.Figure:
    """The L x H heatmap of the recording's CA-vs-saliency row correlation (Fisher-z mean); the last few kept (a
    token switch leaves it as it is)."""
    key = (layer, head, method, pooling, corr)
    return lru(rec, "s2t_correlation_figure", key, lambda: _correlation_figure(rec, *key), maxsize=16)


def _correlation_figure(rec: Recording, layer: int, head: int, method: str | None, pooling: str,
                        corr: str) -> go.Figure:
    a = analysis(rec)
    if a is None:
        return fig_message(f"Not computed yet: run `attnviz analyze {rec.path.name}`.", height=240)
    if method is None or (method, pooling) not in a.tables:
        return fig_message("No saliency recorded to compare with.", height=240)
    values = a.tables[(method, pooling)][f"head_{corr}"]
    return fig_correlation_grid(values, selected=(layer, head), label=f"{corr} r",
                                title=f"CA vs {method} ({pooling}), {corr}")


def deletion_figure(rec: Recording, sample: int | None = None, token: int | None = None) -> go.Figure:
    """Deletion curves: the recording's mean (``sample`` None), or one token's."""
    fam = _family(rec)
    d = fam.get("deletion") or {}
    names, fractions = list(d.get("explanations", [])), np.asarray(d.get("fractions", []), np.float64)
    if not names or "deletion" not in rec.per_sample_arrays():
        return fig_message("No deletion curves recorded: extract with --deletion-steps 10.", height=300)
    if sample is None:
        a = analysis(rec)
        if a is None or not a.deletion_curves:
            return fig_message(f"Run `attnviz analyze {rec.path.name}` for the recording's mean curves.", height=300)
        return memo(rec, ("s2t_deletion_figure",), lambda: fig_deletion(
            a.deletion_fractions, a.deletion_curves, a.deletion,
            title=f"Deletion curves, mean over {a.n_samples} clips' text tokens",
            subtitle="remove the top x% encoder frames by each explanation; lower area = more faithful"))
    clip = clip_data(rec, sample)
    if token is None or not 0 <= token < clip.n_rows:
        return fig_message("Select a token of the transcript.", height=300)
    from attnviz.analysis.crossattn import deletion_auc

    raw = lru(rec, "s2t_deletion", sample, lambda: rec.per_sample("deletion", sample), maxsize=8)
    probs = np.exp(np.asarray(raw[:, :, token], np.float64))  # [n_expl, S+1]
    curves = {n: probs[i] for i, n in enumerate(names)}
    auc = {n: float(deletion_auc(fractions, c)) for n, c in curves.items()}
    return fig_deletion(fractions, curves, auc, title=f"Deletion curves of token {token} “{_token_label(clip.meta, token)}”",
                        subtitle="remove the top x% encoder frames by each explanation")


def token_table(rec: Recording, sample: int, layer: int, head: int, method: str | None,
                pooling: str = "mean") -> list[dict[str, Any]]:
    """One row per token: text, role, p, word, reference and DTW spans, peak times, correlations (the last
    tables kept: a token switch only moves the highlighted row)."""
    key = (sample, layer, head, method, pooling)
    return lru(rec, "s2t_token_table", key, lambda: _token_table(rec, *key), maxsize=16)


def _token_table(rec: Recording, sample: int, layer: int, head: int, method: str | None,
                 pooling: str) -> list[dict[str, Any]]:
    clip = clip_data(rec, sample)
    fam = _family(rec)
    dt = float(fam.get("encoder_frame_seconds", 0.02))
    meta = clip.meta
    prompt = int(meta.get("prompt_rows", 0))
    out = []
    for r in range(clip.n_rows):
        special = bool(meta.get("special", [False] * clip.n_rows)[r])
        role = "prompt" if r < prompt else ("special" if special else "text")
        ca_head = clip.cross[layer, head, r].astype(np.float64)
        ca_all = clip.cross[:, :, r].astype(np.float64).mean((0, 1))
        row = {"row": r, "token": _token_label(meta, r), "role": role,
               "p": float(np.exp(meta["logprob"][r])) if r < len(meta.get("logprob", [])) else float("nan"),
               "ca_peak_s": (int(np.argmax(ca_head)) + 0.5) * dt, "padding_share": float(1.0 - ca_head.sum())}
        word = _word_of_row(clip, r)
        row["word"] = word[0] if word else ""
        row["dtw"] = (word[1], word[2]) if word and np.isfinite(word[1]) else None
        ref = clip.reference_of_row.get(r)
        row["reference"] = ref[1:] if ref else None
        if method in clip.pooled:
            s = clip.pooled[method][pooling][r]
            row["saliency_peak_s"] = (int(np.argmax(s)) + 0.5) * dt
            row["r_head"] = float(pearson_rows(ca_head[None], s[None])[0])
            row["r_all"] = float(pearson_rows(ca_all[None], s[None])[0])
        out.append(row)
    return out


def aggregate_table(rec: Recording, method: str | None, pooling: str = "mean") -> list[tuple[str, str, str]]:
    """(explanation, row-mean r / rho, flattened r / rho) rows: all-layer mean, each layer's mean, the controls,
    the best head; empty without an analysis."""
    a = analysis(rec)
    if a is None or method is None or (method, pooling) not in a.tables:
        return []
    t = a.tables[(method, pooling)]

    def pair(x: Any, y: Any) -> str:
        return f"{float(x):.3f} / {float(y):.3f}"

    rows = [("all-layer mean", pair(t["all_pearson"], t["all_spearman"]), pair(t["flat_all_pearson"], t["flat_all_spearman"]))]
    for layer in range(a.n_layers):
        rows.append((f"layer {layer} mean", pair(t["layer_pearson"][layer], t["layer_spearman"][layer]),
                     pair(t["flat_layer_pearson"][layer], t["flat_layer_spearman"][layer])))
    hp = t["head_pearson"]
    if np.isfinite(hp).any():
        best = np.unravel_index(np.nanargmax(hp), hp.shape)
        rows.append((f"best head L{best[0]} H{best[1]}", pair(hp[best], t["head_spearman"][best]),
                     pair(t["flat_head_pearson"][best], t["flat_head_spearman"][best])))
    rows.append(("control: uniform (random) attention", pair(t["uniform_pearson"], t["uniform_spearman"]), "—"))
    rows.append(("control: time-shuffled attention", pair(t["shuffled_pearson"], t["shuffled_spearman"]), "—"))
    return rows


def summary_line(rec: Recording) -> str:
    """One line: clips, WER, the main comparison, the word timings."""
    a = analysis(rec)
    parts = [f"{rec.n_samples} clips, {rec.n_layers} decoder layers x {rec.n_heads} heads"]
    if a is None:
        parts.append(f"not analysed yet: run `attnviz analyze {rec.path.name}` for WER, correlations and word timings")
        return "; ".join(parts) + "."
    if a.wer.get("n_words"):
        parts.append(f"WER {a.wer['wer']:.1%} over {int(a.wer['n_words'])} reference words")
    ref = primary_reference(a.methods)
    if ref is not None:
        t = a.tables[(ref, "mean")]
        parts.append(f"CA (all-layer mean) vs {ref}: r = {float(t['all_pearson']):.2f} (shuffled control "
                     f"{float(t['shuffled_pearson']):.2f})")
    tm = timings(rec)
    if tm is not None:
        err = tm.errors_ms()
        heads = ", ".join(f"L{x}H{y}" for x, y in tm.heads)
        txt = f"word timings by DTW over {heads}"
        if err.get("n_words"):
            txt += f" (start error {err['start_ms']:.0f} ms, end {err['end_ms']:.0f} ms)"
        parts.append(txt)
    return "; ".join(parts) + "."
