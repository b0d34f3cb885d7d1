"""Model-agnostic head interventions at the input of the attention output projection.

Every transformer attention block ends in an output projection ``W_O`` whose input is the
concatenation of the per-head outputs: ``x[..., h*d:(h+1)*d]`` is head ``h`` (``d`` = head_dim).
A forward pre-hook on that projection sees every head's output before the heads are mixed, so the
same hook point serves every model family:

* :func:`capture_head_outputs` — record ``head_out: [batch, seq, head, head_dim]`` per layer;
* :func:`capture_projections` — record the outputs of the query or key projections,
  ``q: [batch, seq, head, head_dim]`` per layer (the joint query-key view, ``--store-qk``);
* :func:`ablate_heads` — replace chosen heads by zero or by a given mean, with a per-row head mask
  ``[batch, layer, head]`` so many different ablations run in one replicated batch;
* :func:`scale_heads` — multiply each head by a gate ``[layer, head]`` or ``[batch, layer, head]``
  (gates may require grad: dL/dgate is the gradient importance of Michel et al. 2019);
* :func:`partial_attention` — keep only the top-p fraction of each attention row of chosen heads
  and renormalise, through a custom attention function registered with transformers'
  ``AttentionInterface`` (the one place where attention probabilities exist as a tensor).

Hooks exist only inside these context managers; they are removed in ``finally``, also when the
forward raises. :func:`attnviz_hooks` lists the ones still registered (tests assert it is empty).

The output projections are found by a regular expression over ``model.named_modules()`` names
(the adapters' architecture table holds the pattern), never by hard-coded attribute paths:
ViT ``vit.layers.N.attention.o_proj``, Whisper/CLIP ``...self_attn.out_proj``, Llama ``...self_attn.o_proj``.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from attnviz.errors import ModelError

__all__ = [
    "HeadSites",
    "find_output_projections",
    "capture_head_outputs",
    "capture_projections",
    "ablate_heads",
    "scale_heads",
    "partial_attention",
    "expand_batch",
    "attnviz_hooks",
    "count_hooks",
    "PARTIAL_ATTENTION_NAME",
]

PARTIAL_ATTENTION_NAME = "attnviz_partial"
_HOOK_TAG = "_attnviz_hook"


@dataclass(frozen=True)
class HeadSites:
    """The output projections of one attention stack, in layer order.

    Attributes:
        names: module names, one per layer, e.g. ``vit.layers.3.attention.o_proj``.
        modules: the projection modules (``nn.Linear``-like, ``in_features = n_heads * head_dim``).
        attention_modules: the parent attention module of each projection (what transformers passes
            as ``module`` to the attention function).
        n_heads: heads per layer.
        head_dim: width of one head's output.
        pattern: the regular expression that found them.
        layer_modules: the layer (block) holding each projection: its nearest ancestor whose name
            ends in ``.<index>`` (an element of the stack's ModuleList), or () when there is none.
            :func:`expand_batch` hooks them.
    """

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    attention_modules: tuple[nn.Module, ...]
    n_heads: int
    head_dim: int
    pattern: str
    layer_modules: tuple[nn.Module, ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.modules)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads)."""
        return self.n_layers, self.n_heads


def find_output_projections(model: nn.Module, pattern: str | re.Pattern[str], n_heads: int | None = None) -> HeadSites:
    """Find the attention output projections of one stack by module name.

    Args:
        model: any torch module.
        pattern: regular expression searched (``re.search``) in each name of ``model.named_modules()``,
            e.g. ``r"layers\\.(\\d+)\\.attention\\.o_proj$"``. With a capture group, group 1 is the
            layer index and orders the matches; without, the model's module order (= layer order).
        n_heads: heads per layer; inferred from the parent attention module (``head_dim``,
            ``num_heads``, ``num_attention_heads`` or its ``config``) when None.

    Returns:
        :class:`HeadSites`.

    Raises:
        ModelError: no module matches (the message names the pattern), or the head count cannot be
            inferred / does not divide the projection's input width.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    named = dict(model.named_modules())
    hits = [(n, m, rx.search(n)) for n, m in named.items() if n]
    found = [(n, m) for n, m, hit in hits if hit]
    if not found:
        raise ModelError(
            f"cannot find the attention output projections of {type(model).__name__}: "
            f'no module name matches the pattern "{rx.pattern}"'
        )
    layer_ids = [hit.group(1) for _, _, hit in hits if hit] if rx.groups else []
    if layer_ids and all(i is not None and i.isdigit() for i in layer_ids):
        found = [f for _, f in sorted(zip((int(i) for i in layer_ids), found), key=lambda t: t[0])]
    parents = [named.get(n.rsplit(".", 1)[0] if "." in n else "", model) for n, _ in found]
    widths = {_in_features(m, n) for n, m in found}
    if len(widths) != 1:
        raise ModelError(f"output projections matching {rx.pattern!r} have different input widths {sorted(widths)}")
    width = widths.pop()
    if n_heads is None:
        n_heads = _infer_heads(parents[0], width)
    if n_heads is None:
        raise ModelError(f"cannot tell the number of heads of {found[0][0]}; pass n_heads")
    if width % n_heads:
        raise ModelError(f"{found[0][0]}: input width {width} is not a multiple of {n_heads} heads")
    layers = [_layer_of(n, named) for n, _ in found]
    return HeadSites(
        names=tuple(n for n, _ in found), modules=tuple(m for _, m in found), attention_modules=tuple(parents),
        n_heads=int(n_heads), head_dim=width // int(n_heads), pattern=rx.pattern,
        layer_modules=tuple(layers) if all(m is not None for m in layers) and len(set(map(id, layers))) == len(layers)
        else (),
    )


def _layer_of(name: str, named: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest ancestor of module ``name`` whose own name ends in ``.<index>``: its layer."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit():
            return named.get(".".join(parts[: i + 1]))
    return None


def _in_features(module: nn.Module, name: str) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return int(w.shape[1])
    raise ModelError(f"{name} ({type(module).__name__}) is not a linear output projection")


def _infer_heads(attn: nn.Module, width: int) -> int | None:
    head_dim = getattr(attn, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0 and width % head_dim == 0:
        return width // head_dim
    for key in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        v = getattr(attn, key, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(attn, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


# -- hook plumbing -------------------------------------------------------------------------------


@contextmanager
def _pre_hooks(sites: HeadSites, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Register ``make(layer)`` as a forward pre-hook on every output projection; remove in finally."""
    handles = []
    try:
        for layer, module in enumerate(sites.modules):
            fn = make(layer)
            setattr(fn, _HOOK_TAG, True)
            handles.append(module.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _per_row(values: torch.Tensor, batch: int, layer: int, what: str) -> torch.Tensor:
    """``values`` [layer, head] or [batch, layer, head] -> [batch or 1, head] for one layer."""
    if values.ndim == 2:
        return values[layer].unsqueeze(0)
    if values.shape[0] != batch:
        raise ValueError(f"{what} has {values.shape[0]} rows but the forward has batch {batch}")
    return values[:, layer]


def _check_shape(values: torch.Tensor, sites: HeadSites, what: str) -> None:
    if values.ndim not in (2, 3) or tuple(values.shape[-2:]) != sites.shape:
        raise ValueError(f"{what} must be [layer, head] or [batch, layer, head] with (layer, head) = "
                         f"{sites.shape}, got {tuple(values.shape)}")


@contextmanager
def capture_head_outputs(sites: HeadSites, *, detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record every head's output at the input of the output projection.

    Yields:
        a dict filled during the forward: layer -> ``head_out: [batch, seq, head, head_dim]``
        (detached unless ``detach=False``). A later forward overwrites the entries.
    """
    out: dict[int, torch.Tensor] = {}

    def make(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            x = x.view(*x.shape[:-1], sites.n_heads, sites.head_dim)
            out[layer] = x.detach() if detach else x
        return hook

    with _pre_hooks(sites, make):
        yield out


@contextmanager
def capture_projections(modules: list[nn.Module] | tuple[nn.Module, ...], n_heads: int, *,
                        detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of one projection per layer (the query or the key projection of a stack).

    Args:
        modules: the projections in layer order (``nn.Linear``, out_features = n_heads * head_dim; head h
            owns features ``[h*d:(h+1)*d]``).
        n_heads: heads per layer.

    Yields:
        a dict filled during the forward: layer -> ``proj_out: [batch, seq, head, head_dim]`` (the
        projection's output before any 1/sqrt(d) scaling or rotary embedding). A later forward overwrites.
    """
    out: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer, module in enumerate(modules):
            def hook(mod: nn.Module, args: tuple[Any, ...], result: torch.Tensor, layer: int = layer) -> None:
                y = result.view(*result.shape[:-1], n_heads, result.shape[-1] // n_heads)
                out[layer] = y.detach() if detach else y
            setattr(hook, _HOOK_TAG, True)
            handles.append(module.register_forward_hook(hook))
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate_heads(sites: HeadSites, mask: torch.Tensor, replacement: torch.Tensor | None = None) -> Iterator[None]:
    """Replace the outputs of chosen heads by zero (default) or by ``replacement``.

    Args:
        sites: from :func:`find_output_projections`.
        mask: bool ``[layer, head]`` (same heads for every row) or ``[batch, layer, head]`` (a head set
            per row of the batch: replicate the inputs K times and run K different ablations in one
            forward). True = ablate.
        replacement: None (zero ablation), or float ``[layer, head, head_dim]`` (e.g. the head's mean
            output over the data, broadcast over positions) or ``[layer, head, seq, head_dim]``
            (a mean per position).

    Rows and heads that are not masked pass through bit-for-bit unchanged.
    """
    mask = torch.as_tensor(mask).bool()
    _check_shape(mask, sites, "mask")
    layers_used = mask.reshape(-1, *sites.shape).any(0)  # [layer, head]
    if replacement is not None and (replacement.ndim not in (3, 4) or tuple(replacement.shape[:2]) != sites.shape):
        raise ValueError(f"replacement must be [layer, head, head_dim] or [layer, head, seq, head_dim], "
                         f"got {tuple(replacement.shape)}")

    def make(layer: int) -> Callable[..., Any]:
        if not bool(layers_used[layer].any()):
            return lambda module, args: None

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            b = x.shape[0]
            x4 = x.view(*x.shape[:-1], sites.n_heads, sites.head_dim)  # [batch, seq, head, head_dim]
            m = _per_row(mask, b, layer, "mask").to(x.device)  # [batch|1, head]
            m = m.view(m.shape[0], *([1] * (x4.ndim - 3)), sites.n_heads, 1)
            if replacement is None:
                r = torch.zeros((), dtype=x.dtype, device=x.device)
            elif replacement.ndim == 3:
                r = replacement[layer].to(x.device, x.dtype)  # [head, head_dim]
            else:
                r = replacement[layer].to(x.device, x.dtype).transpose(0, 1)  # [seq, head, head_dim]
                if r.shape[0] != x4.shape[-3]:
                    raise ValueError(f"replacement has {r.shape[0]} positions, the forward has {x4.shape[-3]}")
            y = torch.where(m, r, x4)
            return (y.reshape(x.shape), *args[1:])
        return hook

    with _pre_hooks(sites, make):
        yield


@contextmanager
def scale_heads(sites: HeadSites, gates: torch.Tensor) -> Iterator[None]:
    """Multiply each head's output by a gate.

    Args:
        gates: float ``[layer, head]`` or ``[batch, layer, head]``; may require grad, then
            ``d loss / d gates[.., l, h] = sum over positions of head_out_h . d loss / d head_out_h``.
    """
    _check_shape(gates, sites, "gates")

    def make(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            x4 = x.view(*x.shape[:-1], sites.n_heads, sites.head_dim)
            g = _per_row(gates, x.shape[0], layer, "gates").to(x.device, x.dtype)
            g = g.view(g.shape[0], *([1] * (x4.ndim - 3)), sites.n_heads, 1)
            return ((x4 * g).reshape(x.shape), *args[1:])
        return hook

    with _pre_hooks(sites, make):
        yield


def _repeat_batch(obj: Any, batch: int, copies: int) -> Any:
    """Tensors (ndim >= 2) with ``batch`` rows repeated ``copies`` times, copy-major; tuples/lists recursed."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat(copies, *([1] * (obj.ndim - 1))) if obj.ndim >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_repeat_batch(o, batch, copies) for o in obj)
    return obj


@contextmanager
def expand_batch(sites: HeadSites, from_layer: int, copies: int) -> Iterator[None]:
    """Run the layers before ``from_layer`` once, then continue on ``copies`` copies of the batch.

    Interventions that touch no layer before ``from_layer`` share that prefix, so K of them on a
    batch of b cost ``from_layer`` layers at b rows plus the rest at K * b rows, instead of every
    layer at K * b rows. A forward pre-hook on the layer module ``from_layer`` repeats its hidden
    states (and every other batch-shaped tensor argument, e.g. an attention mask) ``copies`` times,
    copy-major (row ``c * b + j`` = copy c of sample j, as a replicated input would be); the later
    layers get their batch-shaped keyword arguments repeated the same way. The logits then have
    ``copies * b`` rows.

    Raises:
        ValueError: the stack's layer modules are unknown (``sites.layer_modules`` empty).
    """
    if not sites.layer_modules:
        raise ValueError("the layers of this stack are unknown; replicate the inputs instead")
    if not 0 <= from_layer < sites.n_layers:
        raise ValueError(f"from_layer must be in 0..{sites.n_layers - 1}, got {from_layer}")
    state: dict[str, int] = {}

    def make(first: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if copies == 1:
                return args, kwargs
            if first:  # layer from_layer sees the batch as it came in (every forward anew)
                hidden = args[0] if args else kwargs["hidden_states"]
                state["batch"] = int(hidden.shape[0])
            b = state["batch"]
            return _repeat_batch(args, b, copies), {k: _repeat_batch(v, b, copies) for k, v in kwargs.items()}
        setattr(hook, _HOOK_TAG, True)
        return hook

    handles = []
    try:
        for i, module in enumerate(sites.layer_modules[from_layer:]):
            handles.append(module.register_forward_pre_hook(make(i == 0), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# -- partial pruning via the AttentionInterface -------------------------------------------------

# id(attention module) -> (layer, keep [layer, head] or [batch, layer, head]); set only inside
# partial_attention(). Not thread-safe: one partial-pruning forward per process at a time.
_PARTIAL_STATE: dict[int, tuple[int, torch.Tensor, bool]] = {}


def _module_eager(module: nn.Module) -> Callable[..., Any]:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ModelError(f"partial pruning needs the eager attention of {type(module).__name__}; "
                         f"its module {type(module).__module__} defines no eager_attention_forward")
    return fn


def _partial_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention, then for the heads/rows in ``_PARTIAL_STATE`` keep only the top-p keys.

    ``weights: [batch, head, query_pos, key_pos]``; per (row, head) with keep fraction p < 1, the
    ``ceil(p * n_keys)`` largest weights of each query row are kept (ties at the threshold are all
    kept), the rest set to 0, and the row renormalised to sum 1; then ``out = weights @ value``.
    Rows and heads with p = 1 return the eager result unchanged (bit-for-bit).
    """
    out, weights = _module_eager(module)(module, query, key, value, attention_mask, **kwargs)
    state = _PARTIAL_STATE.get(id(module))
    if state is None or weights is None:
        return out, weights
    layer, keep, touched = state
    if not touched:  # no row prunes this layer (it may run on fewer rows, see expand_batch)
        return out, weights
    b, h, q, k = weights.shape
    p = _per_row(keep, b, layer, "keep").to(weights.device, torch.float32)  # [batch|1, head]
    p = p.expand(b, h)
    active = p < 1.0
    if not bool(active.any()):
        return out, weights
    if attention_mask is not None:
        n_keys = (attention_mask[..., :k] > torch.finfo(attention_mask.dtype).min / 2).sum(-1, keepdim=True)
        n_keys = n_keys.expand(b, h, q, 1)
    else:
        n_keys = torch.full((b, h, q, 1), k, device=weights.device)
    # the epsilon keeps float error (0.3 * 10 = 3.0000001) from keeping one key too many
    n_keep = torch.ceil(p.view(b, h, 1, 1) * n_keys - 1e-4).clamp(min=1).long()  # [batch, head, query, 1]
    sorted_w = weights.sort(dim=-1, descending=True).values
    threshold = sorted_w.gather(-1, (n_keep - 1).clamp(max=k - 1))
    pruned = torch.where(weights >= threshold, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    pruned = pruned / pruned.sum(-1, keepdim=True)
    v = value
    if v.shape[1] != h:  # grouped-query attention: expand the key/value heads like the eager path does
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    new_out = torch.matmul(pruned.to(v.dtype), v).transpose(1, 2)  # [batch, query, head, head_dim]
    act = active.view(b, 1, h, 1)
    out = torch.where(act, new_out.to(out.dtype), out.view(b, q, h, -1)).reshape(out.shape)
    weights = torch.where(active.view(b, h, 1, 1), pruned, weights)
    return out, weights


def _register_partial() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PARTIAL_ATTENTION_NAME, _partial_attention_forward)


@contextmanager
def partial_attention(model: nn.Module, sites: HeadSites, keep: torch.Tensor) -> Iterator[None]:
    """Keep only the top-p fraction of each attention row of chosen heads, renormalised.

    Args:
        model: a transformers ``PreTrainedModel`` (eager attention); its attention implementation is
            switched to ``"attnviz_partial"`` for the duration and restored in ``finally``.
        sites: the stack whose heads are pruned (other stacks keep plain eager attention).
        keep: float ``[layer, head]`` or ``[batch, layer, head]`` in (0, 1]: the fraction p of keys
            each query keeps; 1 = head untouched.
    """
    keep = torch.as_tensor(keep, dtype=torch.float32)
    _check_shape(keep, sites, "keep")
    if bool((keep <= 0).any()) or bool((keep > 1).any()):
        raise ValueError("keep fractions must lie in (0, 1]")
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} is not a transformers model with an attention interface")
    _register_partial()
    previous = model.config._attn_implementation
    ids = [id(m) for m in sites.attention_modules]
    try:
        touched = (keep.reshape(-1, *sites.shape) < 1.0).any(0).any(-1)  # [layer]
        for layer, i in enumerate(ids):
            _PARTIAL_STATE[i] = (layer, keep, bool(touched[layer]))
        model.set_attn_implementation(PARTIAL_ATTENTION_NAME)
        yield
    finally:
        for i in ids:
            _PARTIAL_STATE.pop(i, None)
        model.set_attn_implementation(previous)


# -- checks ----------------------------------------------------------------------------------------


def attnviz_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry a hook registered by this module (should be empty)."""
    left = []
    for name, m in model.named_modules():
        for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks):
            if any(getattr(fn, _HOOK_TAG, False) for fn in d.values()):
                left.append(name)
    return left


def count_hooks(model: nn.Module) -> int:
    """All forward/backward hooks on every module of ``model`` (ours or anyone's)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())
