"""Vision-language head measurements: image attention, vision-aware head divergence, visual sinks.

An ``lvlm`` recording (``extractor/adapters/lvlm.py``) holds, per question, the language model's attention
(stack ``"self"``) over the token sequence prompt + generated answer, the image-token span, and, when
recorded, each head's VHD per generation step (``per_sample/vhd``) and each token's sink statistic phi per
layer (``per_sample/sink_phi``). Notation: ``A_{l,h}[t, k]`` the attention of head ``h`` of layer ``l``
from position ``t`` to position ``k``; ``I = [image_start, image_stop)`` the image tokens; ``t_j`` the
generation step of answer token ``j`` (the position whose output predicts it: ``answer_start - 1 + j``).

Per head and generation step (a *token* below means a generated answer token, EOS included):

* **image attention ratio** ``r^img_{l,h}(j) = sum_{k in I} A_{l,h}[t_j, k]`` and **text attention ratio**
  ``r^txt_{l,h}(j) = sum_{k not in I} A_{l,h}[t_j, k]``; ``r^img + r^txt = 1`` (each row is a softmax).
  The share of attention a generated token gives the image, as in the analyses of Kang et al. (2025) and
  the "image attention ratio" of hallucination studies on LLaVA.
* **VHD** (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
  CVPR 2025, Eq. 4): ``||o_{l,h}(t_j | image, text) - o_{l,h}(t_j' | text)||_2`` between the head's output
  (its slice of the output projection's input) with the image and with the image tokens removed; recorded
  by the extractor. **T-VHD**: the sum over layers of the top-k VHDs of each layer (``per_sample/t_vhd``).
* **visual sink tokens** (Kang, Kim, Kim & Kim, "See What You Are Told: Visual Attention Sink in Large
  Multimodal Models", ICLR 2025): image tokens ``k in I`` with ``phi_l(x_k) > tau``, where ``phi_l(x) =
  max_{d in D} |x_d / rms(x)|`` of the hidden state entering layer ``l`` over the massive-activation
  dimensions ``D`` (found from the data by the extractor); tau default 20, the paper's.
* **visual non-sink ratio** (ibid., Sec. 5, the head selection of Visual Attention Redistribution):
  ``sum_{k in I, not sink_l(k)} A_{l,h}[t_j, k] / sum_{k in I} A_{l,h}[t_j, k]``: how much of the head's
  visual attention goes to image tokens that are not sinks.
* **image-centric heads** (ibid.): heads with mean image attention ratio ``>= 0.2`` and mean visual
  non-sink ratio ``>= rho`` (default 0.5). The paper selects them per input at inference; here the means
  over every generation step of every question pick the heads of the recording.

Averages over tokens and samples are the head metrics ``image_attention_ratio``, ``vhd``,
``visual_non_sink_ratio`` and ``image_centric`` (kind ``"self"``, the language model); each (sample,
generation step) pair weighs the same. Everything streams over samples (one sample's rows in memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnviz.store.reader import Recording
from attnviz.store.schema import ANSWER_STEPS, HeadMetricInfo

__all__ = [
    "ANSWER_STEPS",
    "DEFAULT_RHO",
    "MIN_IMAGE_RATIO",
    "LvlmSummary",
    "METRIC_INFO",
    "generation_rows",
    "image_span",
    "answer_span",
    "attention_ratios",
    "sink_tokens",
    "non_sink_share",
    "image_centric_heads",
    "SampleView",
    "sample_view",
    "compute_lvlm",
    "compute_and_store",
    "load_summary",
    "analyze_step",
    "sink_tau",
    "image_grid",
]

DEFAULT_RHO = 0.5
#: image attention ratio an image-centric head needs at least (Kang et al. 2025)
MIN_IMAGE_RATIO = 0.2
ANALYSIS = "lvlm"

_HE = ("He, Zhu, Sun, Li, Zhang, Wang & Liu (2025), Cracking the Code of Hallucination in LVLMs with "
       "Vision-aware Head Divergence, CVPR, Eq. 4")
_KANG = ("Kang, Kim, Kim & Kim (2025), See What You Are Told: Visual Attention Sink in Large Multimodal Models, "
         "ICLR")

METRIC_INFO: dict[str, HeadMetricInfo] = {
    "image_attention_ratio": HeadMetricInfo(
        name="image_attention_ratio", kind="self",
        definition="mean over questions and generation steps t_j of sum_{k in image tokens} A[t_j, k]",
        citation=_KANG, units="", higher_is_more_important=True),
    "vhd": HeadMetricInfo(
        name="vhd", kind="self",
        definition="mean over questions and generation steps of ||o_h(t_j | image, text) - o_h(t_j' | text)||_2, "
                   "o_h = the head's slice of the o_proj input, text = the sequence without its image tokens",
        citation=_HE, units="", higher_is_more_important=True),
    "visual_non_sink_ratio": HeadMetricInfo(
        name="visual_non_sink_ratio", kind="self",
        definition="mean over questions and generation steps of sum_{k image, not sink} A[t_j, k] / "
                   "sum_{k image} A[t_j, k]; sinks: image tokens with phi_l > tau",
        citation=_KANG + ", Sec. 5", units="", higher_is_more_important=True),
    "image_centric": HeadMetricInfo(
        name="image_centric", kind="self",
        definition="1 for heads with image_attention_ratio >= 0.2 and visual_non_sink_ratio >= rho, else 0",
        citation=_KANG + ", Sec. 5 (head selection of Visual Attention Redistribution)", units="",
        higher_is_more_important=True),
}


# -- per sample ------------------------------------------------------------------------------------


def image_span(rec: Recording, sample: int) -> tuple[int, int]:
    """[start, stop) of the image tokens of ``sample`` in its token sequence."""
    s = rec.per_sample("image_span", sample)
    return int(s[0]), int(s[1])


def answer_span(rec: Recording, sample: int) -> tuple[int, int]:
    """[start, stop) of the generated answer tokens of ``sample`` (start = the prompt's length)."""
    s = rec.per_sample("answer_span", sample)
    return int(s[0]), int(s[1])


def generation_rows(rec: Recording, sample: int) -> np.ndarray:
    """int ``[n_answer_tokens]``: the row of the stored ``"self"`` maps of each generation step ``t_j``
    (the position ``answer_start - 1 + j``; with ``--answer-rows-only`` the rows are those steps)."""
    start, stop = answer_span(rec, sample)
    if rec.layout("self").query_axis == ANSWER_STEPS:
        return np.arange(stop - start)
    return np.arange(start - 1, stop - 1)


def attention_ratios(rows: np.ndarray, span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image and text attention ratios of attention rows.

    Args:
        rows: float ``[..., key_pos]`` attention rows (each a softmax over the valid keys).
        span: [start, stop) of the image tokens among the keys.

    Returns:
        ``(image, text)``, float64 ``[...]``: the mass on the image tokens and on every other key.
    """
    a = np.asarray(rows, np.float64)
    start, stop = span
    image = a[..., start:stop].sum(-1)
    text = a[..., :start].sum(-1) + a[..., stop:].sum(-1)
    return image, text


def sink_tokens(phi: np.ndarray, span: tuple[int, int], tau: float) -> np.ndarray:
    """Visual sink tokens (Kang et al. 2025): bool ``[layer, n_image_tokens]``, phi ``[layer, token]`` > tau
    on the image tokens."""
    start, stop = span
    return np.asarray(phi, np.float64)[:, start:stop] > float(tau)


def non_sink_share(rows: np.ndarray, span: tuple[int, int], sinks: np.ndarray) -> np.ndarray:
    """Visual non-sink ratio: the share of a row's image attention on image tokens that are not sinks.

    Args:
        rows: float ``[layer, head, step, key_pos]``.
        span: the image tokens.
        sinks: bool ``[layer, n_image_tokens]``.

    Returns:
        float64 ``[layer, head, step]``; NaN where a row gives the image no attention at all.
    """
    start, stop = span
    img = np.asarray(rows, np.float64)[..., start:stop]
    total = img.sum(-1)
    keep = ~np.asarray(sinks, bool)[:, None, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (img * keep).sum(-1) / np.where(total > 0, total, 1.0), np.nan)


def image_centric_heads(image_ratio: np.ndarray, non_sink: np.ndarray, *, rho: float = DEFAULT_RHO,
                        min_image_ratio: float = MIN_IMAGE_RATIO) -> np.ndarray:
    """bool ``[layer, head]``: image attention ratio >= ``min_image_ratio`` and visual non-sink ratio >= ``rho``
    (Kang et al. 2025, Sec. 5). NaN counts as not meeting a threshold."""
    r = np.nan_to_num(np.asarray(image_ratio, np.float64), nan=-1.0)
    s = np.nan_to_num(np.asarray(non_sink, np.float64), nan=-1.0)
    return (r >= min_image_ratio) & (s >= rho)


def sink_tau(rec: Recording) -> float | None:
    """The tau the recording's sinks were found with (None: recorded without sinks)."""
    facts = rec.extraction_params.get("family") or {}
    if "sink_phi" not in rec.per_sample_arrays():
        return None
    return float(facts.get("sink_tau", 20.0))


def image_grid(rec: Recording) -> tuple[tuple[int, int], tuple[int, int], int]:
    """How the image tokens map onto the vision tower's patch grid: (grid, patch_size, offset): image token
    ``offset + r * grid_w + c`` is patch (r, c) (offset 1 when the projector keeps CLS, "full" strategy)."""
    lay = rec.layout("vision")
    facts = rec.extraction_params.get("family") or {}
    return tuple(lay.grid), tuple(lay.patch_size), int(facts.get("image_grid_offset", 0))  # type: ignore[return-value]


@dataclass(frozen=True)
class SampleView:
    """One question's measurements.

    Attributes:
        rows: float32 ``[layer, head, step, key_pos]``: the attention rows of the generation steps.
        image_span / answer_span: [start, stop) positions.
        image_ratio / text_ratio: float64 ``[layer, head, step]``.
        vhd: float32 ``[layer, head, step]`` or None (recorded without VHD).
        t_vhd: float32 ``[step]`` or None.
        phi: float32 ``[layer, token]`` or None (recorded without sinks).
        sinks: bool ``[layer, n_image_tokens]`` or None.
        non_sink: float64 ``[layer, head, step]`` or None.
    """

    rows: np.ndarray
    image_span: tuple[int, int]
    answer_span: tuple[int, int]
    image_ratio: np.ndarray
    text_ratio: np.ndarray
    vhd: np.ndarray | None = None
    t_vhd: np.ndarray | None = None
    phi: np.ndarray | None = None
    sinks: np.ndarray | None = None
    non_sink: np.ndarray | None = None

    @property
    def n_steps(self) -> int:
        return int(self.rows.shape[2])


def sample_view(rec: Recording, sample: int, *, tau: float | None = None) -> SampleView:
    """Read and measure one question (its generation-step rows of every layer, its per-sample arrays).

    Args:
        tau: sink threshold; None = the one the recording was made with.
    """
    n_layers, _ = rec.stack_shape("self")
    steps = generation_rows(rec, sample)
    span, answer = image_span(rec, sample), answer_span(rec, sample)
    rows = np.stack([rec.attention_heads(sample, layer, kind="self")[:, steps] for layer in range(n_layers)])
    image, text = attention_ratios(rows, span)
    names = set(rec.per_sample_arrays())
    g = len(steps)
    vhd = rec.per_sample("vhd", sample)[:, :, :g].astype(np.float32) if "vhd" in names else None
    t_vhd = rec.per_sample("t_vhd", sample)[:g].astype(np.float32) if "t_vhd" in names else None
    phi = sinks = non_sink = None
    if "sink_phi" in names:
        phi = rec.per_sample("sink_phi", sample)[:, : answer[1]].astype(np.float32)
        sinks = sink_tokens(phi, span, sink_tau(rec) if tau is None else tau)
        non_sink = non_sink_share(rows, span, sinks)
    return SampleView(rows=rows, image_span=span, answer_span=answer, image_ratio=image, text_ratio=text, vhd=vhd,
                      t_vhd=t_vhd, phi=phi, sinks=sinks, non_sink=non_sink)


# -- over the recording ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LvlmSummary:
    """The recording's per-head means and sink statistics.

    Attributes:
        image_ratio / text_ratio: float64 ``[layer, head]``.
        vhd: float64 ``[layer, head]`` or None.
        non_sink: float64 ``[layer, head]`` (visual non-sink ratio) or None.
        image_centric: bool ``[layer, head]`` or None (no sinks recorded).
        sink_frequency: float64 ``[layer, n_image_tokens]``: how often each image token is a sink, or None.
        sinks_per_image: float64 ``[layer]``: mean number of sink tokens per question, or None.
        mean_t_vhd: mean T-VHD over generation steps, or None.
        n_samples / n_steps: questions and generation steps averaged over.
        tau, rho, min_image_ratio: the thresholds.
        accuracy / reinforced_accuracy: exact-match answer accuracy of the answers with a reference (None
            without), and of the reinforced answers (None without reinforcement); n_changed: reinforced
            answers that differ from the original.
    """

    image_ratio: np.ndarray
    text_ratio: np.ndarray
    n_samples: int
    n_steps: int
    tau: float | None
    rho: float
    min_image_ratio: float
    vhd: np.ndarray | None = None
    non_sink: np.ndarray | None = None
    image_centric: np.ndarray | None = None
    sink_frequency: np.ndarray | None = None
    sinks_per_image: np.ndarray | None = None
    mean_t_vhd: float | None = None
    accuracy: float | None = None
    reinforced_accuracy: float | None = None
    n_changed: int = 0


def compute_lvlm(rec: Recording, *, tau: float | None = None, rho: float = DEFAULT_RHO,
                 min_image_ratio: float = MIN_IMAGE_RATIO) -> LvlmSummary:
    """Stream over the questions and average the measurements per head (see the module docstring).

    Args:
        tau: sink threshold (None: the recording's own).
        rho: visual non-sink ratio an image-centric head needs.
    """
    n_layers, n_heads = rec.stack_shape("self")
    names = set(rec.per_sample_arrays())
    has_vhd, has_sinks = "vhd" in names, "sink_phi" in names
    tau = (sink_tau(rec) if tau is None else float(tau)) if has_sinks else None
    sums = {k: np.zeros((n_layers, n_heads)) for k in ("image", "text", "vhd", "non_sink")}
    non_sink_n = np.zeros((n_layers, n_heads))
    sink_counts: np.ndarray | None = None
    t_vhd_sum, n_steps = 0.0, 0
    correct = reinforced = n_ref = n_changed = 0
    any_reinforced = False
    for s in range(rec.n_samples):
        v = sample_view(rec, s, tau=tau)
        n_steps += v.n_steps
        sums["image"] += v.image_ratio.sum(-1)
        sums["text"] += v.text_ratio.sum(-1)
        if v.vhd is not None:
            sums["vhd"] += v.vhd.astype(np.float64).sum(-1)
            t_vhd_sum += float(v.t_vhd.sum()) if v.t_vhd is not None else 0.0
        if v.non_sink is not None:
            ok = np.isfinite(v.non_sink)
            sums["non_sink"] += np.where(ok, v.non_sink, 0.0).sum(-1)
            non_sink_n += ok.sum(-1)
            counts = v.sinks.astype(np.float64)
            sink_counts = counts if sink_counts is None else sink_counts + counts
        meta = rec.meta(s)
        if meta.get("correct") is not None:
            n_ref += 1
            correct += bool(meta["correct"])
        r = meta.get("reinforced")
        if r:
            any_reinforced = True
            n_changed += bool(r.get("changed"))
            if r.get("correct") is not None:
                reinforced += bool(r["correct"])
    n = rec.n_samples
    steps = max(n_steps, 1)
    non_sink = None
    centric = None
    if has_sinks:
        with np.errstate(invalid="ignore", divide="ignore"):
            non_sink = np.where(non_sink_n > 0, sums["non_sink"] / np.maximum(non_sink_n, 1), np.nan)
    image = sums["image"] / steps
    if non_sink is not None:
        centric = image_centric_heads(image, non_sink, rho=rho, min_image_ratio=min_image_ratio)
    return LvlmSummary(
        image_ratio=image, text_ratio=sums["text"] / steps, n_samples=n, n_steps=n_steps, tau=tau, rho=float(rho),
        min_image_ratio=float(min_image_ratio), vhd=sums["vhd"] / steps if has_vhd else None, non_sink=non_sink,
        image_centric=centric,
        sink_frequency=sink_counts / max(n, 1) if sink_counts is not None else None,
        sinks_per_image=sink_counts.sum(-1) / max(n, 1) if sink_counts is not None else None,
        mean_t_vhd=t_vhd_sum / steps if has_vhd else None,
        accuracy=correct / n_ref if n_ref else None,
        reinforced_accuracy=reinforced / n_ref if (any_reinforced and n_ref) else None, n_changed=n_changed)


def _params(rec: Recording, tau: float | None, rho: float, min_image_ratio: float) -> dict[str, Any]:
    return {"tau": sink_tau(rec) if tau is None else float(tau), "rho": float(rho),
            "min_image_ratio": float(min_image_ratio), "n_samples": rec.n_samples, "algorithm": 1}


def compute_and_store(path: str | os.PathLike, *, tau: float | None = None, rho: float = DEFAULT_RHO,
                      min_image_ratio: float = MIN_IMAGE_RATIO) -> LvlmSummary:
    """Compute the summary of a complete lvlm recording and store it: the head metrics of
    :data:`METRIC_INFO` (those the recording has data for) and ``analyses/lvlm``."""
    from attnviz.store.cache import open_for_update, save_analysis, write_head_metric

    with Recording(path) as rec:
        summary = compute_lvlm(rec, tau=tau, rho=rho, min_image_ratio=min_image_ratio)
        params = _params(rec, tau, rho, min_image_ratio)
    values = {"image_attention_ratio": summary.image_ratio, "vhd": summary.vhd,
              "visual_non_sink_ratio": summary.non_sink,
              "image_centric": None if summary.image_centric is None else summary.image_centric.astype(np.float32)}
    arrays: dict[str, np.ndarray] = {"image_ratio": summary.image_ratio, "text_ratio": summary.text_ratio}
    for key, value in (("vhd", summary.vhd), ("non_sink", summary.non_sink),
                       ("image_centric", summary.image_centric), ("sink_frequency", summary.sink_frequency),
                       ("sinks_per_image", summary.sinks_per_image)):
        if value is not None:
            arrays[key] = np.asarray(value)
    scalars = {"n_samples": summary.n_samples, "n_steps": summary.n_steps, "mean_t_vhd": summary.mean_t_vhd,
               "accuracy": summary.accuracy, "reinforced_accuracy": summary.reinforced_accuracy,
               "n_changed": summary.n_changed}
    f = open_for_update(path)
    try:
        for name, v in values.items():
            if v is None:
                continue
            base = METRIC_INFO[name]
            info = HeadMetricInfo(name=name, kind="self", definition=base.definition, citation=base.citation,
                                  units=base.units, higher_is_more_important=base.higher_is_more_important,
                                  params=params)
            write_head_metric(f, info, v)
        save_analysis(f, ANALYSIS, params, arrays, attrs={"summary": scalars})
    finally:
        f.close()
    return summary


def load_summary(rec: Recording) -> dict[str, Any] | None:
    """The stored ``analyses/lvlm`` (arrays, plus ``"summary"`` scalars and ``"params"``), whatever its
    parameters; None when absent."""
    from attnviz.store import schema as S

    g = rec.analysis_group(ANALYSIS)
    if g is None or S.ATTR_ANALYSIS_PARAMS not in g.attrs:
        return None
    out: dict[str, Any] = {k: g[k][()] for k in g.keys()}
    out["summary"] = S.loads(g.attrs.get("summary", "{}"))
    out["params"] = S.loads(g.attrs[S.ATTR_ANALYSIS_PARAMS])
    return out


def analyze_step(path: str | os.PathLike, *, tau: float | None = None, rho: float = DEFAULT_RHO) -> list[str]:
    """The ``attnviz analyze`` step (and the extractor's, after recording): nothing for other families."""
    with Recording(path) as rec:
        if rec.family != "lvlm":
            return []
    s = compute_and_store(path, tau=tau, rho=rho)
    best = np.unravel_index(int(np.nanargmax(s.image_ratio)), s.image_ratio.shape)
    line = (f"vision-language heads ({s.n_samples} questions, {s.n_steps} answer tokens): image attention ratio "
            f"mean {np.mean(s.image_ratio):.3f}, highest L{best[0]} H{best[1]} {s.image_ratio[best]:.3f}")
    if s.vhd is not None:
        bv = np.unravel_index(int(np.nanargmax(s.vhd)), s.vhd.shape)
        line += f"; VHD highest L{bv[0]} H{bv[1]} {s.vhd[bv]:.3f}"
    if s.sinks_per_image is not None:
        line += (f"; visual sinks (tau {s.tau:g}) {s.sinks_per_image.max():.2f} per image at most; "
                 f"{int(s.image_centric.sum())} image-centric head(s) (rho {s.rho:g})")
    if s.accuracy is not None:
        line += f"; answer accuracy {s.accuracy:.1%}"
    if s.reinforced_accuracy is not None:
        line += f", reinforced {s.reinforced_accuracy:.1%} ({s.n_changed} answers changed)"
    return [line]
