"""Pruning-based head importance: metric definitions, pruning orders and curves, their comparison.

Pure numpy (scipy for the rank correlation); the model side that measures the metrics lives in
``extractor/importance.py``. Definitions of the metrics (the same text is stored with each head
metric in the file and shown on the Heads page; ``docs/importance.md`` has the long form):

* ``accuracy_drop``  Acc(f) - Acc(f with head h ablated), over the data; ablation = the head's
  output at the output-projection input set to zero (or to its mean over the data with
  ``--ablation mean``). Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?",
  NeurIPS 2019, Sec. 3 (single-head ablation).
* ``loss_increase``  mean_x [ CE(f_{-h}(x), y) - CE(f(x), y) ] (nats), same ablation.
* ``kl_divergence``  mean_x KL( p_f(.|x) || p_{f_{-h}}(.|x) ) (nats), same ablation.
* ``gradient_importance``  I_h = E_x | A_h(x)^T dL(x)/dA_h(x) |, A_h = head h's output at the
  output-projection input (all positions), L = cross-entropy; then I_l,: / ||I_l,:||_2 per layer.
  Michel et al. 2019, Sec. 4.1, Eq. 2 and the layer-wise l2 normalisation of Sec. 4.1
  (after Molchanov et al., ICLR 2017).
* ``entropy`` and ``confidence`` come from the recorded maps (``attnviz.analysis.head_stats``);
  confidence is the "confident heads" measure of Voita et al., ACL 2019.

Targets. With labels on every input the targets are the labels; otherwise the unablated model's own
predictions ("agreement"). A backbone without a classification head has no classes: its targets are
the inputs themselves (``target_source = "embedding"``). The scores of an input are the cosine
similarities of its (ablated) pooled embedding to the unablated embeddings ``r_1 .. r_N`` of all N
evaluation inputs, over a temperature: ``z_j(x_i) = cos(e(x_i), r_j) / tau``, ``tau = 0.1``; the target
of ``x_i`` is ``i``. "Accuracy" is then retrieval accuracy (the ablated embedding is still nearest its
own unablated one), the loss is the InfoNCE cross-entropy of that retrieval (van den Oord, Li & Vinyals
2018, "Representation Learning with Contrastive Predictive Coding"; the instance discrimination of Wu
et al. 2018) and the KL compares the retrieval distributions: every metric above keeps its definition.

Iterative pruning (Michel et al. 2019, Sec. 4.2): heads are removed cumulatively from the least to
the most important by a metric, in steps of 10% of all heads, and the accuracy recorded after
each step; a metric that ranks well keeps the accuracy high for longer, so the area under the
curve (:func:`curve_auc`, fraction of heads pruned on [0, 1]) compares metrics. Random orders give
the baseline every metric should beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MetricDefinition",
    "ABLATION_METRICS",
    "GRADIENT_METRIC",
    "METRIC_DEFINITIONS",
    "PARTIAL_FRACTIONS",
    "l2_normalize_per_layer",
    "pruning_order",
    "pruning_fractions",
    "pruning_masks",
    "random_orders",
    "curve_auc",
    "RandomBaseline",
    "random_baseline",
    "spearman_table",
    "ANALYSIS_NAME",
    "ImportanceCurves",
    "read_importance",
    "TARGET_SOURCES",
    "RETRIEVAL_TEMPERATURE",
    "accuracy_name",
    "target_note",
]

#: temperature of the retrieval scores of a backbone's importance run (see the module docstring)
RETRIEVAL_TEMPERATURE = 0.1

#: target source -> (what its "accuracy" is called, one sentence on what the targets were)
TARGET_SOURCES: dict[str, tuple[str, str]] = {
    "label": ("accuracy", "Targets: the true labels."),
    "prediction": ("agreement with the unablated model",
                   "Targets: the model's own predictions (the inputs had no labels), so 'accuracy' is agreement "
                   "with the unablated model and the loss is measured against its predictions."),
    "embedding": ("retrieval accuracy",
                  "Targets: each input's own embedding (the model has no classification head). Scores are the "
                  "cosine similarities of an input's embedding to the unablated embeddings of every input, over "
                  f"a temperature of {RETRIEVAL_TEMPERATURE}; 'accuracy' is retrieval accuracy (the ablated "
                  "embedding is still nearest its own unablated one), the loss its InfoNCE cross-entropy."),
}


def accuracy_name(target_source: str) -> str:
    """What "accuracy" means for runs with these targets (axis titles, messages)."""
    return TARGET_SOURCES.get(target_source, ("accuracy", ""))[0]


def target_note(target_source: str) -> str:
    """One sentence on what the targets of a run were."""
    return TARGET_SOURCES.get(target_source, ("", f"Targets: {target_source}."))[1]


@dataclass(frozen=True)
class MetricDefinition:
    """What a head metric means: stored with it in the file and shown beside the metric selector."""

    name: str
    label: str
    definition: str
    citation: str
    units: str
    higher_is_more_important: bool = True


MICHEL_2019 = ("Michel, P., Levy, O. & Neubig, G. (2019). Are Sixteen Heads Really Better than One? "
               "NeurIPS 2019. arXiv:1905.10650")
VOITA_2019 = ("Voita, E., Talbot, D., Moiseev, F., Sennrich, R. & Titov, I. (2019). Analyzing Multi-Head "
              "Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned. ACL 2019. "
              "arXiv:1905.09418")

METRIC_DEFINITIONS: dict[str, MetricDefinition] = {
    "accuracy_drop": MetricDefinition(
        "accuracy_drop", "Accuracy drop",
        "Acc(model) - Acc(model with head h ablated) over the data; ablated = the head's output at the "
        "input of the attention output projection replaced by zero (or by its mean over the data).",
        MICHEL_2019 + ", Sec. 3 (single-head ablation)", "accuracy (fraction)"),
    "loss_increase": MetricDefinition(
        "loss_increase", "Loss increase",
        "mean over x of CE(model with head h ablated; x, y) - CE(model; x, y), cross-entropy in nats.",
        MICHEL_2019 + ", Sec. 3 (single-head ablation, measured by the loss)", "nats"),
    "kl_divergence": MetricDefinition(
        "kl_divergence", "KL divergence",
        "mean over x of KL(p_model(.|x) || p_ablated(.|x)) = sum_c p(c|x) [log p(c|x) - log p_ablated(c|x)], "
        "the change of the whole output distribution when head h is ablated (nats).",
        MICHEL_2019 + ", Sec. 3 (single-head ablation); KL as the output-change measure", "nats"),
    "gradient_importance": MetricDefinition(
        "gradient_importance", "Gradient importance",
        "I_h = E_x |A_h(x)^T dL(x)/dA_h(x)|, A_h = head h's output at the input of the output projection "
        "(all positions), L = cross-entropy loss; = |dL/d xi_h| for a gate xi_h = 1 multiplying the head. "
        "Normalised per layer: I_l,h / ||I_l,:||_2.",
        MICHEL_2019 + ", Sec. 4.1, Eq. 2; layer-wise l2 normalisation after Molchanov et al. (ICLR 2017)",
        "unitless (l2-normalised per layer)"),
}
ABLATION_METRICS = ("accuracy_drop", "loss_increase", "kl_divergence")
GRADIENT_METRIC = "gradient_importance"

# Keep fractions of partial pruning, 1.0 (untouched) down to 0.1.
PARTIAL_FRACTIONS = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))


def l2_normalize_per_layer(values: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Divide each layer's row by its l2 norm (Michel et al. 2019, Sec. 4.1).

    Args:
        values: float ``[layer, head]``.

    Returns:
        float64 ``[layer, head]``; a layer whose values are all 0 stays 0.
    """
    v = np.asarray(values, dtype=np.float64)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, eps)


def pruning_order(values: np.ndarray, higher_is_more_important: bool = True) -> np.ndarray:
    """Flat head indices (``layer * n_heads + head``) from the least to the most important.

    Args:
        values: float ``[layer, head]``; NaN counts as least important.
        higher_is_more_important: False for metrics where a small value means important.

    Returns:
        int64 ``[layer * head]``. Ties keep the (layer, head) order (stable sort).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    key = v if higher_is_more_important else -v
    key = np.where(np.isnan(key), -np.inf, key)
    return np.argsort(key, kind="stable").astype(np.int64)


def pruning_fractions(steps: int = 10) -> np.ndarray:
    """Fractions of all heads pruned: ``[steps + 1]`` = 0, 1/steps, ..., 1."""
    return np.linspace(0.0, 1.0, steps + 1)


def pruning_masks(order: np.ndarray, shape: tuple[int, int], fractions: np.ndarray) -> np.ndarray:
    """Cumulative pruning masks: step s ablates the first ``round(fractions[s] * n)`` heads of ``order``.

    Args:
        order: int ``[n]`` flat head indices, least important first (:func:`pruning_order`).
        shape: (n_layers, n_heads), ``n = n_layers * n_heads``.
        fractions: float ``[steps]`` in [0, 1].

    Returns:
        bool ``[steps, layer, head]``, True = ablated.
    """
    n = shape[0] * shape[1]
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}")
    counts = np.rint(np.asarray(fractions) * n).astype(int)
    masks = np.zeros((len(counts), n), dtype=bool)
    for s, c in enumerate(counts):
        masks[s, order[:c]] = True
    return masks.reshape(len(counts), *shape)


def random_orders(n: int, seeds: int | list[int]) -> np.ndarray:
    """Random pruning orders: int64 ``[n_seeds, n]``, one permutation per seed (numpy default_rng)."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return np.stack([np.random.default_rng(s).permutation(n) for s in seed_list]).astype(np.int64)


def curve_auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Area under a pruning curve by the trapezoid rule.

    Args:
        fractions: float ``[steps]``, increasing, usually 0..1.
        values: float ``[steps]`` (accuracy after pruning each fraction).

    Returns:
        the area; for fractions spanning [0, 1] it is the mean accuracy over the pruning range.
    """
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


@dataclass(frozen=True)
class RandomBaseline:
    """Pruning curves of random orders summarised per step (all ``[steps]``) and their AUCs."""

    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    auc_mean: float
    auc_std: float


def random_baseline(fractions: np.ndarray, curves: np.ndarray) -> RandomBaseline:
    """Mean, standard deviation (ddof=0), min and max over seeds of random-order pruning curves.

    Args:
        fractions: float ``[steps]``.
        curves: float ``[seed, steps]``.
    """
    c = np.asarray(curves, dtype=np.float64)
    aucs = np.array([curve_auc(fractions, row) for row in c])
    return RandomBaseline(mean=c.mean(0), std=c.std(0), low=c.min(0), high=c.max(0),
                          auc_mean=float(aucs.mean()), auc_std=float(aucs.std()))


def spearman_table(metrics: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Spearman rank correlation between every pair of head metrics (over all heads).

    Args:
        metrics: name -> float ``[layer, head]`` (same shape for all).

    Returns:
        (names, rho float64 ``[metric, metric]``); rho is NaN where a metric is constant.
    """
    from scipy.stats import spearmanr

    names = list(metrics)
    m = len(names)
    rho = np.eye(m)
    cols = [np.asarray(metrics[k], dtype=np.float64).ravel() for k in names]
    for i in range(m):
        if np.ptp(cols[i]) == 0:
            rho[i, i] = np.nan
        for j in range(i + 1, m):
            if np.ptp(cols[i]) == 0 or np.ptp(cols[j]) == 0:
                r = np.nan
            else:
                r = float(spearmanr(cols[i], cols[j]).statistic)
            rho[i, j] = rho[j, i] = r
    return names, rho


# -- the stored result ----------------------------------------------------------------------------

ANALYSIS_NAME = "importance"


@dataclass(frozen=True)
class ImportanceCurves:
    """Everything head importance stores besides the head metrics, at ``analyses/importance``.

    Attributes:
        target_source: "label" (true labels), "prediction" (the unablated model's predictions
            served as targets because the data had no labels) or "embedding" (a backbone: each input's
            own unablated embedding, see the module docstring); :data:`TARGET_SOURCES`.
        ablation: "zero" or "mean".
        n_samples: samples the metrics were measured on.
        base_accuracy / base_loss: the unablated model on those samples.
        partial_fractions: float ``[p]`` keep fractions, 1.0 down to 0.1.
        partial_accuracy / partial_loss / partial_kl: float ``[layer, head, p]``: one head partially
            pruned (top-p of each attention row kept, renormalised), all others intact.
        pruning_fractions: float ``[step]`` fractions of all heads pruned, 0 .. 1.
        pruning_metrics: the metric of each pruning curve, ``[metric]``.
        pruning_accuracy: float ``[metric, step]`` accuracy after pruning the least important heads.
        pruning_order: int ``[metric, layer * head]`` flat head indices, least important first.
        random_accuracy: float ``[seed, step]`` pruning in random orders.
        gradient_raw: float ``[layer, head]`` gradient importance before the per-layer normalisation.
    """

    target_source: str
    ablation: str
    n_samples: int
    base_accuracy: float
    base_loss: float
    partial_fractions: np.ndarray
    partial_accuracy: np.ndarray
    partial_loss: np.ndarray
    partial_kl: np.ndarray
    pruning_fractions: np.ndarray
    pruning_metrics: tuple[str, ...]
    pruning_accuracy: np.ndarray
    pruning_order: np.ndarray
    random_accuracy: np.ndarray
    gradient_raw: np.ndarray

    @property
    def auc(self) -> dict[str, float]:
        """Area under each metric's pruning curve (:func:`curve_auc`)."""
        return {m: curve_auc(self.pruning_fractions, self.pruning_accuracy[i])
                for i, m in enumerate(self.pruning_metrics)}

    @property
    def random(self) -> RandomBaseline:
        return random_baseline(self.pruning_fractions, self.random_accuracy)

    def curve(self, metric: str) -> np.ndarray:
        """float ``[step]``: the pruning curve of one metric."""
        return self.pruning_accuracy[list(self.pruning_metrics).index(metric)]

    _ARRAYS = ("partial_fractions", "partial_accuracy", "partial_loss", "partial_kl", "pruning_fractions",
               "pruning_accuracy", "pruning_order", "random_accuracy", "gradient_raw")
    _SCALARS = ("target_source", "ablation", "n_samples", "base_accuracy", "base_loss")

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        """(arrays, attributes) for :func:`attnviz.store.cache.save_analysis`."""
        arrays = {k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        arrays["pruning_metrics"] = np.array(self.pruning_metrics, dtype=object)
        rb = self.random
        attrs: dict[str, object] = {k: getattr(self, k) for k in self._SCALARS}
        attrs.update({f"auc_{m}": v for m, v in self.auc.items()})
        attrs.update(random_auc_mean=rb.auc_mean, random_auc_std=rb.auc_std)
        return arrays, attrs

    @classmethod
    def from_group(cls, group) -> ImportanceCurves:  # group: h5py.Group (no h5py import here)
        """Read back what :meth:`to_arrays` stored (``group`` = ``rec.analysis_group("importance")``)."""
        kw: dict[str, object] = {k: group[k][()] for k in cls._ARRAYS}
        names = group["pruning_metrics"][()]
        kw["pruning_metrics"] = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        for k in cls._SCALARS:
            v = group.attrs[k]
            kw[k] = v.decode() if isinstance(v, bytes) else v
        kw["n_samples"] = int(kw["n_samples"])
        kw["base_accuracy"] = float(kw["base_accuracy"])
        kw["base_loss"] = float(kw["base_loss"])
        kw["target_source"] = str(kw["target_source"])
        kw["ablation"] = str(kw["ablation"])
        return cls(**kw)


def read_importance(rec) -> ImportanceCurves | None:  # rec: attnviz Recording
    """The stored importance curves of a recording, or None when ``attnviz importance`` never ran."""
    g = rec.analysis_group(ANALYSIS_NAME)
    if g is None or "pruning_accuracy" not in g:
        return None
    return ImportanceCurves.from_group(g)
