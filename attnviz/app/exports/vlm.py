"""Views of the Vision-language page (lvlm recordings; skipped for other families)."""

from __future__ import annotations

import numpy as np

from attnviz.analysis.lvlm import image_grid, load_summary, sample_view
from attnviz.app.exports import ViewResult, register_view
from attnviz.figures.heads import fig_head_grid
from attnviz.figures.vlm import (
    fig_image_attention,
    fig_sink_frequency,
    fig_token_ratios,
    image_heat,
    plain_text,
    sink_cells,
)
from attnviz.store.reader import Recording


@register_view("vlm_heads", "Vision-language: image attention ratio and VHD of every language-model head", order=70)
def _heads(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "lvlm":
        return None
    out = []
    for name, title in (("image_attention_ratio", "Image attention ratio (mean over every answer token)"),
                        ("vhd", "Vision-aware head divergence, VHD (He et al. 2025)")):
        if name in rec.head_metrics():
            out.append((name, fig_head_grid(rec.head_metric(name), metric=name, title=title)))
    return out or None


@register_view("vlm_sinks", "Vision-language: where the visual sink tokens are, per layer", order=71)
def _sinks(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "lvlm":
        return None
    s = load_summary(rec)
    if s is None or "sink_frequency" not in s or not np.any(s["sink_frequency"]):
        return None  # no sinks recorded, or none found
    grid, _, offset = image_grid(rec)
    return fig_sink_frequency(s["sink_frequency"], grid, offset=offset, tau=s["params"].get("tau"),
                              title="Visual sink tokens per layer")


@register_view("vlm_answer", "Vision-language: the most image-attentive head's attention for each answer token",
               per_sample=True, order=72)
def _answer(rec: Recording, sample: int | None) -> ViewResult:
    if rec.family != "lvlm" or sample is None:
        return None
    v = sample_view(rec, sample)
    means = (rec.head_metric("image_attention_ratio") if "image_attention_ratio" in rec.head_metrics()
             else v.image_ratio.mean(-1))
    layer, head = np.unravel_index(int(np.nanargmax(means)), means.shape)
    meta = rec.meta(sample)
    toks = [str(t) for t in meta.get("generated_tokens", [])][: v.n_steps]
    grid, patch_size, offset = image_grid(rec)
    sinks = sink_cells(v.sinks[layer], grid, offset) if v.sinks is not None else []
    out = []
    for j, tok in enumerate(toks):
        heat = image_heat(v.rows[layer, head, j], v.image_span, grid, offset)
        out.append((f"token{j}", fig_image_attention(
            rec.thumbnail(sample), heat, patch_size=patch_size, sinks=sinks,
            title=f"'{plain_text(meta.get('prompt', ''))}' → '{plain_text(meta.get('generated', ''))}': L{layer} H{head}, "
                  f"token '{plain_text(tok)}'",
            subtitle=f"{v.image_ratio[layer, head, j]:.0%} of its attention on the image")))
    out.append(("tokens", fig_token_ratios(toks, v.image_ratio[layer, head], vhd=None if v.vhd is None
                                           else v.vhd[layer, head], title=f"L{layer} H{head} at each answer token")))
    return out
