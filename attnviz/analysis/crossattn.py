"""Cross-attention vs saliency in speech-to-text recordings (pure numpy/scipy; streams over samples).

Following Papi, Fucci, Gaido, Negri & Bentivogli (2025), "Cross-Attention is Half Explanation in
Speech-to-Text Models" (arXiv:2509.18010), every token row ``t`` of a clip has a cross-attention
distribution over the ``E`` encoder frames that hold audio, ``A[l, h, t, :]``, and a saliency map over the
input spectrogram, ``S[t, f, m]`` (``F`` feature frames, ``M`` mel bins; ``extractor.attributions``).
To compare them at one resolution:

* **frequency reduction**: ``s[t, f] = sum_m S[t, f, m]`` (:func:`reduce_frequency`);
* **pooling to encoder frames**: an encoder frame ``e`` covers feature frames ``2e`` and ``2e + 1`` (Whisper's
  second convolution has stride 2), ``r[t, e] = max(s[t, 2e], s[t, 2e+1])`` ("max") or their mean ("mean")
  (:func:`pool_frames`). With frame ``j`` covering ``[j dt, (j+1) dt)`` and encoder frame ``e`` covering
  ``[2e dt, (2e+2) dt)``, a peak at time ``t`` stays at time ``t`` to within one encoder frame.

Explanations compared with ``r``: each head ``A[l, h]``, each layer's head mean ``mean_h A[l, h]``, the
all-layer mean ``mean_{l,h} A[l, h]``, and two controls: **uniform** (random attention, each row drawn from
the flat Dirichlet: i.i.d. uniform weights normalised; the constant map itself has no defined correlation)
and **shuffled** (the all-layer mean with its frame axis permuted, one permutation per clip: the same values,
no time alignment).

Metrics (all in :func:`compare_sample` / :class:`CrossAttnAnalysis`):

* **row correlation**: Pearson ``r_t = cov(a_t, r_t) / (sd(a_t) sd(r_t))`` and Spearman ``rho_t`` (Pearson of
  the ranks, ties averaged; Spearman 1904) of each token row over its ``E`` frames, averaged over rows and
  clips with the **Fisher z transform**: ``z = artanh(r)``, ``r_bar = tanh(mean z)`` (Fisher 1915; Silver &
  Dunlap 1987 on averaging correlations). Rows where either side is constant are undefined and left out.
* **flattened correlation**: Pearson and Spearman of the whole ``T x E`` matrices of a clip flattened, averaged
  over clips with the Fisher z transform.
* **alignment error** (with reference word timings): for each reference word matched in the transcript,
  the explanation summed over the word's token rows; its peak frame's centre ``c``; the error is 0 when ``c``
  lies in the word's span ``[start, end)``, else the distance to the nearer edge, in ms.
* **deletion AUC**: see :func:`deletion_auc` (curves recorded by ``extractor.deletion``).

The head metric ``ca_saliency_pearson`` (kind "cross") is the row-correlation table of the primary reference
(perturbation saliency if recorded, else gradient) at mean pooling.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from attnviz.store.reader import Recording
from attnviz.store.schema import HeadMetricInfo

__all__ = [
    "POOLINGS", "CrossAttnParams", "CrossAttnAnalysis", "FisherMean", "reduce_frequency", "pool_frames",
    "pearson_rows", "spearman_rows", "fisher_mean", "flat_pearson", "flat_spearman", "deletion_auc",
    "span_error_ms", "uniform_attention", "shuffled_attention", "sample_view", "SampleView", "compare_sample",
    "analyze_crossattn", "load_crossattn", "store_crossattn", "text_rows", "primary_reference", "analyze_step", "ANALYSIS_NAME",
    "METRIC_INFO",
]

POOLINGS = ("max", "mean")
ANALYSIS_NAME = "s2t_crossattn"
#: the reference order of preference for the head metric
REFERENCE_ORDER = ("perturbation", "gradient", "encoder_perturbation")
_PAPI = ("Papi, Fucci, Gaido, Negri & Bentivogli (2025), Cross-Attention is Half Explanation in Speech-to-Text "
         "Models, arXiv:2509.18010; Fisher (1915) z transform for averaging")
METRIC_INFO = {
    "ca_saliency_pearson": HeadMetricInfo(
        name="ca_saliency_pearson", kind="cross",
        definition=("tanh(mean over token rows and clips of artanh(Pearson r)) between the head's cross-attention "
                    "row and the saliency row (sum over mel bins, mean-pooled to encoder frames)"),
        citation=_PAPI, units="r", higher_is_more_important=True),
    "ca_saliency_spearman": HeadMetricInfo(
        name="ca_saliency_spearman", kind="cross",
        definition=("tanh(mean over token rows and clips of artanh(Spearman rho)) between the head's cross-attention "
                    "row and the saliency row (sum over mel bins, mean-pooled to encoder frames)"),
        citation=_PAPI + "; Spearman (1904)", units="rho", higher_is_more_important=True),
}
_R_CLIP = 1.0 - 1e-7  # artanh(+-1) is infinite: a perfect row correlation counts as 0.9999999


# -- resolution --------------------------------------------------------------------------------------

def reduce_frequency(saliency: np.ndarray) -> np.ndarray:
    """``S [..., frame, mel]`` -> ``sum_m S`` float64 ``[..., frame]`` (the stored saliencies are relevances:
    gradient magnitudes >= 0, centred perturbation scores where below 0 means below the average mask)."""
    return np.asarray(saliency, np.float64).sum(-1)


def pool_frames(values: np.ndarray, how: str = "mean", factor: int = 2) -> np.ndarray:
    """Pool the last axis in groups of ``factor`` frames (feature frames -> encoder frames).

    Args:
        values: float ``[..., F]``.
        how: "max" or "mean" (a last, shorter group pools the frames it has).

    Returns:
        float64 ``[..., ceil(F / factor)]``; output frame ``e`` pools input frames ``factor*e .. factor*e+factor-1``.
    """
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    x = np.asarray(values, np.float64)
    n = x.shape[-1]
    groups = -(-n // factor)
    pad = groups * factor - n
    fill = -np.inf if how == "max" else np.nan
    padded = np.concatenate([x, np.full((*x.shape[:-1], pad), fill)], -1) if pad else x
    blocks = padded.reshape(*x.shape[:-1], groups, factor)
    return blocks.max(-1) if how == "max" else np.nanmean(blocks, -1)


# -- correlations --------------------------------------------------------------------------------------

def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair: float ``[R]`` for ``a, b`` float ``[R, N]``; NaN where a row is
    constant (zero variance) on either side."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    num = (x * y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(np.asarray(x, np.float64), axis=-1)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair (Pearson of the average ranks): float ``[R]``."""
    return pearson_rows(_ranks(a), _ranks(b))


def fisher_mean(r: Iterable[float] | np.ndarray) -> float:
    """``tanh(mean(artanh(r)))`` over the finite values (NaN when there are none); ``|r|`` is clipped below 1."""
    z = np.arctanh(np.clip(np.asarray(list(r) if not isinstance(r, np.ndarray) else r, np.float64), -_R_CLIP, _R_CLIP))
    z = z[np.isfinite(z)]
    return float(np.tanh(z.mean())) if z.size else float("nan")


@dataclass
class FisherMean:
    """Streaming Fisher-z average of correlations per cell of a fixed shape (sums and counts: mergeable)."""

    shape: tuple[int, ...]
    z_sum: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.z_sum = np.zeros(self.shape, np.float64)
        self.count = np.zeros(self.shape, np.int64)

    def add(self, r: np.ndarray, axis: int = -1) -> None:
        """Add correlations ``r`` of shape ``shape + (n,)`` (``axis`` = the values to average; NaN skipped)."""
        r = np.moveaxis(np.asarray(r, np.float64), axis, -1)
        z = np.arctanh(np.clip(r, -_R_CLIP, _R_CLIP))
        ok = np.isfinite(z)
        self.z_sum += np.where(ok, z, 0.0).sum(-1)
        self.count += ok.sum(-1)

    def merge(self, other: FisherMean) -> None:
        self.z_sum += other.z_sum
        self.count += other.count

    def result(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.tanh(self.z_sum / np.maximum(self.count, 1)), np.nan)


def flat_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the flattened matrices (NaN when either is constant)."""
    return float(pearson_rows(np.ravel(a)[None], np.ravel(b)[None])[0])


def flat_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of the flattened matrices."""
    return float(spearman_rows(np.ravel(a)[None], np.ravel(b)[None])[0])


# -- controls ------------------------------------------------------------------------------------------

def uniform_attention(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random attention: rows drawn from the flat Dirichlet (i.i.d. Exp(1) weights normalised), ``[T, E]``."""
    w = rng.exponential(1.0, shape)
    return w / w.sum(-1, keepdims=True)


def shuffled_attention(rng: np.random.Generator, attention: np.ndarray) -> np.ndarray:
    """``attention [T, E]`` with its frame axis permuted (one permutation for every row of the clip)."""
    return np.asarray(attention)[:, rng.permutation(np.shape(attention)[1])]


# -- deletion and alignment --------------------------------------------------------------------------------

def deletion_auc(fractions: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Area under the deletion curve ``x -> p_x`` over ``x in [0, 1]`` (trapezoid rule; Samek et al. 2017).

    Args:
        fractions: float ``[S + 1]``, from 0 to 1.
        probabilities: float ``[..., S + 1]``: the token's probability after deleting the top ``x`` of the frames.

    Returns:
        float ``[...]``: lower = the explanation found the frames the token needs sooner.
    """
    return np.trapezoid(np.asarray(probabilities, np.float64), np.asarray(fractions, np.float64), axis=-1)


def span_error_ms(time_s: float, start: float, end: float) -> float:
    """0 when ``time_s`` lies in ``[start, end)``, else its distance to the nearer edge, in milliseconds."""
    if start <= time_s < end:
        return 0.0
    return 1000.0 * (start - time_s if time_s < start else time_s - end)


# -- reading one clip ------------------------------------------------------------------------------------

def text_rows(meta: dict[str, Any], which: str = "text") -> np.ndarray:
    """Token rows of a clip to compare: "text" (not special, after the prompt), "generated" (after the prompt,
    end-of-text included) or "all"."""
    n = len(meta.get("token_ids", []))
    prompt = int(meta.get("prompt_rows", 0))
    special = np.asarray(meta.get("special", [False] * n), bool)
    rows = np.arange(n)
    if which == "all":
        return rows
    if which == "generated":
        return rows[rows >= prompt]
    if which == "text":
        return rows[(rows >= prompt) & ~special]
    raise ValueError(f"rows must be text, generated or all, got {which!r}")


@dataclass(frozen=True)
class SampleView:
    """One clip's data for the comparison, cropped to what holds audio.

    Attributes:
        cross: float32 ``[L, H, T, E]`` cross-attention.
        saliency: method -> float64 ``[T, E]`` at encoder-frame resolution per pooling ``{pooling: array}``
            (encoder-frame attributions are the same under both poolings).
        meta: the clip's ``samples/meta``.
        encoder_frame_s: seconds per encoder frame.
    """

    cross: np.ndarray
    saliency: dict[str, dict[str, np.ndarray]]
    meta: dict[str, Any]
    encoder_frame_s: float


def sample_view(rec: Recording, sample: int, methods: Sequence[str] | None = None) -> SampleView:
    """Read one clip of an s2t recording (every layer's cross-attention and the saliency methods)."""
    meta = rec.meta(sample)
    t, e = rec.lengths(sample, "cross")
    n_layers, _ = rec.stack_shape("cross")
    cross = np.stack([rec.attention_heads(sample, layer, "cross") for layer in range(n_layers)])
    fam = rec.extraction_params.get("family", {})
    sal: dict[str, dict[str, np.ndarray]] = {}
    for m in (rec.attribution_methods() if methods is None else methods):
        info = rec.attribution_info(m)
        raw = rec.attribution(sample, m)
        if info.resolution == "spectrogram":
            f = int(meta.get("n_feature_frames", raw.shape[1]))
            s = reduce_frequency(raw[:t, :f])
            sal[m] = {p: pool_frames(s, p)[:, :e] for p in POOLINGS}
        elif info.resolution == "encoder_frame":
            s = np.asarray(raw[:t, :e], np.float64)
            sal[m] = {p: s for p in POOLINGS}
    return SampleView(cross, sal, meta, float(fam.get("encoder_frame_seconds", 0.02)))


def compare_sample(view: SampleView, method: str, pooling: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Row and flattened correlations of every explanation with one saliency of one clip.

    Returns:
        row correlations ``{"head_pearson": [L, H, R], "head_spearman": [L, H, R], "layer_pearson": [L, R],
        "layer_spearman": [L, R], "all_pearson": [R], "all_spearman": [R]}`` for the ``R`` rows given, and the
        flattened ones ``{"flat_head_pearson": [L, H, 1], "flat_layer_pearson": [L, 1], "flat_all_pearson": [1]}``
        (and ``spearman``), each with a trailing axis of the values to average.
    """
    ca = view.cross[:, :, rows].astype(np.float64)  # [L, H, R, E]
    ref = view.saliency[method][pooling][rows]  # [R, E]
    n_layers, n_heads = ca.shape[:2]
    # every explanation of the clip in one array: heads, layer means, the all-layer mean
    expl = np.concatenate([ca.reshape(-1, *ca.shape[2:]), ca.mean(1), ca.mean((0, 1))[None]])  # [LH + L + 1, R, E]
    out = {}
    for corr, rank in (("pearson", False), ("spearman", True)):
        x, y = (_ranks(expl), _ranks(ref)) if rank else (expl, ref)
        r = pearson_rows(x, y[None])  # [n, R]
        xf, yf = (_ranks(expl.reshape(len(expl), -1)), _ranks(ref.ravel())) if rank else \
            (expl.reshape(len(expl), -1), ref.ravel())
        flat = pearson_rows(xf, yf[None])[:, None]  # [n, 1]
        for prefix, values in (("", r), ("flat_", flat)):
            out[f"{prefix}head_{corr}"] = values[:n_layers * n_heads].reshape(n_layers, n_heads, -1)
            out[f"{prefix}layer_{corr}"] = values[n_layers * n_heads:-1]
            out[f"{prefix}all_{corr}"] = values[-1]
    return out


# -- the recording-level analysis ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossAttnParams:
    """What the analysis depends on (its cache key).

    Attributes:
        rows: which token rows are compared (:func:`text_rows`).
        seed: seeds the controls.
        max_samples: only the first N clips (None: all).
    """

    rows: str = "text"
    seed: int = 0
    max_samples: int | None = None
    version: int = 2

    def key(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CrossAttnAnalysis:
    """The comparison over a recording (see the module docstring for the definitions).

    ``tables[(method, pooling)]`` holds float arrays: ``head_pearson``/``head_spearman`` ``[L, H]``,
    ``layer_*`` ``[L]``, ``all_*`` ``[]``, ``uniform_*``/``shuffled_*`` ``[]`` (controls), ``flat_head_pearson``
    ``[L, H]``, ``flat_layer_pearson`` ``[L]``, ``flat_all_pearson`` ``[]`` (and ``spearman``), ``n_rows`` ``[]``.
    ``alignment[name]`` = (mean error ms, hit rate, n words) per explanation name ("ca_mean", "ca_layer1",
    "ca_L1H2", each saliency method, "uniform", "shuffled"); ``deletion[name]`` = AUC (mean over rows);
    ``deletion_curves[name]`` the mean probability curve; ``wer`` with ``errors``/``n_words``.
    """

    n_samples: int
    n_layers: int
    n_heads: int
    methods: list[str]
    tables: dict[tuple[str, str], dict[str, np.ndarray]]
    alignment: dict[str, tuple[float, float, int]]
    deletion: dict[str, float]
    deletion_curves: dict[str, np.ndarray]
    deletion_fractions: np.ndarray | None
    wer: dict[str, float]
    params: dict[str, Any]

    def head_metric(self, method: str | None = None, pooling: str = "mean", corr: str = "pearson") -> np.ndarray:
        method = method or primary_reference(self.methods)
        return self.tables[(method, pooling)][f"head_{corr}"]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The tables as a few arrays per (method, pooling): ``head [4, L, H]`` and ``layer [4, L]`` (rows:
        :data:`_STACKED`), ``scalars`` (:data:`_SCALARS`); alignment, deletion and WER likewise."""
        out: dict[str, np.ndarray] = {"methods": np.array(self.methods or [""], dtype=str)}
        for (m, p), table in self.tables.items():
            out[f"corr/{m}/{p}/head"] = np.stack([table[f"head_{k}"] if not k.startswith("flat") else
                                                  table[f"flat_head_{k[5:]}"] for k in _STACKED])
            out[f"corr/{m}/{p}/layer"] = np.stack([table[f"layer_{k}"] if not k.startswith("flat") else
                                                   table[f"flat_layer_{k[5:]}"] for k in _STACKED])
            out[f"corr/{m}/{p}/scalars"] = np.array([float(table[k]) for k in _SCALARS], np.float64)
        names = list(self.alignment)
        out["alignment/names"] = np.array(names or [""], dtype=str)
        out["alignment/values"] = np.array([self.alignment[n] for n in names] or np.zeros((0, 3)), np.float64)
        dn = list(self.deletion)
        out["deletion/names"] = np.array(dn or [""], dtype=str)
        out["deletion/auc"] = np.array([self.deletion[n] for n in dn], np.float64)
        if dn:
            out["deletion/curves"] = np.stack([self.deletion_curves[n] for n in dn])
            out["deletion/fractions"] = np.asarray(self.deletion_fractions, np.float64)
        out["wer"] = np.array([self.wer.get(k, np.nan) for k in _WER], np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, n_samples: int, n_layers: int, n_heads: int,
                    params: dict[str, Any]) -> CrossAttnAnalysis:
        methods = [m for m in arrays["methods"].tolist() if m]
        tables: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            if not k.startswith("corr/"):
                continue
            _, m, p, what = k.split("/", 3)
            t = tables.setdefault((m, p), {})
            if what == "scalars":
                t.update({name: np.asarray(v[i]) for i, name in enumerate(_SCALARS)})
            else:
                for i, name in enumerate(_STACKED):
                    key = f"{what}_{name}" if not name.startswith("flat") else f"flat_{what}_{name[5:]}"
                    t[key] = np.asarray(v[i])
        names = [n for n in arrays["alignment/names"].tolist() if n]
        values = arrays["alignment/values"]
        alignment = {n: (float(values[i, 0]), float(values[i, 1]), int(values[i, 2])) for i, n in enumerate(names)}
        dn = [n for n in arrays["deletion/names"].tolist() if n]
        deletion = {n: float(arrays["deletion/auc"][i]) for i, n in enumerate(dn)}
        curves = {n: arrays["deletion/curves"][i] for i, n in enumerate(dn)} if dn else {}
        wer = {k: float(v) for k, v in zip(_WER, arrays["wer"])}
        return cls(n_samples, n_layers, n_heads, methods, tables, alignment, deletion, curves,
                   arrays.get("deletion/fractions"), wer, params)


#: rows of the stacked head/layer arrays in the cache
_STACKED = ("pearson", "spearman", "flat_pearson", "flat_spearman")
_SCALARS = ("all_pearson", "all_spearman", "flat_all_pearson", "flat_all_spearman", "uniform_pearson",
            "uniform_spearman", "shuffled_pearson", "shuffled_spearman", "n_rows")
_WER = ("wer", "errors", "n_words", "n_clips")


def primary_reference(methods: Sequence[str]) -> str | None:
    """The saliency the head metric compares with: perturbation, else gradient, else encoder perturbation."""
    for m in REFERENCE_ORDER:
        if m in methods:
            return m
    return methods[0] if methods else None


class _Alignment:
    """Streaming alignment errors of peaks against reference word spans, per explanation name."""

    def __init__(self) -> None:
        self.err: dict[str, float] = {}
        self.hits: dict[str, int] = {}
        self.n: dict[str, int] = {}

    def add(self, name: str, relevance: np.ndarray, frame_s: float, start: float, end: float) -> None:
        peak = int(np.argmax(relevance))
        e = span_error_ms((peak + 0.5) * frame_s, start, end)
        self.err[name] = self.err.get(name, 0.0) + e
        self.hits[name] = self.hits.get(name, 0) + int(e == 0.0)
        self.n[name] = self.n.get(name, 0) + 1

    def result(self) -> dict[str, tuple[float, float, int]]:
        return {k: (self.err[k] / self.n[k], self.hits[k] / self.n[k], self.n[k]) for k in self.n}


def analyze_crossattn(rec: Recording, params: CrossAttnParams = CrossAttnParams()) -> CrossAttnAnalysis:
    """Stream over the clips of an s2t recording and compute every table (module docstring).

    One clip's maps and saliency are in memory at a time; the averages are sums and counts.
    """
    from attnviz.analysis.alignment import matched_words, wer_counts

    if rec.family != "s2t":
        raise ValueError(f"{rec.path.name} is a {rec.family} recording; the cross-attention analysis is for s2t")
    n_layers, n_heads = rec.stack_shape("cross")
    methods = [m for m in rec.attribution_methods()
               if rec.attribution_info(m).resolution in ("spectrogram", "encoder_frame")]
    n = rec.n_samples if params.max_samples is None else min(rec.n_samples, params.max_samples)
    acc: dict[tuple[str, str], dict[str, FisherMean]] = {}
    for m in methods:
        for p in POOLINGS:
            acc[(m, p)] = {
                **{f"head_{c}": FisherMean((n_layers, n_heads)) for c in ("pearson", "spearman")},
                **{f"layer_{c}": FisherMean((n_layers,)) for c in ("pearson", "spearman")},
                **{f"{w}_{c}": FisherMean(()) for w in ("all", "uniform", "shuffled") for c in ("pearson", "spearman")},
                **{f"flat_head_{c}": FisherMean((n_layers, n_heads)) for c in ("pearson", "spearman")},
                **{f"flat_layer_{c}": FisherMean((n_layers,)) for c in ("pearson", "spearman")},
                **{f"flat_all_{c}": FisherMean(()) for c in ("pearson", "spearman")},
            }
    n_rows = {k: 0 for k in acc}
    align = _Alignment()
    fam = rec.extraction_params.get("family", {})
    deletion_names = list((fam.get("deletion") or {}).get("explanations", []))
    fractions = np.asarray((fam.get("deletion") or {}).get("fractions", []), np.float64)
    del_sum = {name: np.zeros(len(fractions)) for name in deletion_names}
    del_n = 0
    has_deletion = bool(deletion_names) and "deletion" in rec.per_sample_arrays()
    errors = ref_words = n_ref_clips = 0
    for s in range(n):
        view = sample_view(rec, s, methods)
        rows = text_rows(view.meta, params.rows)
        rng = np.random.default_rng([params.seed, s])
        ca_all = view.cross.astype(np.float64).mean((0, 1))  # [T, E]
        controls = {"uniform": uniform_attention(rng, ca_all.shape), "shuffled": shuffled_attention(rng, ca_all)}
        if rows.size:
            for m in methods:
                for p in POOLINGS:
                    a, ref = acc[(m, p)], view.saliency[m][p]
                    c = compare_sample(view, m, p, rows)
                    for key, val in c.items():
                        a[key].add(val)
                    for w, ctl in controls.items():
                        a[f"{w}_pearson"].add(pearson_rows(ctl[rows], ref[rows]))
                        a[f"{w}_spearman"].add(spearman_rows(ctl[rows], ref[rows]))
                    n_rows[(m, p)] += int(rows.size)
        for word_rows, start, end in matched_words(view.meta):
            dt = view.encoder_frame_s
            summed = view.cross[:, :, word_rows].astype(np.float64).sum(2)  # [L, H, E]
            align.add("ca_mean", summed.mean((0, 1)), dt, start, end)
            for layer in range(n_layers):
                align.add(f"ca_layer{layer}", summed[layer].mean(0), dt, start, end)
                for h in range(n_heads):
                    align.add(f"ca_L{layer}H{h}", summed[layer, h], dt, start, end)
            for m in methods:
                align.add(m, view.saliency[m]["mean"][word_rows].sum(0), dt, start, end)
            for w, ctl in controls.items():
                align.add(w, ctl[word_rows].sum(0), dt, start, end)
        if has_deletion:
            curves = rec.per_sample("deletion", s)  # [n_expl, S+1, T_max] log p
            drows = text_rows(view.meta, "text")
            if drows.size:
                prob = np.exp(np.asarray(curves[:, :, drows], np.float64))  # [n_expl, S+1, R]
                for i, name in enumerate(deletion_names):
                    del_sum[name] += prob[i].sum(-1)
                del_n += int(drows.size)
        if view.meta.get("reference") is not None:
            e, w = wer_counts(view.meta["reference"], view.meta.get("text", ""))
            errors, ref_words, n_ref_clips = errors + e, ref_words + w, n_ref_clips + 1
    tables = {}
    for k, a in acc.items():
        tables[k] = {name: fm.result() for name, fm in a.items()}
        tables[k]["n_rows"] = np.asarray(n_rows[k], np.float64)
    curves = {name: del_sum[name] / del_n for name in deletion_names} if del_n else {}
    deletion = {name: float(deletion_auc(fractions, c)) for name, c in curves.items()}
    wer = {"wer": errors / ref_words if ref_words else float("nan"), "errors": errors, "n_words": ref_words,
           "n_clips": n_ref_clips}
    return CrossAttnAnalysis(n, n_layers, n_heads, methods, tables, align.result(), deletion, curves,
                             fractions if del_n else None, wer, params.key())


def load_crossattn(rec: Recording, params: CrossAttnParams = CrossAttnParams()) -> CrossAttnAnalysis | None:
    """The cached analysis of ``rec`` made with ``params``, or None."""
    from attnviz.store.cache import load_analysis

    arrays = load_analysis(rec, ANALYSIS_NAME, params.key())
    if arrays is None:
        return None
    n_layers, n_heads = rec.stack_shape("cross")
    g = rec.analysis_group(ANALYSIS_NAME)
    n = int(g.attrs.get("n_samples", rec.n_samples)) if g is not None else rec.n_samples
    return CrossAttnAnalysis.from_arrays(arrays, n_samples=n, n_layers=n_layers, n_heads=n_heads, params=params.key())


def store_crossattn(path: str | os.PathLike | Recording, result: CrossAttnAnalysis) -> None:
    """Cache the analysis (``analyses/s2t_crossattn``) and write the head metrics ``ca_saliency_pearson`` and
    ``ca_saliency_spearman`` (primary reference, mean pooling)."""
    from attnviz.store.cache import save_analysis, write_head_metric

    save_analysis(path, ANALYSIS_NAME, result.params, result.to_arrays(), attrs={"n_samples": result.n_samples})
    ref = primary_reference(result.methods)
    if ref is None:
        return
    for corr in ("pearson", "spearman"):
        base = METRIC_INFO[f"ca_saliency_{corr}"]
        info = HeadMetricInfo(name=base.name, kind="cross", definition=base.definition + f" (reference: {ref})",
                              citation=base.citation, units=base.units, higher_is_more_important=True,
                              params={**result.params, "reference": ref, "pooling": "mean"})
        write_head_metric(path, info, result.head_metric(ref, "mean", corr))


def analyze_step(path: str | os.PathLike, *, alignment_heads: str | None = None, force: bool = False) -> list[str]:
    """The ``attnviz analyze`` step for s2t recordings: the comparison (cached) and word timestamps by DTW.

    Returns:
        lines for the terminal (nothing for other families).
    """
    import time

    from attnviz.analysis.alignment import analyze_word_timings

    with Recording(path) as rec:
        if rec.family != "s2t":
            return []
        params = CrossAttnParams()
        cached = None if force else load_crossattn(rec, params)
    lines = []
    t0 = time.perf_counter()
    if cached is None:
        with Recording(path) as rec:
            result = analyze_crossattn(rec, params)
        store_crossattn(path, result)
        how = f"computed in {time.perf_counter() - t0:.1f} s"
    else:
        result, how = cached, "cached, unchanged"
    ref = primary_reference(result.methods)
    wer = result.wer
    if wer["n_words"]:
        lines.append(f"word error rate {wer['wer']:.1%} ({int(wer['errors'])} errors / {int(wer['n_words'])} "
                     f"reference words, {int(wer['n_clips'])} clip(s))")
    if ref is not None:
        t = result.tables[(ref, "mean")]
        hp = t["head_pearson"]
        best = np.unravel_index(np.nanargmax(hp), hp.shape) if np.isfinite(hp).any() else (0, 0)
        lines.append(f"cross-attention vs {ref} saliency ({result.n_samples} clip(s), {how}): all-layer mean r "
                     f"{float(t['all_pearson']):.2f}, best head L{best[0]}H{best[1]} r {hp[best]:.2f}, "
                     f"shuffled control r {float(t['shuffled_pearson']):.2f}")
    else:
        lines.append(f"cross-attention analysis ({result.n_samples} clip(s), {how}): no saliency recorded "
                     "(record with --attributions perturbation,gradient to compare)")
    lines += analyze_word_timings(path, alignment_heads=alignment_heads, force=force)
    return lines
