"""Views of the patterns page (the cached pattern atlas; skipped when absent)."""

from __future__ import annotations

from attnviz.app.exports import register_view
from attnviz.figures.patterns import (
    cluster_label,
    fig_dominant_grid,
    fig_head_dendrogram,
    fig_head_mix,
    fig_pattern_scatter,
    fig_training,
    gallery_figure,
)


def atlas_of(rec):  # noqa: ANN001, ANN202
    from attnviz.analysis.patterns import load_atlas

    return load_atlas(rec)


@register_view("patterns_atlas", "Pattern atlas: UMAP of every sampled map, coloured by cluster", order=50)
def _scatter(rec, sample):  # noqa: ANN001, ANN202
    a = atlas_of(rec)
    if a is None:
        return None
    names = [cluster_label(f["cluster"], f) for f in a.prototype_facts()]
    return fig_pattern_scatter(a.embedding, cluster=a.cluster, layer=a.layer, head=a.head, sample=a.sample,
                               query=a.query, grid=a.grid, cluster_names=names,
                               title=f"Pattern atlas: {a.n_maps} maps, {a.n_clusters} clusters")


@register_view("patterns_prototypes", "Pattern atlas: cluster prototypes and their nearest maps", order=51)
def _gallery(rec, sample):  # noqa: ANN001, ANN202
    from attnviz.analysis.patterns import map_detail

    a = atlas_of(rec)
    if a is None:
        return None
    return gallery_figure(rec, a, map_detail)


@register_view("patterns_heads", "Pattern atlas: heads by dominant pattern, mixes and dendrogram", order=52)
def _heads(rec, sample):  # noqa: ANN001, ANN202
    a = atlas_of(rec)
    if a is None:
        return None
    names = [cluster_label(f["cluster"], f) for f in a.prototype_facts()]
    labels = [f"L{l_}H{h_}" for l_ in range(a.n_layers) for h_ in range(a.n_heads)]
    order = a.head_order
    return [
        ("grid", fig_dominant_grid(a.dominant, a.mix, head_order=order, names=names,
                                   title="Heads by dominant pattern (ordered by mix within each layer)")),
        ("mix", fig_head_mix(a.mix.reshape(-1, a.n_clusters)[order], labels=[labels[i] for i in order],
                             noise=a.noise.reshape(-1)[order] if a.noise.any() else None, names=names,
                             title="Pattern mix of every head (dendrogram order)")),
        ("dendrogram", fig_head_dendrogram(a.linkage, n_heads=a.n_heads, dominant=a.dominant, names=names,
                                           title="Heads clustered by pattern mix")),
        ("training", fig_training(a.train_loss, a.val_loss, k_candidates=a.k_candidates, silhouette=a.silhouette,
                                  chosen_k=a.n_clusters, title="Autoencoder training and choice of K")),
    ]
