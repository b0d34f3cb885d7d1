"""Views of the query-key page (the cached joint embedding; skipped when absent)."""

from __future__ import annotations

import numpy as np

from attnviz.analysis.qk import load_qk_embedding
from attnviz.app.exports import ViewResult, register_view
from attnviz.figures.qk import fig_qk_multiples, fig_qk_scatter
from attnviz.store.reader import Recording


@register_view("qk_heads", "Query-key embedding of every head (AttentionViz)", order=60)
def _heads(rec: Recording, sample: int | None) -> ViewResult:
    emb = load_qk_embedding(rec)
    if emb is None:
        return None
    return fig_qk_multiples(emb.query_xy, emb.key_xy, agreement=emb.agreement,
                            title=f"Joint query-key embeddings ({emb.method}, {emb.n_points} tokens per head)")


@register_view("qk_head", "Query-key embedding: the heads whose geometry best matches their attention", order=61)
def _best(rec: Recording, sample: int | None) -> ViewResult:
    emb = load_qk_embedding(rec)
    if emb is None:
        return None
    lay = rec.layout(emb.kind)
    flat = np.argsort(-np.nan_to_num(emb.agreement, nan=-1).ravel(), kind="stable")[:2]
    out = []
    for f in flat:
        layer, head = divmod(int(f), emb.agreement.shape[1])
        for colour_by in ("role", "mask" if (emb.in_mask >= 0).any() else "position"):
            out.append((f"L{layer}H{head}_{colour_by}", fig_qk_scatter(
                emb.query_xy[layer, head], emb.key_xy[layer, head], sample=emb.sample, position=emb.position,
                row=emb.row, col=emb.col, in_mask=emb.in_mask, colour_by=colour_by, prefix_names=lay.prefix_names,
                title=f"L{layer} H{head}: queries ● and keys ◆ ({emb.method})",
                subtitle=f"nearest key = top key for {emb.agreement[layer, head]:.0%} (chance {emb.chance:.0%})")))
    return out
