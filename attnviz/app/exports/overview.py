"""Views of the overview, all-heads and explorer pages."""

from __future__ import annotations

from attnviz.app.exports import ViewResult, register_view
from attnviz.store.reader import Recording


@register_view("all_heads", "All heads", order=10)
def _all_heads(rec: Recording, sample: int | None) -> ViewResult:
    from attnviz.analysis.head_stats import compute_head_stats
    from attnviz.figures.heads import fig_head_grid

    figs = []
    stored = [m for m in rec.head_metrics() if rec.head_metric(m).shape == rec.stack_shape()]
    for name in stored:
        info = rec.head_metric_info(name)
        figs.append((name, fig_head_grid(rec.head_metric(name), metric=name, units=info.units,
                                         title=f"All heads: {name}")))
    if not stored:
        stats = compute_head_stats(rec, max_samples=None if rec.n_samples <= 64 else 64)
        for name, values in stats.as_dict().items():
            figs.append((name, fig_head_grid(values, metric=name, title=f"All heads: {name} ({stats.n_samples} samples)")))
    return figs


@register_view("model_card", "Model", order=0)
def _model_card(rec: Recording, sample: int | None) -> ViewResult:
    from attnviz.app.views import model_card
    from attnviz.figures.overview import fig_model_card

    return fig_model_card(model_card(rec))


@register_view("inputs", "Inputs (border: correct / incorrect)", order=1)
def _inputs(rec: Recording, sample: int | None) -> ViewResult:
    from attnviz.app.views import thumbnail_page

    if not rec.has_thumbnails:  # audio inputs: the speech views show the clips
        return None
    return thumbnail_page(rec, colour_by="correctness", per_page=160, cols=16,
                          title=f"Inputs: first {min(rec.n_samples, 160)} of {rec.n_samples}").figure


def _explorer_head(rec: Recording) -> tuple[int, int]:
    """The head the per-sample explorer views show: the last layer's most confident head when
    confidence is stored, else head 0 of the last layer."""
    layer = rec.n_layers - 1
    if "confidence" in rec.head_metrics() and rec.head_metric("confidence").shape == rec.stack_shape():
        return layer, int(rec.head_metric("confidence")[layer].argmax())
    return layer, 0


@register_view("explorer", "Attention explorer", per_sample=True, order=12)
def _explorer(rec: Recording, sample: int | None) -> ViewResult:
    from attnviz.app import views

    kind = views.explorer_kind(rec)
    if kind is None or sample is None:
        return None
    layer, head = _explorer_head(rec)
    n_layers, n_heads = rec.stack_shape(kind)
    layer, head = min(layer, n_layers - 1), min(head, n_heads - 1)
    out = [
        (f"query_L{layer}H{head}", views.query_overlay(rec, sample, layer, head, None, kind)),
        (f"heads_L{layer}", views.head_multiples(rec, sample, layer, head, None, kind)),
        ("attributions", views.attribution_panels(rec, sample, kind).update_layout(width=max(900, 300 * (2 + len(rec.attribution_methods()))))),
    ]
    if rec.layout(kind).n_prefix:
        out.insert(1, (f"cls_L{layer}H{head}", views.cls_overlay(rec, sample, layer, head, kind)))
    return out
