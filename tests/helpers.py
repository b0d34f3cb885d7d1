"""Shared test helpers: synthetic recordings written through the real writer, tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout

CLASS_NAMES = ("circle", "square", "triangle")


def random_attention(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Row-stochastic float32 maps of ``shape`` (..., query, key)."""
    x = rng.standard_normal(shape).astype(np.float32) * 2.0
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def make_recording(
    path: str | Path,
    *,
    n_samples: int = 6,
    n_layers: int = 2,
    n_heads: int = 3,
    grid: tuple[int, int] = (4, 4),
    patch: int = 8,
    n_prefix: int = 1,
    batch_size: int = 4,
    maps_fn: Callable[[int], np.ndarray] | None = None,
    with_masks: bool = True,
    seed: int = 0,
    compression: str = "lzf",
) -> Path:
    """Write a complete synthetic ViT recording through :class:`RecordingWriter`.

    ``maps_fn(sample)`` may return float ``[layer, head, tokens, tokens]``; default random softmax maps.
    Labels are ``i % 3``, predictions equal labels except sample 1 (one error).
    """
    rng = np.random.default_rng(seed)
    gh, gw = grid
    t = n_prefix + gh * gw
    size = (gh * patch, gw * patch)
    layout = TokenLayout(n_prefix=n_prefix, prefix_names=("cls",)[:n_prefix] + ("reg",) * max(0, n_prefix - 1),
                         grid=grid, patch_size=(patch, patch), image_size=size)
    labels = np.arange(n_samples) % 3
    w = RecordingWriter.create(
        path, family="vit", model_name="synthetic", model_class="ViTForImageClassification",
        sample_ids=[f"img_{i:03d}.png" for i in range(n_samples)],
        stacks=[StackSpec("self", n_layers, n_heads, t, t, layout)], class_names=CLASS_NAMES, labels=labels,
        thumbnail_shape=size, mask_shape=size if with_masks else None,
        attributions=[AttributionSpec("saliency", size, "pixel"), AttributionSpec("rollout", grid, "patch")],
        batch_size=batch_size, compression=compression, extraction_params={"synthetic": True},
    )
    with w:
        for start in range(0, n_samples, batch_size):
            idx = range(start, min(start + batch_size, n_samples))
            b = len(idx)
            maps = np.stack([maps_fn(i) if maps_fn else random_attention(rng, (n_layers, n_heads, t, t)) for i in idx])
            preds = labels[list(idx)].copy()
            if 1 in idx:
                preds[list(idx).index(1)] = (labels[1] + 1) % 3
            logits = rng.standard_normal((b, 3)).astype(np.float32)
            logits[np.arange(b), preds] += 5
            thumbs = rng.integers(0, 255, (b, *size, 3), dtype=np.uint8)
            masks = np.zeros((b, *size), np.uint8)
            masks[:, size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = 1
            w.write(SampleBatch(start=start, attention={"self": maps}, predictions=preds, logits=logits,
                                thumbnails=thumbs, masks=masks if with_masks else None,
                                attributions={"saliency": rng.standard_normal((b, *size)).astype(np.float32),
                                              "rollout": rng.random((b, *grid)).astype(np.float32)}))
        w.finish()
    return Path(path)


# -- tiny models and images for extractor tests (torch/transformers imported lazily) ------------

TINY_ARCHS = ("vit", "deit", "deit_teacher", "dinov2_registers")


def save_tiny_model(path: str | Path, arch: str = "vit", *, image_size: int | tuple[int, int] = 32, patch: int = 8,
                    layers: int = 2, heads: int = 4, hidden: int = 32, class_names: tuple[str, ...] = CLASS_NAMES,
                    processor: bool = True, seed: int = 0, n_registers: int = 2) -> Path:
    """Save a tiny randomly initialised image classifier with ``save_pretrained`` (safetensors).

    Args:
        arch: one of :data:`TINY_ARCHS`.
        processor: also save a ``preprocessor_config.json`` (ViTImageProcessorPil, mean = std = 0.5).

    ``initializer_range=0.2`` gives attention maps far from uniform, so wrong maps are visible.
    """
    import torch
    import transformers as T

    path = Path(path)
    labels = {i: n for i, n in enumerate(class_names)}
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                  image_size=image_size, patch_size=patch, num_labels=len(class_names), id2label=labels,
                  label2id={n: i for i, n in labels.items()}, initializer_range=0.2)
    if arch == "vit":
        cfg, cls = T.ViTConfig(**common), T.ViTForImageClassification
    elif arch == "deit":
        cfg, cls = T.DeiTConfig(**common), T.DeiTForImageClassification
    elif arch == "deit_teacher":
        cfg, cls = T.DeiTConfig(**common), T.DeiTForImageClassificationWithTeacher
    elif arch == "dinov2_registers":
        cfg, cls = T.Dinov2WithRegistersConfig(**common, num_register_tokens=n_registers), \
            T.Dinov2WithRegistersForImageClassification
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {TINY_ARCHS}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    if processor:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        T.ViTImageProcessorPil(size={"height": h, "width": w}).save_pretrained(path)
    return path


def write_images(folder: str | Path, names: list[str], *, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[Path]:
    """Write random RGB PNGs (``size`` = (h, w)) under ``folder`` at the relative ``names``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        p = Path(folder) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out
