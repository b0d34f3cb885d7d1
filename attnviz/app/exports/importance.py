"""Views of the head-importance page (the stored importance results; skipped when absent)."""

from __future__ import annotations

from attnviz.analysis import importance as A
from attnviz.app.exports import register_view
from attnviz.figures.heads import fig_head_grid
from attnviz.figures.importance import fig_pruning_curves, fig_spearman_table


@register_view("importance_metrics", "Head importance metrics (layers x heads)", order=30)
def _metrics(rec, sample):
    names = [m for m in (*A.METRIC_DEFINITIONS, "entropy", "confidence") if m in rec.head_metrics()]
    if not any(m in A.METRIC_DEFINITIONS for m in names):
        return None
    return [(m, fig_head_grid(rec.head_metric(m), metric=m, units=rec.head_metric_info(m).units,
                              title=m.replace("_", " "))) for m in names]


@register_view("importance_pruning", "Iterative pruning curves with the random baseline", order=31)
def _pruning(rec, sample):
    c = A.read_importance(rec)
    if c is None:
        return None
    rb = c.random
    n_l, n_h = c.partial_accuracy.shape[:2]
    return fig_pruning_curves(c.pruning_fractions, {m: c.curve(m) for m in c.pruning_metrics},
                              random_mean=rb.mean, random_std=rb.std, random_low=rb.low, random_high=rb.high,
                              auc=c.auc, random_auc=(rb.auc_mean, rb.auc_std), n_heads_total=n_l * n_h,
                              title=f"Pruning curves (targets: {c.target_source}s, {c.ablation} ablation)")


@register_view("importance_correlation", "Spearman rank correlation between head metrics", order=32)
def _correlation(rec, sample):
    names = [m for m in (*A.METRIC_DEFINITIONS, "entropy", "confidence") if m in rec.head_metrics()]
    if not any(m in A.METRIC_DEFINITIONS for m in names):
        return None
    names, rho = A.spearman_table({m: rec.head_metric(m) for m in names})
    return fig_spearman_table(names, rho, title="Spearman rank correlation over heads")
