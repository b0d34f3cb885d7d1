"""Train the attnviz demo ViT on procedural shapes (CPU, fixed seeds) and save it.

Writes to ``--out`` (default ``sample_data/models/shapes-vit/``):
    config.json, model.safetensors       a ``ViTForImageClassification`` (transformers 5.x),
                                         loadable with ``attn_implementation="eager"``
    preprocessor_config.json             a ``ViTImageProcessorPil`` (resize to the model size,
                                         rescale 1/255, normalise with the training mean/std)
    training_report.json                 test accuracy, timing, seeds, config, per-head mean
                                         attention distance

Design (why the heads are not all global): a plain ViT on this data keeps every head at the
uniform-attention distance. Two things make locality pay off here:
  * fixed 2-D sin-cos position embeddings (MAE-style, frequencies chosen for the 8x8 grid,
    frozen): q.k can express "near me" from the first step;
  * an auxiliary dense loss used only in training: every patch token predicts whether it lies on
    the target shape and, if so, which shape it is. Telling a shape from its outline needs the
    neighbouring patches, so some early heads learn to look locally; the CLS token still needs to
    find the object anywhere, so other heads stay global. The auxiliary head is not saved; the
    saved model is a standard image classifier.

Seeds: training images ``make_shapes(n_train, seed=0)``, test images ``make_shapes(n_test,
seed=1)``, demo recording (made elsewhere) ``seed=2``; torch seed ``--seed`` (default 0).

Usage: ``python scripts/train_demo_vit.py [--epochs N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes import CLASS_NAMES, DEMO_SEED, TEST_SEED, TRAIN_SEED, make_shapes  # noqa: E402

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


def sincos_2d(grid: int, dim: int, max_freq: float = 2.0, min_freq: float = 0.15) -> np.ndarray:
    """2-D sin-cos position embeddings (MAE-style), float32 (grid*grid, dim).

    Half of the channels encode the row, half the column; each half holds sin and cos of
    ``dim // 4`` angular frequencies (radians per patch), geometric from ``max_freq`` down to
    ``min_freq`` (MAE uses 1/10000**(k/F), which wastes most channels on a small grid).
    """
    assert dim % 4 == 0, "hidden size must be divisible by 4"
    f = dim // 4
    omega = max_freq * (min_freq / max_freq) ** (np.arange(f) / max(f - 1, 1))
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


def locality_init(model, grid: int, n_heads: int, strength: float, n_layers: int = 2) -> None:
    """Start heads 0..n_heads-1 of the first ``n_layers`` layers local (ConViT-style init).

    Each such head's query and key read the same ``head_dim`` sin-cos channels of the (frozen)
    position embedding, the highest frequencies first, so at initialisation q_i.k_j is about
    ``strength * sum_f cos(w_f dy) + cos(w_f dx)``: largest at the query's own patch and falling
    off with the offset. Head h uses a different frequency subset (shifted by h) so the heads start
    at different widths. Training is free to change all of it.
    """
    import torch

    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    f = cfg.hidden_size // 4                      # frequencies per block (sin y, cos y, sin x, cos x)
    per_block = d // 4
    pos = model.vit.embeddings.position_embeddings[0, 1:].detach()
    # layer norm of the position part alone: scale to map LN-normalised inputs back to pos units
    scale = float(pos.std(dim=1).mean())
    with torch.no_grad():
        for layer in model.vit.layers[:n_layers]:
            att = layer.attention
            for h in range(min(n_heads, cfg.num_attention_heads)):
                rows = slice(h * d, (h + 1) * d)
                w = torch.zeros(d, cfg.hidden_size)
                freqs = [min(h + k, f - 1) for k in range(per_block)]
                r = 0
                for block in range(4):
                    for fi in freqs:
                        w[r, block * f + fi] = 1.0
                        r += 1
                g = math.sqrt(strength * 0.5 ** h) * scale * d ** 0.25   # q.k/sqrt(d) ~ strength * kernel
                for proj in (att.q_proj, att.k_proj):
                    proj.weight[rows] = g * w
                    proj.bias[rows] = 0.0


# ----------------------------------------------------------------------------- training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the attnviz demo ViT on procedural shapes.")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0, help="torch seed (init, batch order, augmentation)")
    p.add_argument("--n-train", type=int, default=16000)
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
    p.add_argument("--mim-weight", type=float, default=1.0,
                   help="weight of the masked-patch reconstruction loss (SimMIM-style, 0: off)")
    p.add_argument("--mim-ratio", type=float, default=0.25, help="fraction of patches masked in the MIM half")
    p.add_argument("--local-init", type=int, default=0, metavar="K",
                   help="ConViT-style locality init: in the first two layers, heads 0..K-1 start with q.k "
                        "proportional to the sin-cos kernel of the patch offset (0: off)")
    p.add_argument("--local-strength", type=float, default=1.0,
                   help="logit scale of the first local head; head h gets strength * 0.5**h")
    p.add_argument("--distractors", type=int, default=2, help="max distractor shapes per image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                   help="attention kernel for training (eager measured ~20%% faster here than sdpa on CPU)")
    p.add_argument("--n-measure", type=int, default=512, help="test images for attention distance")
    p.add_argument("--measure-every", type=int, default=5, help="measure attention distance every N epochs")
    p.add_argument("--no-save", action="store_true", help="pilot run: measure only, write nothing")
    return p.parse_args(argv)


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
        locality_init(model, grid, args.local_init, args.local_strength)
    model.set_attn_implementation(args.attn)
    aux = torch.nn.Linear(args.hidden, N_BG + 1)  # training-only dense head (not saved)

    mim = torch.nn.Linear(args.hidden, 3 * patch * patch)  # training-only pixel decoder (not saved)
    params = [p for p in model.parameters() if p.requires_grad] + list(aux.parameters()) + list(mim.parameters())
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
          f"hidden {args.hidden}, pos {args.pos}, aux weight {args.aux_weight}, mim {args.mim_weight}, local init {args.local_init}, "
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

    def evaluate(n_measure=0):
        model.eval()
        correct, mad, n_mad = 0, None, 0
        with torch.no_grad():
            for i in range(0, len(y_test), 256):
                out = model(pixel_values=x_test[i:i + 256])
                correct += int((out.logits.argmax(-1) == y_test[i:i + 256]).sum())
            if n_measure:
                model.set_attn_implementation("eager")
                for i in range(0, min(n_measure, len(y_test)), 128):
                    out = model(pixel_values=x_test[i:min(i + 128, n_measure)], output_attentions=True)
                    s = mean_attention_distance(out.attentions, dist_t)
                    mad = s if mad is None else mad + s
                    n_mad += out.attentions[0].shape[0]
                model.set_attn_implementation(args.attn)
        model.train()
        return correct / len(y_test), (mad / n_mad if mad is not None else None)

    def fmt(mad):
        return " | ".join(" ".join(f"{v:5.1f}" for v in row) for row in mad) + f"   (uniform {uniform:.1f})"

    _, mad0 = evaluate(min(args.n_measure, 128))
    print("    mean attn dist (px) at init: " + fmt(mad0), flush=True)
    history = []
    step = 0
    for epoch in range(args.epochs):
        t_ep = time.perf_counter()
        perm = torch.randperm(args.n_train, generator=gen)
        tot_loss = tot_aux = tot_mim = 0.0
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
        measure = args.n_measure if (last or (epoch + 1) % args.measure_every == 0) else 0
        acc, mad = evaluate(measure)
        rec = {"epoch": epoch + 1, "loss": tot_loss / steps_per_epoch, "aux_loss": tot_aux / steps_per_epoch,
               "mim_loss": tot_mim / steps_per_epoch,
               "test_acc": acc, "seconds": time.perf_counter() - t_ep}
        msg = (f"epoch {epoch + 1:3d}  loss {rec['loss']:.4f}  aux {rec['aux_loss']:.4f}  mim {rec['mim_loss']:.4f}  "
               f"test acc {acc:.4f}  {rec['seconds']:.1f} s")
        if mad is not None:
            rec["mean_attention_distance"] = mad.round(2).tolist()
            msg += "\n    mean attn dist (px) per layer: " + fmt(mad)
        print(msg, flush=True)
        history.append(rec)

    seconds = time.perf_counter() - t_start
    acc, mad = evaluate(args.n_measure)
    report = {
        "test_accuracy": acc,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "seconds": round(seconds, 1),
        "seeds": {"torch": args.seed, "train_images": TRAIN_SEED, "test_images": TEST_SEED,
                  "demo_recording_images": DEMO_SEED},
        "data": {"generator": "scripts/shapes.py:make_shapes", "n_train": args.n_train, "n_test": args.n_test,
                 "image_size": size, "n_distractors": args.distractors, "classes": list(CLASS_NAMES)},
        "config": {"image_size": size, "patch_size": patch, "grid": [grid, grid], "tokens": grid * grid + 1,
                   "hidden_size": args.hidden, "layers": args.layers, "heads": args.heads,
                   "intermediate_size": args.mlp, "parameters": n_params,
                   "position_embeddings": args.pos, "init": args.init, "aux_dense_loss_weight": args.aux_weight,
                   "mim_loss_weight": args.mim_weight, "mim_mask_ratio": args.mim_ratio,
                   "locality_init_heads": args.local_init, "locality_init_strength": args.local_strength},
        "training": {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                     "schedule": "linear warmup + cosine", "augmentation": "random 90-degree rotations and flips",
                     "threads": args.threads},
        "normalization": {"mean": mean, "std": std},
        "mean_attention_distance": {
            "definition": "per head: for each query patch, sum over key patches of attention x Euclidean "
                          "distance between patch centres (pixels); CLS dropped as query and key, rows "
                          "renormalised over patches; averaged over query patches and test images",
            "n_images": min(args.n_measure, args.n_test),
            "uniform_px": round(uniform, 3),
            "per_head_px": mad.round(2).tolist(),
            "per_layer_mean_px": mad.mean(1).round(2).tolist(),
            "ratio_to_uniform": (mad / uniform).round(3).tolist(),
            "local_heads_below_60pct": [[l, h] for l in range(mad.shape[0]) for h in range(mad.shape[1])
                                        if mad[l, h] < 0.6 * uniform],
        },
        "history": history,
    }
    print(f"test accuracy {acc:.4f} ({args.n_test} images, seed {TEST_SEED}); {seconds:.0f} s total")
    print("mean attention distance (px), uniform = %.1f:" % uniform)
    for l, row in enumerate(mad):
        print(f"  layer {l}: " + "  ".join(f"h{h} {v:5.1f}" for h, v in enumerate(row)))

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
        print(f"saved to {out} ({report['model_bytes'] / 1e6:.2f} MB)")
    return report


if __name__ == "__main__":
    main()
