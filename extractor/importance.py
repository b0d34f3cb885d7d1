"""Pruning-based head importance, measured on a model (the definitions: ``attnviz.analysis.importance``).

For one attention stack (its output projections, :class:`~extractor.hooks.HeadSites`) and a set of
evaluation batches this measures, per head:

* single-head ablation: ``accuracy_drop``, ``loss_increase``, ``kl_divergence`` (zero ablation, or
  the head's mean output over the data with ``ablation="mean"``);
* ``gradient_importance`` (Michel et al. 2019): per-row scalar gates on every head, one forward +
  backward per batch, ``|d loss / d gate|`` averaged over samples, l2-normalised per layer;
* partial pruning: accuracy/loss/KL with one head keeping only the top-p of each attention row;
* iterative pruning curves per metric and for random orders.

Speed: ablations are independent, so K of them run in one forward on K copies of the batch
(rows copy-major) with a different head mask per row (``mask: [K * batch, layer, head]``).
Interventions are grouped by the first layer they change, and the layers before it run once on
the plain batch, which is copied only at that layer (:func:`extractor.hooks.expand_batch`): a
single-head ablation in layer l recomputes layers l.. only. Ablations that change nothing (every
pruning curve starts with no head pruned) are not run, and identical masks run once.
:func:`evaluate_ablations_loop` is the one-forward-per-ablation reference (tests and
``benchmarks/importance.py`` compare the two).

Targets: the labels when every sample has one, else the unablated model's own predictions
(``target_source = "prediction"``; the accuracy then measures agreement with the intact model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnviz.analysis import importance as A
from attnviz.errors import InputError
from extractor.hooks import (
    HeadSites,
    ablate_heads,
    capture_head_outputs,
    expand_batch,
    partial_attention,
    scale_heads,
)

__all__ = [
    "ImportanceOptions",
    "EvalData",
    "EvalResult",
    "ImportanceResult",
    "default_logits_fn",
    "prepare_eval_data",
    "evaluate_ablations",
    "evaluate_ablations_loop",
    "evaluate_partial",
    "gradient_importance",
    "mean_head_outputs",
    "single_head_masks",
    "auto_max_rows",
    "retrieval_logits_fn",
    "compute_importance",
    "store_importance",
    "ABLATIONS",
]

ABLATIONS = ("zero", "mean")
LogitsFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def default_logits_fn(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``model(**inputs).logits``: float ``[batch, classes]``."""
    return model(**inputs).logits


@dataclass(frozen=True)
class ImportanceOptions:
    """Parameters of one importance run (stored with the result; equal options = cached result).

    Attributes:
        ablation: "zero" or "mean" (replace a head by its mean output over the data, per position).
        partial_fractions: keep fractions p of partial pruning, from 1.0 down.
        prune_steps: pruning curves remove 1/prune_steps of all heads per step.
        random_seeds: random pruning orders for the baseline.
        max_rows: rows per forward (ablations x samples); bounds memory. None = by device: 64 on the
            CPU (larger batches cost more per row there: the activations leave the cache), 2048 on a GPU.
        progress: show a progress bar (ablations done / total) on stderr.
    """

    ablation: str = "zero"
    partial_fractions: tuple[float, ...] = A.PARTIAL_FRACTIONS
    prune_steps: int = 10
    random_seeds: int = 5
    max_rows: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise InputError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if not self.partial_fractions or any(not 0 < p <= 1 for p in self.partial_fractions):
            raise InputError("partial-pruning fractions must lie in (0, 1]")
        if self.prune_steps < 1 or self.random_seeds < 1 or (self.max_rows is not None and self.max_rows < 1):
            raise InputError("prune_steps, random_seeds and max_rows must be >= 1")

    def params(self) -> dict[str, Any]:
        """What changes the result (not ``max_rows``/``progress``)."""
        d = asdict(self)
        d.pop("max_rows")
        d.pop("progress")
        d["partial_fractions"] = list(self.partial_fractions)
        return d


@dataclass
class EvalData:
    """The evaluation set, prepared once.

    Attributes:
        inputs: per batch, the model's keyword inputs (CPU tensors, e.g. ``pixel_values [b, 3, H, W]``).
        targets: per batch, int64 ``[b]``: labels, or the unablated predictions.
        base_logp: per batch, float32 ``[b, classes]``: log-softmax of the unablated model.
        target_source: "label" or "prediction".
    """

    inputs: list[dict[str, Any]]
    targets: list[torch.Tensor]
    base_logp: list[torch.Tensor]
    target_source: str

    @property
    def n_samples(self) -> int:
        return int(sum(t.shape[0] for t in self.targets))

    @property
    def max_batch(self) -> int:
        return max(int(t.shape[0]) for t in self.targets)

    @property
    def base_accuracy(self) -> float:
        correct = sum(int((lp.argmax(-1) == t).sum()) for lp, t in zip(self.base_logp, self.targets))
        return correct / self.n_samples

    @property
    def base_loss(self) -> float:
        total = sum(float(-lp.gather(-1, t[:, None]).sum()) for lp, t in zip(self.base_logp, self.targets))
        return total / self.n_samples


@dataclass(frozen=True)
class EvalResult:
    """Per evaluated intervention (all float64 ``[K]``): accuracy, mean cross-entropy (nats) and mean
    KL(p_unablated || p_intervened) (nats) over the evaluation set."""

    accuracy: np.ndarray
    loss: np.ndarray
    kl: np.ndarray

    def take(self, index: np.ndarray) -> EvalResult:
        return EvalResult(self.accuracy[index], self.loss[index], self.kl[index])


@dataclass(frozen=True)
class ImportanceResult:
    """Head metrics (each float ``[layer, head]``) and the curves of one importance run."""

    metrics: dict[str, np.ndarray]
    curves: A.ImportanceCurves
    options: ImportanceOptions
    stack_kind: str = "self"
    extra_params: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return {**self.options.params(), "target_source": self.curves.target_source,
                "n_samples": self.curves.n_samples, **self.extra_params}


# -- plumbing -----------------------------------------------------------------------------------


def _to(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _replicate(inputs: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Every tensor repeated ``k`` times along the batch axis, copy-major: row ``c * b + j`` is sample j."""
    if k == 1:
        return dict(inputs)
    return {n: v.repeat(k, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) else v for n, v in inputs.items()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _stats(logits: torch.Tensor, k: int, targets: torch.Tensor, base_logp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums over the batch of correct, cross-entropy and KL for each of ``k`` copies: three ``[k]``."""
    b = targets.shape[0]
    logp = F.log_softmax(logits.float(), dim=-1).view(k, b, -1)
    t = targets.to(logp.device)
    nll = -logp.gather(-1, t.view(1, b, 1).expand(k, b, 1)).squeeze(-1)
    correct = (logp.argmax(-1) == t.view(1, b)).to(torch.float64)
    base = base_logp.to(logp.device).unsqueeze(0)
    kl_terms = torch.where(base > -math.inf, base.exp() * (base - logp), torch.zeros((), device=logp.device))
    kl = kl_terms.sum(-1)
    return correct.sum(1), nll.double().sum(1), kl.double().sum(1)


class _Bar:
    """tqdm over ablations (interventions) done / total; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="head importance", unit="ablation", dynamic_ncols=True)

    def add_total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.total += n
            self._bar.refresh()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def prepare_eval_data(model: nn.Module, batches: Sequence[Mapping[str, Any]],
                      labels: Sequence[np.ndarray | torch.Tensor] | None = None, *,
                      logits_fn: LogitsFn = default_logits_fn,
                      forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> EvalData:
    """Run the unablated model once and fix the targets.

    Args:
        batches: model keyword inputs per batch (tensors on any device; kept on the CPU).
        labels: int ``[b]`` per batch, -1 = unknown; None = no labels.

    Returns:
        :class:`EvalData`; targets are the labels when every sample has one, else the predictions.
    """
    if not batches:
        raise InputError("no inputs to measure head importance on")
    device = _device(model)
    cpu_inputs, base_logp, preds = [], [], []
    with torch.no_grad(), forward_context():  # no_grad, not inference_mode: targets feed autograd later
        for inp in batches:
            logits = logits_fn(model, _to(inp, device))
            lp = F.log_softmax(logits.float(), dim=-1).cpu()
            base_logp.append(lp)
            preds.append(lp.argmax(-1))
            cpu_inputs.append(_to(inp, torch.device("cpu")))
    lab = [torch.as_tensor(np.asarray(x), dtype=torch.int64) for x in labels] if labels is not None else None
    if lab is not None and all(bool((x >= 0).all()) for x in lab):
        if [len(x) for x in lab] != [len(p) for p in preds]:
            raise InputError("labels and batches differ in size")
        targets, source = lab, "label"
    else:
        targets, source = preds, "prediction"
    return EvalData(inputs=cpu_inputs, targets=targets, base_logp=base_logp, target_source=source)


# -- evaluation engines ---------------------------------------------------------------------------


def _first_layers(values: np.ndarray, untouched: float | bool) -> np.ndarray:
    """int ``[K]``: the first layer each intervention ``values [K, layer, head]`` changes (n_layers: none)."""
    touched = (np.asarray(values) != untouched).any(-1)  # [K, layer]
    return np.where(touched.any(1), touched.argmax(1), touched.shape[1])


def _evaluate(model: nn.Module, sites: HeadSites, data: EvalData, first_layers: np.ndarray,
              intervene: Callable[[np.ndarray, int], ContextManager[Any]], *, logits_fn: LogitsFn,
              max_rows: int | None,
              forward_context: Callable[[], ContextManager[Any]], bar: _Bar | None) -> EvalResult:
    """Evaluate interventions ``chunk`` at a time on ``chunk`` copies of each batch.

    Interventions are grouped by the first layer they change, so a chunk shares the layers before
    it: the batch runs through them once and is copied at that layer
    (:func:`extractor.hooks.expand_batch`); without known layer modules the inputs are replicated
    instead. An intervention that changes nothing is the unablated model (not run).
    ``intervene(idx, b)`` returns the context applying interventions ``idx`` to ``len(idx) * b``
    rows, copy-major.
    """
    device = _device(model)
    n = len(first_layers)
    chunk = max(1, (max_rows or auto_max_rows(device)) // data.max_batch)
    sums = np.zeros((3, n), np.float64)
    noop = first_layers >= sites.n_layers
    m = data.n_samples
    sums[:, noop] = np.array([[data.base_accuracy * m], [data.base_loss * m], [0.0]])
    # chunks never mix first layers: each shares the longest possible prefix
    chunks = []
    for layer in np.unique(first_layers[~noop]):
        group = np.flatnonzero(first_layers == layer)
        chunks += [group[i:i + chunk] for i in range(0, len(group), chunk)]
    if bar is not None:
        bar.update(int(noop.sum()))
    with torch.inference_mode(), forward_context():
        for idx in chunks:
            k = len(idx)
            from_layer = int(first_layers[idx[0]])
            for inp, tgt, blp in zip(data.inputs, data.targets, data.base_logp):
                b = int(tgt.shape[0])
                x = _to(inp, device)
                with contextlib.ExitStack() as stack:
                    if sites.layer_modules:
                        stack.enter_context(expand_batch(sites, from_layer, k))
                    else:
                        x = _replicate(x, k)
                    stack.enter_context(intervene(idx, b))
                    logits = logits_fn(model, x)
                for i, s in enumerate(_stats(logits, k, tgt, blp)):
                    sums[i, idx] += s.cpu().numpy()
            if bar is not None:
                bar.update(k)
    return EvalResult(accuracy=sums[0] / m, loss=sums[1] / m, kl=sums[2] / m)


def evaluate_ablations(model: nn.Module, sites: HeadSites, data: EvalData, masks: np.ndarray | torch.Tensor, *,
                       replacement: torch.Tensor | None = None, logits_fn: LogitsFn = default_logits_fn,
                       max_rows: int | None = None,
                       forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                       bar: _Bar | None = None) -> EvalResult:
    """Accuracy, loss and KL with each head set of ``masks`` ablated, many per forward.

    Args:
        masks: bool ``[K, layer, head]``, True = ablated.
        replacement: None (zero ablation) or the heads' mean outputs (see :func:`ablate_heads`).
        max_rows: rows (ablations x samples) per forward; None = :func:`auto_max_rows`.

    Returns:
        :class:`EvalResult` with ``[K]`` arrays.
    """
    masks_t = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    device = _device(model)
    rep = replacement.to(device) if replacement is not None else None

    def intervene(idx: np.ndarray, b: int) -> ContextManager[Any]:
        return ablate_heads(sites, masks_t[torch.as_tensor(idx)].repeat_interleave(b, dim=0).to(device), rep)

    return _evaluate(model, sites, data, _first_layers(masks_t.numpy(), False), intervene, logits_fn=logits_fn,
                     max_rows=max_rows, forward_context=forward_context, bar=bar)


def evaluate_ablations_loop(model: nn.Module, sites: HeadSites, data: EvalData, masks: np.ndarray | torch.Tensor, *,
                            replacement: torch.Tensor | None = None, logits_fn: LogitsFn = default_logits_fn,
                            forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> EvalResult:
    """The reference: one forward per ablation and batch, the same mask for every row."""
    masks_t = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    device = _device(model)
    rep = replacement.to(device) if replacement is not None else None
    sums = np.zeros((3, len(masks_t)), np.float64)
    with torch.inference_mode(), forward_context():
        for j, mask in enumerate(masks_t):
            for inp, tgt, blp in zip(data.inputs, data.targets, data.base_logp):
                with ablate_heads(sites, mask.to(device), rep):
                    logits = logits_fn(model, _to(inp, device))
                for i, s in enumerate(_stats(logits, 1, tgt, blp)):
                    sums[i, j] += float(s[0])
    m = data.n_samples
    return EvalResult(accuracy=sums[0] / m, loss=sums[1] / m, kl=sums[2] / m)


def evaluate_partial(model: nn.Module, sites: HeadSites, data: EvalData, keep: np.ndarray | torch.Tensor, *,
                     logits_fn: LogitsFn = default_logits_fn, max_rows: int | None = None,
                     forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                     bar: _Bar | None = None) -> EvalResult:
    """Accuracy, loss and KL under partial pruning, many settings per forward.

    Args:
        keep: float ``[K, layer, head]`` keep fractions in (0, 1] (1 = head untouched), see
            :func:`extractor.hooks.partial_attention`.
    """
    keep_t = torch.as_tensor(np.asarray(keep), dtype=torch.float32)
    device = _device(model)

    def intervene(idx: np.ndarray, b: int) -> ContextManager[Any]:
        return partial_attention(model, sites, keep_t[torch.as_tensor(idx)].repeat_interleave(b, dim=0).to(device))

    return _evaluate(model, sites, data, _first_layers(keep_t.numpy(), 1.0), intervene, logits_fn=logits_fn,
                     max_rows=max_rows, forward_context=forward_context, bar=bar)


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (only the gates do); restored in finally."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def gradient_importance(model: nn.Module, sites: HeadSites, data: EvalData, *, logits_fn: LogitsFn = default_logits_fn,
                        forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> np.ndarray:
    """Michel et al. (2019) head importance before normalisation.

    ``I_h = mean_x | dL(x) / d xi_h |`` at ``xi = 1``, where ``xi_h`` scales head h's output at the
    output-projection input (a gate per row, so each sample's derivative is its own) and
    ``L(x)`` is the cross-entropy of the sample's target. Equals ``mean_x |A_h(x)^T dL/dA_h(x)|``.

    Returns:
        float64 ``[layer, head]`` (use :func:`attnviz.analysis.importance.l2_normalize_per_layer`).
    """
    device = _device(model)
    total = torch.zeros(sites.shape, dtype=torch.float64)
    with _frozen_parameters(model), torch.enable_grad(), forward_context():
        for inp, tgt in zip(data.inputs, data.targets):
            b = int(tgt.shape[0])
            gates = torch.ones(b, *sites.shape, device=device, requires_grad=True)
            with scale_heads(sites, gates):
                logits = logits_fn(model, _to(inp, device))
            loss = F.cross_entropy(logits.float(), tgt.to(device), reduction="sum")
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs().sum(0).double().cpu()
    return (total / data.n_samples).numpy()


def mean_head_outputs(model: nn.Module, sites: HeadSites, data: EvalData, *, logits_fn: LogitsFn = default_logits_fn,
                      forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> torch.Tensor:
    """Each head's mean output over the data at the output-projection input.

    Returns:
        float32 ``[layer, head, seq, head_dim]`` (mean over samples, per position) when every batch
        has the same sequence length, else ``[layer, head, head_dim]`` (mean over samples and positions).
    """
    device = _device(model)
    per_pos: torch.Tensor | None = None  # [layer, seq, head, head_dim] sums, while every seq is equal
    pooled = torch.zeros(sites.n_layers, sites.n_heads, sites.head_dim, dtype=torch.float64)
    n_tok = 0
    seq_lens = set()
    with torch.inference_mode(), forward_context(), capture_head_outputs(sites) as out:
        for inp in data.inputs:
            logits_fn(model, _to(inp, device))
            sums = torch.stack([out[layer].double().sum(0).cpu() for layer in range(sites.n_layers)])
            b, seq = out[0].shape[:2]
            seq_lens.add(seq)
            per_pos = sums if per_pos is None else (per_pos + sums if len(seq_lens) == 1 else per_pos)
            pooled += sums.sum(1)
            n_tok += b * seq
    if len(seq_lens) == 1 and per_pos is not None:
        return (per_pos / data.n_samples).permute(0, 2, 1, 3).float().contiguous()
    return (pooled / n_tok).float()


def auto_max_rows(device: torch.device) -> int:
    """Rows per forward when the user sets none: 64 on the CPU, 2048 on a GPU."""
    return 2048 if device.type == "cuda" else 64


def single_head_masks(shape: tuple[int, int]) -> np.ndarray:
    """bool ``[layer * head, layer, head]``: mask k ablates head k alone (k = layer * n_heads + head)."""
    n = shape[0] * shape[1]
    return np.eye(n, dtype=bool).reshape(n, *shape)


# -- the whole run --------------------------------------------------------------------------------


def compute_importance(model: nn.Module, sites: HeadSites, data: EvalData,
                       options: ImportanceOptions = ImportanceOptions(),
                       *, extra_metrics: Mapping[str, tuple[np.ndarray, bool]] | None = None,
                       logits_fn: LogitsFn = default_logits_fn, stack_kind: str = "self",
                       forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> ImportanceResult:
    """Measure every importance metric and curve of one stack.

    Args:
        model: eval mode, eager attention.
        sites: output projections of the stack (:func:`extractor.hooks.find_output_projections`).
        data: :func:`prepare_eval_data`.
        options: :class:`ImportanceOptions`.
        extra_metrics: further metrics to draw pruning curves for, name -> (values ``[layer, head]``,
            higher_is_more_important), e.g. entropy and confidence from the recorded maps.

    Returns:
        :class:`ImportanceResult`.
    """
    shape = sites.shape
    n = shape[0] * shape[1]
    kw: dict[str, Any] = dict(logits_fn=logits_fn, forward_context=forward_context)
    max_rows = options.max_rows or auto_max_rows(_device(model))
    fractions = [p for p in options.partial_fractions if p < 1.0]
    bar = _Bar(n + n * len(fractions), options.progress)
    try:
        replacement = mean_head_outputs(model, sites, data, **kw) if options.ablation == "mean" else None
        single = evaluate_ablations(model, sites, data, single_head_masks(shape), replacement=replacement,
                                    max_rows=max_rows, bar=bar, **kw)
        base_acc, base_loss = data.base_accuracy, data.base_loss
        metrics = {
            "accuracy_drop": (base_acc - single.accuracy).reshape(shape),
            "loss_increase": (single.loss - base_loss).reshape(shape),
            "kl_divergence": single.kl.reshape(shape),
        }
        raw = gradient_importance(model, sites, data, **kw)
        metrics["gradient_importance"] = A.l2_normalize_per_layer(raw)

        # partial pruning: one head at a time, every keep fraction below 1
        keep = np.ones((n, len(fractions), *shape), np.float32)
        for h in range(n):
            for j, p in enumerate(fractions):
                keep[h, j].flat[h] = p
        part = evaluate_partial(model, sites, data, keep.reshape(-1, *shape), max_rows=max_rows, bar=bar, **kw)
        n_p = len(options.partial_fractions)
        p_acc, p_loss, p_kl = (np.empty((n, n_p)) for _ in range(3))
        j_new = 0
        for j, p in enumerate(options.partial_fractions):
            if p >= 1.0:  # untouched head: the unablated model (exactly, see partial_attention)
                p_acc[:, j], p_loss[:, j], p_kl[:, j] = base_acc, base_loss, 0.0
            else:
                idx = np.arange(n) * len(fractions) + j_new
                p_acc[:, j], p_loss[:, j], p_kl[:, j] = part.accuracy[idx], part.loss[idx], part.kl[idx]
                j_new += 1

        # iterative pruning curves: every metric, then random orders; identical masks run once
        steps = A.pruning_fractions(options.prune_steps)
        curve_metrics = {m: (metrics[m], A.METRIC_DEFINITIONS[m].higher_is_more_important) for m in metrics}
        curve_metrics.update(extra_metrics or {})
        orders = np.stack([A.pruning_order(v, hi) for v, hi in curve_metrics.values()])
        rand = A.random_orders(n, options.random_seeds)
        all_masks = np.concatenate([A.pruning_masks(o, shape, steps) for o in np.concatenate([orders, rand])])
        unique, inverse = np.unique(all_masks.reshape(len(all_masks), -1), axis=0, return_inverse=True)
        bar.add_total(len(unique))
        res = evaluate_ablations(model, sites, data, unique.reshape(-1, *shape), replacement=replacement,
                                 max_rows=max_rows, bar=bar, **kw)
        acc = res.accuracy[inverse.ravel()].reshape(len(orders) + len(rand), len(steps))
    finally:
        bar.close()

    curves = A.ImportanceCurves(
        target_source=data.target_source, ablation=options.ablation, n_samples=data.n_samples,
        base_accuracy=base_acc, base_loss=base_loss,
        partial_fractions=np.asarray(options.partial_fractions, np.float64),
        partial_accuracy=p_acc.reshape(*shape, n_p), partial_loss=p_loss.reshape(*shape, n_p),
        partial_kl=p_kl.reshape(*shape, n_p),
        pruning_fractions=steps, pruning_metrics=tuple(curve_metrics), pruning_accuracy=acc[: len(orders)],
        pruning_order=orders, random_accuracy=acc[len(orders):], gradient_raw=raw,
    )
    return ImportanceResult(metrics={k: np.asarray(v, np.float64) for k, v in metrics.items()}, curves=curves,
                            options=options, stack_kind=stack_kind)


def store_importance(target: Any, result: ImportanceResult) -> None:
    """Write the head metrics (with definition and citation) and ``analyses/importance``.

    Args:
        target: a recording path or an h5py.File open for writing.
    """
    import h5py

    from attnviz.store.cache import open_for_update, save_analysis, write_head_metric
    from attnviz.store.schema import HeadMetricInfo

    params = result.params
    f = target if isinstance(target, h5py.File) else open_for_update(target)
    try:
        for name, values in result.metrics.items():
            d = A.METRIC_DEFINITIONS[name]
            info = HeadMetricInfo(name=name, kind=result.stack_kind, definition=d.definition, citation=d.citation,
                                  units=d.units, higher_is_more_important=d.higher_is_more_important, params=params)
            write_head_metric(f, info, values)
        arrays, attrs = result.curves.to_arrays()
        save_analysis(f, A.ANALYSIS_NAME, params, arrays, attrs)
    finally:
        if f is not target:
            f.close()


# -- the command: a model, its inputs, a recording ------------------------------------------------

STAT_METRICS = ("entropy", "confidence")  # from the recorded maps (attnviz.analysis.head_stats)


def retrieval_logits_fn(adapter: Any, batches: Sequence[Mapping[str, Any]],
                        temperature: float = A.RETRIEVAL_TEMPERATURE) -> LogitsFn:
    """Scores of a backbone without a classification head (``attnviz.analysis.importance``, "Targets"):
    ``logits(x) [rows, N] = cos(e(x), r_j) / temperature`` against the unablated embeddings ``r``
    ``[N, dim]`` of every evaluation input (computed here once, in batch order), so that input ``i``'s
    target is ``i`` and every importance metric keeps its definition."""
    embed = adapter.embedding_fn()
    refs = []
    with torch.no_grad():
        for inp in batches:
            refs.append(F.normalize(embed(**_to(inp, adapter.device)).float(), dim=-1))
    reference = torch.cat(refs)  # [N, dim]

    def logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        e = F.normalize(embed(**inputs).float(), dim=-1)
        return e @ reference.to(e.device).T / temperature

    return logits


def _adapter_logits_fn(adapter: Any) -> LogitsFn:
    forward = adapter.logits_fn()  # takes the model's keyword inputs, applies the adapter's autocast
    return lambda model, inputs: forward(**inputs)


def _stat_metrics(into: Any, kind: str) -> dict[str, tuple[np.ndarray, bool]]:
    """entropy and confidence of the recorded maps (stored by ``attnviz extract``; computed now if absent)."""
    import attnviz

    with attnviz.open(into) as rec:
        missing = [m for m in STAT_METRICS if m not in rec.head_metrics()]
    if missing:
        from attnviz.analysis.head_stats import compute_and_store

        compute_and_store(into, kind=kind)
    with attnviz.open(into) as rec:
        return {m: (rec.head_metric(m).astype(np.float64), rec.head_metric_info(m).higher_is_more_important)
                for m in STAT_METRICS}


def run_importance(adapter: Any, input_path: str, into: Any, options: ImportanceOptions = ImportanceOptions(), *,
                   batch_size: int = 8, limit: int | None = None, force: bool = False,
                   kind: str = "self") -> ImportanceResult | None:
    """Measure head importance of a loaded model on inputs and store it into a recording.

    Args:
        adapter: a loaded :class:`extractor.adapters.Adapter` (e.g. ``ExtractResult.adapter``).
        input_path: inputs as for ``attnviz extract`` (images: an image, folder or manifest).
        into: a complete recording of the same model (its stack shape must match).
        batch_size: samples per (unreplicated) batch.
        limit: use the first N inputs.
        force: recompute even when ``analyses/importance`` holds a result with the same parameters.

    Returns:
        the result, or None when the cached result was up to date.

    Raises:
        ModelError: the output projections are not found (names the pattern looked for).
        InputError / RecordingError: bad inputs, or a recording of another model shape.
    """
    import attnviz
    from attnviz.store.cache import load_analysis
    from extractor.hooks import find_output_projections
    from extractor.pipeline import INPUT_COLLECTORS

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if adapter.input_kind != "image":
        raise InputError(f"head importance by pruning is measured for image models; a {adapter.name} model's heads are "
                         "ranked by cross-attention vs saliency and deletion curves instead (`attnviz analyze`)")
    pattern = adapter.arch.stack(kind).pattern("output_projection")
    sites = find_output_projections(adapter.model, pattern, n_heads=adapter.stack(kind).n_heads)
    with attnviz.open(into) as rec:
        if not rec.complete:
            raise InputError(f"{into}: the recording is incomplete; finish it with `attnviz extract --resume` first")
        if rec.stack_shape(kind) != sites.shape:
            raise InputError(f"{into} records {rec.stack_shape(kind)[0]}x{rec.stack_shape(kind)[1]} heads, the model "
                             f"has {sites.n_layers}x{sites.n_heads}: give the recording of this model")
    inputs = INPUT_COLLECTORS[adapter.input_kind](input_path, class_names=adapter.class_names if adapter.has_classifier
                                                  else None, limit=limit)
    extra = {"model": adapter.source.ref, "input": str(input_path), "limit": limit, "kind": kind}
    items = inputs.items
    if not adapter.has_classifier:
        source = "embedding"
        extra["retrieval_temperature"] = A.RETRIEVAL_TEMPERATURE
    else:
        source = "label" if all(it.label >= 0 for it in items) else "prediction"
    params = {**options.params(), "target_source": source, "n_samples": len(items), **extra}
    if not force:
        with attnviz.open(into) as rec:
            if load_analysis(rec, A.ANALYSIS_NAME, params) is not None:
                return None
    batches, labels = [], []
    for start in range(0, len(items), batch_size):
        pb = adapter.prepare(items[start:start + batch_size])
        batches.append(pb.inputs)
        labels.append(pb.labels)
    if adapter.has_classifier:
        logits_fn = _adapter_logits_fn(adapter)
        data = prepare_eval_data(adapter.model, batches, labels, logits_fn=logits_fn)
    else:
        logits_fn = retrieval_logits_fn(adapter, batches)
        own = [np.arange(start, start + len(lab)) for start, lab in zip(range(0, len(items), batch_size), labels)]
        data = dataclasses.replace(prepare_eval_data(adapter.model, batches, own, logits_fn=logits_fn),
                                   target_source="embedding")
    if data.target_source == "prediction":
        import sys

        print("note: not every input has a label; the model's own predictions serve as targets "
              "(target_source = prediction)", file=sys.stderr)
    result = compute_importance(adapter.model, sites, data, options, extra_metrics=_stat_metrics(into, kind),
                                logits_fn=logits_fn, stack_kind=kind)
    result = ImportanceResult(metrics=result.metrics, curves=result.curves, options=options, stack_kind=kind,
                              extra_params=extra)
    assert result.params == params, (result.params, params)
    store_importance(into, result)
    return result
