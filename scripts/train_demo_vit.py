"""Train the attnviz demo ViT on procedural shapes (CPU, fixed seeds) and save it.

Writes to ``--out`` (default ``sample_data/models/shapes-vit/``):
    config.json, model.safetensors       a ``ViTForImageClassification`` (transformers 5.x),
                                         loadable with ``attn_implementation="eager"``
    preprocessor_config.json             a ``ViTImageProcessorPil`` (resize to the model size,
                                         rescale 1/255, normalise with the training mean/std)
    training_report.json                 test accuracy, timing, seeds, config, history, per-head
                                         mean attention distance, CLS attention on the object,
                                         patch attention on CLS, self-attention share

The defaults are the shipped model: ``python scripts/train_demo_vit.py`` rebuilds it.

Design (why the heads do different things): a plain ViT on this data keeps every head at the
uniform-attention distance, and the pattern atlas then finds two families (local, flat). Here:
  * fixed 2-D sin-cos position embeddings (MAE-style, frequencies chosen for the 8x8 grid,
    frozen): q.k can express "near me" from the first step;
  * locality init (``--local-init``, ``--local-offsets``): in layers 0-1 each head starts centred
    on one neighbour of the query (layer 0: right, down, left, up; layer 1: the diagonals), as a
    convolution split over heads (Cordonnier et al. 2020);
  * sink init (``--sink-heads``): the heads of layers 2-3 start with their patch queries on the
    CLS token (the CLS query itself is left free);
  * three training-only losses on the patch tokens of the last layer (their heads are not saved):
    a dense loss (is this patch on the target and which shape is it), a per-patch image-class
    loss (every patch, object or background, names the image's class: the late layers must bring
    the class to every patch, from the object or from CLS) and a masked-patch reconstruction loss.
    Telling a shape from its outline needs the neighbouring patches, so early heads stay local;
    the CLS token needs to find the object anywhere, so late heads look at it; heads that are of
    no use to the patches stay parked on CLS.
Training is free to change every initial pattern; the report says what survived.

Checkpoint: after every epoch the model, the training-only heads, the optimiser, the scheduler,
the RNG states and the history go to ``--checkpoint`` (default in the temp folder). A run that
stops (killed, machine rebooted) continues with the same command plus ``--resume`` and gives the
same model, bit for bit, as an uninterrupted run (same ``--threads``).

Seeds: training images ``make_shapes(n_train, seed=0)``, test images ``make_shapes(n_test,
seed=1)``, demo recording (made elsewhere) ``seed=2``; torch seed ``--seed`` (default 0).

Usage: ``python scripts/train_demo_vit.py [--threads N] [--resume] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with another busy process,
# spinning threads made each step about twice as slow (measured); no effect on the numbers
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes import (CLASS_NAMES, DEMO_SEED, DISTRACTOR_SCALE, TARGET_RADIUS, TEST_SEED, TRAIN_SEED,  # noqa: E402
                    make_shapes)

DEFAULT_OUT = HERE.parent / "sample_data" / "models" / "shapes-vit"
N_BG = len(CLASS_NAMES)  # index of the "background" class of the auxiliary dense target


# ----------------------------------------------------------------------------- geometry

def patch_centres(grid: int, patch: int) -> np.ndarray:
    """Pixel coordinates (x, y) of the patch centres in sequence order: float64 (grid*grid, 2)."""
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return (np.stack([xs.ravel(), ys.ravel()], axis=1) + 0.5) * patch


def patch_distances(grid: int, patch: int) -> np.ndarray:
    """Euclidean distances between patch centres in pixels: float64 (grid*grid, grid*grid)."""
    c = patch_centres(grid, patch)
    return np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))


def uniform_attention_distance(grid: int, patch: int) -> float:
    """Mean attention distance of uniform attention over all patches (self included), exact sum."""
    return float(patch_distances(grid, patch).mean())


def mean_attention_distance(attentions, dist) -> np.ndarray:
    """Per-head summed attention distance of one batch (Dosovitskiy et al. 2021, Fig. 7).

    Args:
        attentions: sequence over layers of tensors (B, H, T, T), T = 1 + patches, CLS first.
        dist: torch tensor (P, P) of patch-centre distances in pixels.

    Returns:
        float64 (layers, heads): sum over images of the query-averaged expected distance (divide
        by the number of images). CLS is dropped as query and key; each query row is
        renormalised over the patch keys.
    """
    out = []
    for a in attentions:
        p = a[:, :, 1:, 1:].double()
        p = p / p.sum(-1, keepdim=True)
        out.append((p * dist).sum(-1).mean(-1).sum(0).cpu().numpy())
    return np.stack(out)


def head_shares(attentions, obj):
    """Per-head attention shares of one batch (summed over images; divide by the number of images).

    Args:
        attentions: sequence over layers of tensors (B, H, T, T), T = 1 + patches, CLS first.
        obj: bool tensor (B, P): patches whose object coverage is >= 0.5.

    Returns:
        dict of float64 (layers, heads) sums over images:
        ``cls_on_object``: for the CLS query, attention on object patches / attention on all patches
        (images without an object patch are skipped; see ``n_obj``); ``on_cls``: attention of the
        patch queries on the CLS key (what the pattern atlas calls prefix mass), averaged over the
        queries; ``self``: attention of each patch query on its own patch, rows renormalised over
        the patches, averaged over the queries; and ``n_obj``: images with an object patch.
    """
    objf = obj.double()
    has = objf.sum(-1) > 0                                            # (B,)
    out = {"cls_on_object": [], "on_cls": [], "self": []}
    for a in attentions:
        a = a.double()
        cls = a[:, :, 0, 1:]                                         # (B, H, P)
        share = (cls * objf[:, None, :]).sum(-1) / cls.sum(-1)
        out["cls_on_object"].append((share * has[:, None]).sum(0).cpu().numpy())
        out["on_cls"].append(a[:, :, 1:, 0].mean(-1).sum(0).cpu().numpy())
        p = a[:, :, 1:, 1:]
        p = p / p.sum(-1, keepdim=True)
        out["self"].append(p.diagonal(dim1=-2, dim2=-1).mean(-1).sum(0).cpu().numpy())
    res = {k: np.stack(v) for k, v in out.items()}
    res["n_obj"] = float(has.sum())
    return res


def object_patches(masks: np.ndarray, patch: int, thresh: float = 0.5) -> np.ndarray:
    """bool (n, grid*grid): patches whose object coverage is >= ``thresh``."""
    n, s, _ = masks.shape
    g = s // patch
    return masks.reshape(n, g, patch, g, patch).mean(axis=(2, 4)).reshape(n, g * g) >= thresh


def sincos_frequencies(dim: int, max_freq: float = 2.0, min_freq: float = 0.15) -> np.ndarray:
    """The ``dim // 4`` angular frequencies (radians per patch) of :func:`sincos_2d`, highest first."""
    f = dim // 4
    return max_freq * (min_freq / max_freq) ** (np.arange(f) / max(f - 1, 1))


def sincos_2d(grid: int, dim: int, max_freq: float = 2.0, min_freq: float = 0.15) -> np.ndarray:
    """2-D sin-cos position embeddings (MAE-style), float32 (grid*grid, dim).

    Half of the channels encode the row, half the column; each half holds sin and cos of
    ``dim // 4`` angular frequencies (radians per patch), geometric from ``max_freq`` down to
    ``min_freq`` (MAE uses 1/10000**(k/F), which wastes most channels on a small grid).
    """
    assert dim % 4 == 0, "hidden size must be divisible by 4"
    omega = sincos_frequencies(dim, max_freq, min_freq)
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def enc(pos):
        ang = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([enc(ys), enc(xs)], axis=1).astype(np.float32)


def patchify(x, patch: int):
    """(B, C, S, S) -> (B, P, C*patch*patch), patches in the model's row-major sequence order."""
    b, c, s, _ = x.shape
    g = s // patch
    return x.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * patch * patch)


def patch_targets(masks: np.ndarray, labels: np.ndarray, patch: int, thresh: float = 0.2) -> np.ndarray:
    """Auxiliary dense target per patch: the target class where the object covers >= ``thresh``
    of the patch, else ``N_BG``. int64 (n, grid*grid)."""
    n, s, _ = masks.shape
    g = s // patch
    cover = masks.reshape(n, g, patch, g, patch).mean(axis=(2, 4)).reshape(n, g * g)
    return np.where(cover >= thresh, labels[:, None], N_BG).astype(np.int64)


def parse_offsets(text: str) -> list[tuple[int, int]]:
    """``"0,0 0,1 1,0"`` -> [(0, 0), (0, 1), (1, 0)]: (dy, dx) patch offsets."""
    out = []
    for item in text.split():
        dy, dx = (int(v) for v in item.split(","))
        out.append((dy, dx))
    return out


def locality_init(model, grid: int, n_heads: int, strength: float, n_layers: int = 2,
                  offsets: list[tuple[int, int]] | None = None) -> None:
    """Start heads 0..n_heads-1 of the first ``n_layers`` layers local (ConViT-style init).

    Each such head's query and key read ``head_dim`` sin-cos channels of the (frozen) position
    embedding, so at initialisation q_i.k_j is about ``strength * sum_f cos(w_f (dy - oy)) + cos(w_f (dx - ox))``
    for the key's offset (dy, dx) from the query: largest at the patch (oy, ox) away from the query and
    falling off around it.

    Without ``offsets`` every head is centred on the query's own patch (o = 0) and head h reads a
    frequency subset shifted by h with strength ``strength * 0.5**h``, so the heads start at different
    widths. With ``offsets`` head h of layer l is centred on ``offsets[(l * n_heads + h) % len(offsets)]``
    (so 4 offsets repeat in every layer, 8 give the second layer its own; the query's sin/cos pairs
    are rotated by w_f * o, as in Cordonnier et al. 2020, "On the relationship between self-attention
    and convolutional layers"), all heads on the highest frequencies with the same strength: a 3x3
    neighbourhood split over heads, as a convolution would see it. Training is free to change all of it.
    """
    import torch

    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    f = cfg.hidden_size // 4                      # frequencies per block (sin y, cos y, sin x, cos x)
    per_block = d // 4
    omega = sincos_frequencies(cfg.hidden_size)
    pos = model.vit.embeddings.position_embeddings[0, 1:].detach()
    # layer norm of the position part alone: scale to map LN-normalised inputs back to pos units
    scale = float(pos.std(dim=1).mean())
    with torch.no_grad():
        for li, layer in enumerate(model.vit.layers[:n_layers]):
            att = layer.attention
            for h in range(min(n_heads, cfg.num_attention_heads)):
                rows = slice(h * d, (h + 1) * d)
                wq = torch.zeros(d, cfg.hidden_size)
                wk = torch.zeros(d, cfg.hidden_size)
                if offsets:
                    oy, ox = offsets[(li * n_heads + h) % len(offsets)]
                    freqs = list(range(per_block))
                    s_h = strength
                else:
                    oy = ox = 0
                    freqs = [min(h + k, f - 1) for k in range(per_block)]
                    s_h = strength * 0.5 ** h
                r = 0
                for axis, o in ((0, oy), (1, ox)):                # blocks: sin y, cos y | sin x, cos x
                    sin_b, cos_b = 2 * axis * f, (2 * axis + 1) * f
                    for fi in freqs:
                        phi = float(omega[fi]) * o
                        c, sn = math.cos(phi), math.sin(phi)
                        # q reads (sin, cos)(a_i + phi), k reads (sin, cos)(a_j): q.k = cos(a_j - a_i - phi)
                        wq[r, sin_b + fi], wq[r, cos_b + fi] = c, sn
                        wk[r, sin_b + fi] = 1.0
                        wq[r + per_block, cos_b + fi], wq[r + per_block, sin_b + fi] = c, -sn
                        wk[r + per_block, cos_b + fi] = 1.0
                        r += 1
                    r += per_block
                g = math.sqrt(s_h) * scale * d ** 0.25   # q.k/sqrt(d) ~ strength * kernel
                att.q_proj.weight[rows] = g * wq
                att.k_proj.weight[rows] = g * wk
                att.q_proj.bias[rows] = 0.0
                att.k_proj.bias[rows] = 0.0


def sink_init(model, heads: list[tuple[int, int]], strength: float, generator) -> None:
    """Start the given (layer, head)s with their patch queries parked on the CLS token.

    The CLS token is set to ``alpha * u`` for a random zero-mean unit vector u (large enough to stay
    the dominant direction of the CLS residual stream through the layers), and one query/key
    dimension r of each such head reads u: ``k_r = beta * (x . u)``, ``q_r = gamma - gamma/c * (x . u)``
    with x the layer-normed input and c = sqrt(hidden) (the value of x . u on the CLS token). A patch
    query then gets about ``strength`` nats more on the CLS key than on any patch key, while the CLS
    query itself gets nothing extra (q_r = 0 there), so it stays free to look at the image. Training is
    free to change all of it; heads that need the patches move away from CLS.
    """
    import torch

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    u = torch.randn(cfg.hidden_size, generator=generator)
    u = u - u.mean()
    u = u / u.norm()
    c = math.sqrt(cfg.hidden_size)
    gb = strength * math.sqrt(hd) / c                      # gamma * beta so that q.k/sqrt(hd) = strength on CLS
    gamma = beta = math.sqrt(gb)
    with torch.no_grad():
        model.vit.embeddings.cls_token.copy_(4.0 * c * u.view(1, 1, -1))   # per channel ~4x a patch token's
        for layer, head in heads:
            att = model.vit.layers[layer].attention
            r = head * hd
            att.k_proj.weight[r] = beta * u
            att.k_proj.bias[r] = 0.0
            att.q_proj.weight[r] = -(gamma / c) * u
            att.q_proj.bias[r] = gamma


# ----------------------------------------------------------------------------- training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the attnviz demo ViT on procedural shapes.")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0, help="torch seed (init, batch order, augmentation)")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--init", choices=["mae", "hf"], default="mae",
                   help="mae: xavier-uniform linear layers and patch projection (MAE); hf: transformers' "
                        "trunc-normal(0.02), which is tuned for width 768 and trains very slowly at width 96")
    p.add_argument("--pos", choices=["sincos-frozen", "sincos", "learned"], default="sincos-frozen")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the dense patch loss (0: off)")
    p.add_argument("--global-weight", type=float, default=0.5,
                   help="weight of a second dense loss: every patch token (object or background) predicts the "
                        "image's class (0: off)")
    p.add_argument("--mim-weight", type=float, default=1.0,
                   help="weight of the masked-patch reconstruction loss (SimMIM-style, 0: off)")
    p.add_argument("--mim-ratio", type=float, default=0.25, help="fraction of patches masked in the MIM half")
    p.add_argument("--local-init", type=int, default=4, metavar="K",
                   help="ConViT-style locality init: in the first two layers, heads 0..K-1 start with q.k "
                        "proportional to the sin-cos kernel of the patch offset (0: off)")
    p.add_argument("--local-strength", type=float, default=3.0,
                   help="logit scale of the first local head; head h gets strength * 0.5**h (same for all with --local-offsets)")
    p.add_argument("--local-layers", type=int, default=2, help="--local-init applies to the first N layers")
    p.add_argument("--local-offsets", default="0,1 1,0 0,-1 -1,0 1,1 1,-1 -1,-1 -1,1",
                   help="'dy,dx dy,dx ...': centre local head h on this patch offset from the query "
                        "layer by layer (e.g. '0,1 1,0 0,-1 -1,0'); empty: all on the query's own patch, widths varied")
    p.add_argument("--sink-heads", default="2,0 2,1 2,2 2,3 3,0 3,1 3,2 3,3",
                   help="'layer,head layer,head ...': these heads start with their patch queries on the CLS token")
    p.add_argument("--sink-strength", type=float, default=6.0, help="extra logit (nats) of CLS for those heads at init")
    p.add_argument("--distractors", type=int, default=2, help="max distractor shapes per image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                   help="attention kernel for training (eager measured ~20%% faster here than sdpa on CPU)")
    p.add_argument("--n-measure", type=int, default=512, help="test images for attention distance")
    p.add_argument("--measure-every", type=int, default=4, help="measure attention distance every N epochs")
    p.add_argument("--no-save", action="store_true", help="pilot run: measure only, write nothing")
    p.add_argument("--checkpoint", default=str(Path(tempfile.gettempdir()) / "attnviz-shapes-vit.ckpt"),
                   help="written after every epoch (model, optimiser, scheduler, RNG states, history); '' : none")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint (same arguments; same --threads for a bit-identical result)")
    return p.parse_args(argv)


# arguments that do not change the trained model (a checkpoint may be resumed with other values)
_RUN_ONLY_ARGS = ("out", "resume", "checkpoint", "no_save", "threads", "n_measure", "measure_every")


def _fingerprint(args) -> dict:
    """The arguments that define the training run (a checkpoint is only resumed when they match)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in _RUN_ONLY_ARGS}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.perf_counter()

    size, patch = args.image_size, args.patch
    grid = size // patch
    t0 = time.perf_counter()
    train = make_shapes(args.n_train, seed=TRAIN_SEED, size=size, n_distractors=args.distractors)
    test = make_shapes(args.n_test, seed=TEST_SEED, size=size, n_distractors=args.distractors)
    print(f"data: {args.n_train} train (seed {TRAIN_SEED}), {args.n_test} test (seed {TEST_SEED}) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    x_train = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous()  # uint8 (n,3,s,s)
    mean = (x_train.float() / 255).mean(dim=(0, 2, 3))
    std = (x_train.float() / 255).std(dim=(0, 2, 3))
    mean = [round(float(v), 3) for v in mean]
    std = [round(float(v), 3) for v in std]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def prep(x_uint8):
        return (x_uint8.float() / 255 - mean_t) / std_t

    y_train = torch.from_numpy(train.labels)
    m_train = torch.from_numpy(train.masks)
    x_test = prep(torch.from_numpy(test.images).permute(0, 3, 1, 2))
    y_test = torch.from_numpy(test.labels)
    obj_test = torch.from_numpy(object_patches(test.masks, patch))
    del train, test

    config = ViTConfig(
        image_size=size, patch_size=patch, num_channels=3, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=args.mlp,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
        num_labels=len(CLASS_NAMES), id2label={i: n for i, n in enumerate(CLASS_NAMES)},
        label2id={n: i for i, n in enumerate(CLASS_NAMES)},
    )
    model = ViTForImageClassification(config)
    if args.init == "mae":
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and not name.startswith("classifier"):
                    torch.nn.init.xavier_uniform_(mod.weight)
                    torch.nn.init.zeros_(mod.bias)
            proj = model.vit.embeddings.patch_embeddings.projection
            torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
            torch.nn.init.zeros_(proj.bias)
    pos = model.vit.embeddings.position_embeddings
    if args.pos.startswith("sincos"):
        with torch.no_grad():
            pos.zero_()
            pos[0, 1:] = torch.from_numpy(sincos_2d(grid, args.hidden))
        pos.requires_grad_(args.pos == "sincos")
    if args.local_init:
        locality_init(model, grid, args.local_init, args.local_strength, args.local_layers,
                      parse_offsets(args.local_offsets))
    if args.sink_heads:
        sink_init(model, parse_offsets(args.sink_heads), args.sink_strength,
                  torch.Generator().manual_seed(args.seed + 1))
    model.set_attn_implementation(args.attn)
    aux = torch.nn.Linear(args.hidden, N_BG + 1)  # training-only dense head (not saved)

    mim = torch.nn.Linear(args.hidden, 3 * patch * patch)  # training-only pixel decoder (not saved)
    glob = torch.nn.Linear(args.hidden, len(CLASS_NAMES))  # training-only per-patch image-class head (not saved)
    params = [p for p in model.parameters() if p.requires_grad] + [
        p for head in (aux, mim, glob) for p in head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    steps_per_epoch = math.ceil(args.n_train / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch * 2, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params, grid {grid}x{grid}, {args.layers} layers x {args.heads} heads, "
          f"hidden {args.hidden}, pos {args.pos}, aux weight {args.aux_weight}, mim {args.mim_weight}, global {args.global_weight}, local init {args.local_init}, "
          f"attn {model.config._attn_implementation}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)

    def augment(x, m):
        # dihedral group: every class is invariant to flips and 90-degree rotations
        k = int(torch.randint(0, 4, (1,), generator=gen))
        if k:
            x, m = torch.rot90(x, k, (2, 3)), torch.rot90(m, k, (1, 2))
        if int(torch.randint(0, 2, (1,), generator=gen)):
            x, m = x.flip(3), m.flip(2)
        return x, m

    dist_t = torch.from_numpy(patch_distances(grid, patch))
    uniform = uniform_attention_distance(grid, patch)
    n_meas_max = min(args.n_measure, args.n_test)

    def evaluate(n_measure=0):
        """Test accuracy, and with ``n_measure`` images the per-head attention statistics (or None)."""
        model.eval()
        correct, sums, n_img = 0, None, 0
        with torch.no_grad():
            for i in range(0, len(y_test), 256):
                out = model(pixel_values=x_test[i:i + 256])
                correct += int((out.logits.argmax(-1) == y_test[i:i + 256]).sum())
            if n_measure:
                model.set_attn_implementation("eager")
                for i in range(0, min(n_measure, len(y_test)), 128):
                    j = min(i + 128, n_measure)
                    out = model(pixel_values=x_test[i:j], output_attentions=True)
                    s = head_shares(out.attentions, obj_test[i:j])
                    s["mad"] = mean_attention_distance(out.attentions, dist_t)
                    sums = s if sums is None else {k: sums[k] + s[k] for k in sums}
                    n_img += j - i
                model.set_attn_implementation(args.attn)
        model.train()
        if sums is None:
            return correct / len(y_test), None
        stats = {"mad": sums["mad"] / n_img, "on_cls": sums["on_cls"] / n_img, "self": sums["self"] / n_img,
                 "cls_on_object": sums["cls_on_object"] / max(sums["n_obj"], 1), "n_obj": int(sums["n_obj"])}
        return correct / len(y_test), stats

    def fmt(mat, unit=""):
        return " | ".join(" ".join(f"{v:5.2f}" if unit == "share" else f"{v:5.1f}" for v in row) for row in mat)

    obj_m = obj_test[:n_meas_max].double()
    has_obj = obj_m.sum(-1) > 0
    object_baseline = float(obj_m.mean(-1)[has_obj].mean())

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    fingerprint = _fingerprint(args)
    history: list[dict] = []
    start_epoch, step, trained_seconds = 0, 0, 0.0
    if args.resume:
        if ckpt_path is None or not ckpt_path.exists():
            sys.exit(f"--resume: no checkpoint at {ckpt_path}")
        # no arbitrary pickle: tensors, plain containers and the numpy RNG state's array only
        from numpy._core.multiarray import _reconstruct

        with torch.serialization.safe_globals([_reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]):
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["fingerprint"] != fingerprint:
            diff = sorted(k for k in set(ck["fingerprint"]) | set(fingerprint)
                          if ck["fingerprint"].get(k) != fingerprint.get(k))
            sys.exit(f"--resume: {ckpt_path} was made with other settings ({', '.join(diff)}); "
                     "rerun with the same arguments or without --resume")
        if ck.get("threads") != args.threads:
            print(f"warning: the checkpoint was trained with --threads {ck.get('threads')}; with another thread "
                  "count the float sums differ, so the result will not be bit-for-bit the uninterrupted run's")
        model.load_state_dict(ck["model"])
        aux.load_state_dict(ck["aux"])
        mim.load_state_dict(ck["mim"])
        glob.load_state_dict(ck["glob"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        np.random.set_state(ck["numpy_rng"])
        history, start_epoch, step, trained_seconds = ck["history"], ck["epoch"], ck["step"], ck["seconds"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch} (step {step}, {trained_seconds:.0f} s trained)", flush=True)
    else:
        _, st0 = evaluate(min(args.n_measure, 128))
        print("    mean attn dist (px) at init: " + fmt(st0["mad"]) + f"   (uniform {uniform:.1f})", flush=True)

    def save_checkpoint(epoch: int, seconds: float) -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"fingerprint": fingerprint, "threads": args.threads, "epoch": epoch, "step": step,
                    "seconds": seconds, "history": history, "model": model.state_dict(), "aux": aux.state_dict(),
                    "mim": mim.state_dict(), "glob": glob.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state()}, tmp)
        os.replace(tmp, ckpt_path)  # atomic: a run killed while saving keeps the previous checkpoint

    t_train = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        t_ep = time.perf_counter()
        perm = torch.randperm(args.n_train, generator=gen)
        tot_loss = tot_aux = tot_mim = tot_glob = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb, mb = augment(x_train[idx], m_train[idx])
            yb = y_train[idx]
            xin = prep(xb)
            if args.mim_weight > 0:
                # SimMIM-style: in half of the batch, blank a random subset of patches (to the mean
                # colour, 0 after normalisation) and reconstruct their pixels from the token outputs
                nm = xin.shape[0] // 2
                n_mask = max(1, round(args.mim_ratio * grid * grid))
                pm = torch.rand(nm, grid * grid, generator=gen).argsort(1) < n_mask       # (nm, P)
                target = patchify(xin[:nm], patch)
                pix = pm.view(nm, 1, grid, 1, grid, 1).expand(nm, 3, grid, patch, grid, patch).reshape(nm, 3, size, size)
                xin = xin.clone()
                xin[:nm] = xin[:nm].masked_fill(pix, 0.0)
            hidden = model.vit(pixel_values=xin).last_hidden_state
            logits = model.classifier(hidden[:, 0])
            loss = F.cross_entropy(logits, yb)
            lcls = float(loss.detach())
            if args.aux_weight > 0:
                tgt = torch.from_numpy(patch_targets(mb.numpy(), yb.numpy(), patch))
                la = F.cross_entropy(aux(hidden[:, 1:]).reshape(-1, N_BG + 1), tgt.reshape(-1))
                loss = loss + args.aux_weight * la
                tot_aux += float(la.detach())
            if args.global_weight > 0:
                # every patch token, object or background, also names the image's class: the class is
                # read off the target, so the late layers have to bring it to every patch
                lg = F.cross_entropy(glob(hidden[:, 1:]).reshape(-1, len(CLASS_NAMES)),
                                     yb.repeat_interleave(grid * grid))
                loss = loss + args.global_weight * lg
                tot_glob += float(lg.detach())
            if args.mim_weight > 0:
                err = (mim(hidden[:nm, 1:]) - target).abs().mean(-1)                       # (nm, P)
                lm = (err * pm).sum() / pm.sum()
                loss = loss + args.mim_weight * lm
                tot_mim += float(lm.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            tot_loss += lcls
        last = epoch == args.epochs - 1
        measure = n_meas_max if (last or (epoch + 1) % args.measure_every == 0) else 0
        acc, st = evaluate(measure)
        rec = {"epoch": epoch + 1, "loss": tot_loss / steps_per_epoch, "aux_loss": tot_aux / steps_per_epoch,
               "mim_loss": tot_mim / steps_per_epoch, "global_loss": tot_glob / steps_per_epoch,
               "test_acc": acc, "seconds": time.perf_counter() - t_ep}
        msg = (f"epoch {epoch + 1:3d}  loss {rec['loss']:.4f}  aux {rec['aux_loss']:.4f}  mim {rec['mim_loss']:.4f}  glob {rec['global_loss']:.4f}  "
               f"test acc {acc:.4f}  {rec['seconds']:.1f} s")
        if st is not None:
            rec["mean_attention_distance"] = st["mad"].round(2).tolist()
            rec["cls_object_share"] = st["cls_on_object"].round(3).tolist()
            msg += ("\n    mean attn dist (px) per layer: " + fmt(st["mad"]) + f"   (uniform {uniform:.1f})"
                    + "\n    CLS share on object:           " + fmt(st["cls_on_object"], "share")
                    + f"   (area {object_baseline:.2f})"
                    + "\n    patch queries on CLS:          " + fmt(st["on_cls"], "share")
                    + "\n    self share:                    " + fmt(st["self"], "share"))
        print(msg, flush=True)
        history.append(rec)
        if ckpt_path is not None:
            save_checkpoint(epoch + 1, trained_seconds + time.perf_counter() - t_train)

    train_seconds = trained_seconds + time.perf_counter() - t_train
    acc, st = evaluate(n_meas_max)
    mad = st["mad"]
    L, H = mad.shape
    report = {
        "test_accuracy": acc,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "seconds": round(train_seconds, 1),
        "seconds_note": "training loop only (all epochs, summed over resumed runs); data generation and "
                        "the final measurement add about a minute",
        # the command that rebuilds this model (a resumed run gives the same result as an uninterrupted one)
        "command": "python scripts/train_demo_vit.py" + "".join(
            " " + a for a in (argv if argv else sys.argv[1:]) if a != "--resume"),
        "seeds": {"torch": args.seed, "train_images": TRAIN_SEED, "test_images": TEST_SEED,
                  "demo_recording_images": DEMO_SEED},
        "data": {"generator": "scripts/shapes.py:make_shapes", "n_train": args.n_train, "n_test": args.n_test,
                 "image_size": size, "n_distractors": args.distractors,
                 "target_radius_px": [round(TARGET_RADIUS[0] * size, 2), round(TARGET_RADIUS[1] * size, 2)],
                 "distractor_scale": list(DISTRACTOR_SCALE), "classes": list(CLASS_NAMES)},
        "config": {"image_size": size, "patch_size": patch, "grid": [grid, grid], "tokens": grid * grid + 1,
                   "hidden_size": args.hidden, "layers": args.layers, "heads": args.heads,
                   "intermediate_size": args.mlp, "parameters": n_params,
                   "position_embeddings": args.pos, "init": args.init, "aux_dense_loss_weight": args.aux_weight,
                   "global_patch_loss_weight": args.global_weight, "mim_loss_weight": args.mim_weight, "mim_mask_ratio": args.mim_ratio,
                   "locality_init_heads": args.local_init, "locality_init_strength": args.local_strength,
                   "locality_init_layers": args.local_layers, "locality_init_offsets": args.local_offsets,
                   "sink_init_heads": args.sink_heads, "sink_init_strength": args.sink_strength},
        "training": {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                     "schedule": "linear warmup + cosine", "augmentation": "random 90-degree rotations and flips",
                     "threads": args.threads, "steps": step},
        "normalization": {"mean": mean, "std": std},
        "mean_attention_distance": {
            "definition": "per head: for each query patch, sum over key patches of attention x Euclidean "
                          "distance between patch centres (pixels); CLS dropped as query and key, rows "
                          "renormalised over patches; averaged over query patches and test images",
            "n_images": n_meas_max,
            "uniform_px": round(uniform, 3),
            "per_head_px": mad.round(2).tolist(),
            "per_layer_mean_px": mad.mean(1).round(2).tolist(),
            "ratio_to_uniform": (mad / uniform).round(3).tolist(),
            "local_heads_below_60pct": [[l, h] for l in range(L) for h in range(H) if mad[l, h] < 0.6 * uniform],
            "global_heads_above_85pct": [[l, h] for l in range(L) for h in range(H) if mad[l, h] > 0.85 * uniform],
        },
        "cls_object_attention": {
            "definition": "per head: for the CLS query, attention on the patches whose object coverage is >= 0.5, "
                          "divided by the attention on all patches (CLS key dropped); averaged over the test "
                          "images that have such a patch. baseline: the share of those patches among all "
                          "patches (what uniform attention would give)",
            "n_images": st["n_obj"],
            "baseline_area_share": round(object_baseline, 4),
            "per_head_share": st["cls_on_object"].round(4).tolist(),
            "per_head_ratio_to_baseline": (st["cls_on_object"] / object_baseline).round(2).tolist(),
        },
        "patch_attention_on_cls": {
            "definition": "per head: attention of the patch queries on the CLS key (the pattern atlas's prefix "
                          "mass), averaged over query patches and test images",
            "per_head": st["on_cls"].round(4).tolist(),
        },
        "self_attention_share": {
            "definition": "per head: attention of each patch query on its own patch, rows renormalised over the "
                          "patches, averaged over query patches and test images (uniform: 1/64)",
            "per_head": st["self"].round(4).tolist(),
        },
        "history": history,
    }
    print(f"test accuracy {acc:.4f} ({args.n_test} images, seed {TEST_SEED}); {train_seconds:.0f} s training, "
          f"{time.perf_counter() - t_start:.0f} s this run")
    print("mean attention distance (px), uniform = %.1f:" % uniform)
    for l, row in enumerate(mad):
        print(f"  layer {l}: " + "  ".join(f"h{h} {v:5.1f}" for h, v in enumerate(row)))
    print(f"CLS attention share on object patches (area baseline {object_baseline:.3f}):")
    for l, row in enumerate(st["cls_on_object"]):
        print(f"  layer {l}: " + "  ".join(f"h{h} {v:5.3f}" for h, v in enumerate(row)))

    if not args.no_save:
        from transformers import ViTImageProcessorPil

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)  # no attn kernel stored: load with eager to record
        os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600
        proc = ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, do_rescale=True,
                                    rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std)
        proc.save_pretrained(out)
        report["model_bytes"] = os.path.getsize(out / "model.safetensors")
        (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name in ("config.json", "preprocessor_config.json", "training_report.json"):
            os.chmod(out / name, 0o644)
        print(f"saved to {out} ({report['model_bytes'] / 1e6:.2f} MB)")
    return report


if __name__ == "__main__":
    main()
