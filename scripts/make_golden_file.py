"""Build the golden files of format v1: ``tests/data/golden_v1.h5`` (ViT) and ``golden_v1_s2t.h5``.

A golden file is a small recording with values that follow from closed formulas, written once
through the real writer and committed. ``tests/store/test_golden.py`` reads the committed files and
checks every value against the same formulas (written out again there, independently of this
script) and a few hard-coded numbers. The test never rebuilds the files: they must keep reading in
every later attnviz. Rebuild only when a new format version gets its own golden file
(``golden_v2.h5``), never to make a failing test pass.

    python scripts/make_golden_file.py              # writes tests/data/golden_v1*.h5
    python scripts/make_golden_file.py --out DIR    # elsewhere (e.g. to compare)

ViT golden: 3 samples, 2 layers x 2 heads, a 2x2 grid of 4x4-pixel patches + CLS (5 tokens),
batches of 2, lzf. Labels [0, 1, -1], predictions [0, 2, 1] (accuracy 1/2), thumbnails 8x8,
masks, attributions "saliency" (pixel) and "rollout" (patch), per-sample meta, one skipped input,
head metric "golden_score", cached analysis "golden_profile".

S2T golden: 2 samples; cross 2x2 (tokens x frames, max 3x4), self (encoder) 1x2 (frames x frames,
max 4x4), decoder_self 2x2 (max 3x3); sample 0 has 2 tokens and 3 frames, sample 1 has 3 tokens and
4 frames; no labels.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from attnviz.store import (
    AttributionSpec,
    HeadMetricInfo,
    RecordingWriter,
    SampleBatch,
    StackSpec,
    TokenLayout,
    save_analysis,
    write_head_metric,
)

# every `created` attribute: 2026-01-01T00:00:00+00:00 (see attnviz.store.schema.timestamp)
SOURCE_DATE_EPOCH = "1767225600"

VIT_CLASSES = ("circle", "square", "triangle")
VIT_LABELS = np.array([0, 1, -1], np.int32)
VIT_LOGITS = np.array([[2.0, 0.0, -1.0], [0.0, -1.0, 1.5], [-2.0, 3.0, 0.25]], np.float32)


def scores(s: int, layer: int, head: int, q: int, k: int) -> float:
    """Pre-softmax score of query q to key k."""
    return ((s + 1) * (q + 2) + (layer + 1) * (k + 1) + 3 * head) % 5 * 0.5


def attention_map(s: int, layer: int, head: int, nq: int, nk: int) -> np.ndarray:
    """float64 [nq, nk]: row-wise softmax of :func:`scores`."""
    z = np.array([[scores(s, layer, head, q, k) for k in range(nk)] for q in range(nq)])
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def build_vit(out: Path) -> Path:
    n, L, H, T = 3, 2, 2, 5
    layout = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(2, 2), patch_size=(4, 4), image_size=(8, 8))
    maps = np.array([[[attention_map(s, layer, h, T, T) for h in range(H)] for layer in range(L)] for s in range(n)])
    y, x = np.mgrid[0:8, 0:8]
    thumbs = np.stack([(s * 50 + y[..., None] * 8 + x[..., None] * 3 + np.arange(3) * 20) % 256
                       for s in range(n)]).astype(np.uint8)
    masks = np.stack([((y >= 4) & (x < 4 + s)) for s in range(n)]).astype(np.uint8)
    saliency = np.stack([(y * 8 + x) / 64 - s * 0.25 for s in range(n)]).astype(np.float32)
    rollout = np.stack([np.arange(4).reshape(2, 2) / 4 + s for s in range(n)]).astype(np.float32)
    preds = VIT_LOGITS.argmax(1).astype(np.int32)
    w = RecordingWriter.create(
        out, family="vit", model_name="golden-vit", model_class="ViTForImageClassification",
        sample_ids=[f"img_{s}.png" for s in range(n)], stacks=[StackSpec("self", L, H, T, T, layout)],
        class_names=VIT_CLASSES, labels=VIT_LABELS, thumbnail_shape=(8, 8), mask_shape=(8, 8),
        attributions=[AttributionSpec("saliency", (8, 8), "pixel", description="golden saliency"),
                      AttributionSpec("rollout", (2, 2), "patch", target="label")],
        batch_size=2, compression="lzf", model_config={"hidden_size": 8, "num_attention_heads": H},
        extraction_params={"attributions": ["saliency", "rollout"], "batch_size": 2},
        skipped=[("broken.png", "cannot identify image file")], with_meta=True, overwrite=True,
    )
    with w:
        for start in (0, 2):
            sl = slice(start, min(start + 2, n))
            w.write(SampleBatch(start=start, attention={"self": maps[sl]}, predictions=preds[sl],
                                logits=VIT_LOGITS[sl], thumbnails=thumbs[sl], masks=masks[sl],
                                attributions={"saliency": saliency[sl], "rollout": rollout[sl]},
                                meta=[{"source": f"golden_{s}"} for s in range(sl.start, sl.stop)]))
        w.finish()
    write_head_metric(out, HeadMetricInfo("golden_score", kind="self", definition="2*layer + head + 0.5",
                                          citation="golden file", units="units", higher_is_more_important=True,
                                          params={"n": 3}),
                      np.array([[0.5, 1.5], [2.5, 3.5]]))
    save_analysis(out, "golden_profile", {"bins": 4, "kind": "self"},
                  {"profile": np.arange(8, dtype=np.float32).reshape(2, 4) / 8, "names": np.array(["near", "far"])},
                  attrs={"note": "golden"})
    return out


def build_s2t(out: Path) -> Path:
    tokens, frames = (2, 3), (3, 4)
    dims = {"cross": (2, 2, 3, 4), "self": (1, 2, 4, 4), "decoder_self": (2, 2, 3, 3)}
    sizes = {"cross": lambda s: (tokens[s], frames[s]), "self": lambda s: (frames[s], frames[s]),
             "decoder_self": lambda s: (tokens[s], tokens[s])}
    layouts = {"cross": TokenLayout(query_axis="tokens", key_axis="frames"),
               "self": TokenLayout(query_axis="frames", key_axis="frames"), "decoder_self": TokenLayout()}
    logits = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    w = RecordingWriter.create(
        out, family="s2t", model_name="golden-whisper", model_class="WhisperForConditionalGeneration",
        sample_ids=["clip_0.wav", "clip_1.wav"],
        stacks=[StackSpec(k, L, H, q, kk, layouts[k]) for k, (L, H, q, kk) in dims.items()],
        class_names=("yes", "no"), batch_size=2, with_meta=True, target_source="prediction", overwrite=True,
    )
    att, lens = {}, {}
    for kind, (L, H, mq, mk) in dims.items():
        a = np.zeros((2, L, H, mq, mk))
        for s in range(2):
            q, k = sizes[kind](s)
            for layer in range(L):
                for h in range(H):
                    a[s, layer, h, :q, :k] = attention_map(s, layer, h, q, k)
        att[kind] = a
        lens[kind] = np.array([sizes[kind](s) for s in range(2)])
    with w:
        w.write(SampleBatch(start=0, attention=att, lengths=lens, predictions=logits.argmax(1), logits=logits,
                            meta=[{"tokens": ["yes", "<eos>"]}, {"tokens": ["no", "no", "<eos>"]}]))
        w.finish()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data")
    args = ap.parse_args()
    os.environ["SOURCE_DATE_EPOCH"] = SOURCE_DATE_EPOCH
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (build_vit(args.out / "golden_v1.h5"), build_s2t(args.out / "golden_v1_s2t.h5")):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
