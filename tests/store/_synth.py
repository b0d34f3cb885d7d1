"""Synthetic recordings written through the real writer, returning what was written for comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout

CLASS_NAMES = ("cat", "dog", "bird", "fish")


def softmax_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Row-stochastic float32 maps of ``shape`` (..., query, key)."""
    x = rng.standard_normal(shape) * 2.0
    x = np.exp(x - x.max(-1, keepdims=True))
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


@dataclass
class Written:
    """What a synthetic recording holds, per sample (independent of the file)."""

    path: Path
    ids: list[str]
    maps: dict[str, np.ndarray]          # kind -> [n, L, H, Q, K] float32 (padded with zeros)
    lengths: dict[str, np.ndarray]       # kind -> [n, 2]
    labels: np.ndarray
    predictions: np.ndarray
    logits: np.ndarray
    thumbnails: np.ndarray | None = None
    masks: np.ndarray | None = None
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    meta: list[dict[str, Any]] | None = None
    batch_size: int = 3


def vit_data(n: int = 7, L: int = 2, H: int = 3, grid: tuple[int, int] = (3, 3), patch: int = 4,
             seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    t = 1 + grid[0] * grid[1]
    size = (grid[0] * patch, grid[1] * patch)
    logits = rng.standard_normal((n, len(CLASS_NAMES))).astype(np.float32)
    labels = rng.integers(0, len(CLASS_NAMES), n).astype(np.int32)
    labels[1] = -1  # one unlabelled input
    return dict(
        maps={"self": softmax_rows(rng, (n, L, H, t, t))},
        logits=logits, predictions=logits.argmax(1).astype(np.int32), labels=labels,
        thumbnails=rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
        masks=(rng.random((n, *size)) > 0.7).astype(np.uint8),
        attributions={"saliency": rng.standard_normal((n, *size)).astype(np.float32),
                      "rollout": rng.random((n, *grid)).astype(np.float32)},
        meta=[{"source": f"img_{i}.png", "i": i} for i in range(n)],
        layout=TokenLayout(n_prefix=1, prefix_names=("cls",), grid=grid, patch_size=(patch, patch), image_size=size),
        size=size, grid=grid,
    )


def create_vit(path: Path, d: dict[str, Any], *, batch_size: int = 3, compression: str = "lzf",
               **kw: Any) -> RecordingWriter:
    n, L, H, T, _ = d["maps"]["self"].shape
    return RecordingWriter.create(
        path, family="vit", model_name="synthetic-vit", model_class="ViTForImageClassification",
        sample_ids=kw.pop("sample_ids", [f"img_{i}.png" for i in range(n)]),
        stacks=[StackSpec("self", L, H, T, T, d["layout"])], class_names=CLASS_NAMES, labels=d["labels"],
        thumbnail_shape=d["size"], mask_shape=d["size"],
        attributions=[AttributionSpec("saliency", d["size"], "pixel", description="captum Saliency"),
                      AttributionSpec("rollout", d["grid"], "patch", target="label")],
        batch_size=batch_size, compression=compression, extraction_params={"seed": 0, "note": "synthetic"},
        skipped=[("broken.png", "cannot identify image file")], with_meta=True, **kw)


def vit_batch(d: dict[str, Any], start: int, stop: int) -> SampleBatch:
    sl = slice(start, stop)
    return SampleBatch(start=start, attention={"self": d["maps"]["self"][sl]}, predictions=d["predictions"][sl],
                       logits=d["logits"][sl], thumbnails=d["thumbnails"][sl], masks=d["masks"][sl],
                       attributions={k: v[sl] for k, v in d["attributions"].items()}, meta=d["meta"][sl])


def write_vit(path: Path, *, n: int = 7, L: int = 2, H: int = 3, grid: tuple[int, int] = (3, 3),
              batch_size: int = 3, compression: str = "lzf", seed: int = 0, stop_after: int | None = None) -> Written:
    """A ViT recording of ``n`` samples; ``stop_after`` batches then close() (an interrupted run)."""
    d = vit_data(n, L, H, grid, seed=seed)
    w = create_vit(path, d, batch_size=batch_size, compression=compression)
    with w:
        for b, start in enumerate(range(0, n, batch_size)):
            if stop_after is not None and b >= stop_after:
                break
            w.write(vit_batch(d, start, min(start + batch_size, n)))
        if stop_after is None:
            w.finish()
    t = d["maps"]["self"].shape[-1]
    return Written(path=Path(path), ids=[f"img_{i}.png" for i in range(n)], maps=d["maps"],
                   lengths={"self": np.tile([[t, t]], (n, 1))}, labels=d["labels"], predictions=d["predictions"],
                   logits=d["logits"], thumbnails=d["thumbnails"], masks=d["masks"], attributions=d["attributions"],
                   meta=d["meta"], batch_size=batch_size)


def write_s2t(path: Path, *, n: int = 5, batch_size: int = 2, seed: int = 1, explicit_lengths: bool = True) -> Written:
    """A speech-to-text recording with variable lengths: tokens vary per sample, frames too.

    Stacks: cross (2 layers x 3 heads, tokens x frames), self (encoder: 3 x 2, frames x frames),
    decoder_self (2 x 3, tokens x tokens). Each batch is given padded to its own longest sample
    (smaller than the file's maximum), with per-sample lengths when ``explicit_lengths``; otherwise
    every sample of a batch has the batch's size.
    """
    rng = np.random.default_rng(seed)
    max_tok, max_fr = 6, 10
    tok = rng.integers(2, max_tok + 1, n)
    fr = rng.integers(4, max_fr + 1, n)
    tok[-1], fr[-1] = max_tok - 1, max_fr - 2  # no sample reaches the maximum in the last batch
    tok[0], fr[0] = max_tok, max_fr
    dims = {"cross": (2, 3, "tok", "fr"), "self": (3, 2, "fr", "fr"), "decoder_self": (2, 3, "tok", "tok")}
    size = {"tok": tok, "fr": fr}
    mx = {"tok": max_tok, "fr": max_fr}
    maps = {k: np.zeros((n, L, H, mx[q], mx[kk]), np.float32) for k, (L, H, q, kk) in dims.items()}
    lengths = {k: np.zeros((n, 2), np.int64) for k in dims}
    logits = rng.standard_normal((n, len(CLASS_NAMES))).astype(np.float32)
    preds = logits.argmax(1).astype(np.int32)
    layouts = {"cross": TokenLayout(query_axis="tokens", key_axis="frames"),
               "self": TokenLayout(query_axis="frames", key_axis="frames"),
               "decoder_self": TokenLayout()}
    stacks = [StackSpec(k, L, H, mx[q], mx[kk], layouts[k]) for k, (L, H, q, kk) in dims.items()]
    w = RecordingWriter.create(path, family="s2t", model_name="synthetic-whisper",
                               model_class="WhisperForConditionalGeneration",
                               sample_ids=[f"clip_{i}.wav" for i in range(n)], stacks=stacks,
                               class_names=CLASS_NAMES, batch_size=batch_size, with_meta=True,
                               target_source="prediction")
    meta = [{"tokens": [f"t{j}" for j in range(tok[i])]} for i in range(n)]
    with w:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            att, lens = {}, {}
            for k, (L, H, q, kk) in dims.items():
                bq = max(size[q][i] for i in idx) if explicit_lengths else mx[q] - 1
                bk = max(size[kk][i] for i in idx) if explicit_lengths else mx[kk] - 1
                a = np.zeros((len(idx), L, H, bq, bk), np.float32)
                for j, i in enumerate(idx):
                    qi, ki = (size[q][i], size[kk][i]) if explicit_lengths else (bq, bk)
                    a[j, :, :, :qi, :ki] = softmax_rows(rng, (L, H, qi, ki))
                    maps[k][i, :, :, :qi, :ki] = a[j, :, :, :qi, :ki]
                    lengths[k][i] = (qi, ki)
                att[k] = a
                if explicit_lengths:
                    lens[k] = lengths[k][idx]
            w.write(SampleBatch(start=start, attention=att, lengths=lens, predictions=preds[idx], logits=logits[idx],
                                meta=[meta[i] for i in idx]))
        w.finish()
    return Written(path=Path(path), ids=[f"clip_{i}.wav" for i in range(n)], maps=maps, lengths=lengths,
                   labels=np.full(n, -1, np.int32), predictions=preds, logits=logits, meta=meta,
                   batch_size=batch_size)


def f16(x: np.ndarray) -> np.ndarray:
    """What a float16 store gives back as float32."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
