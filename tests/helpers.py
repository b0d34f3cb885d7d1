"""Shared test helpers: synthetic recordings written through the real writer, tiny models."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

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
    store: str = "full",
    store_rows: int = 4,
) -> Path:
    """Write a complete synthetic ViT recording through :class:`RecordingWriter`.

    ``maps_fn(sample)`` may return float ``[layer, head, tokens, tokens]``; default random softmax maps.
    Labels are ``i % 3``, predictions equal labels except sample 1 (one error). ``store="rows"`` keeps the
    prefix rows and ``store_rows`` query patches per sample (drawn by ``default_rng(sample)``), ``"summary"``
    no maps; both keep per-sample head statistics and the head metrics, as ``attnviz extract --store`` does.
    """
    from attnviz.analysis.head_stats import HeadStatsAccumulator, per_sample_specs, per_sample_values, write_head_stats

    rng = np.random.default_rng(seed)
    gh, gw = grid
    t = n_prefix + gh * gw
    size = (gh * patch, gw * patch)
    layout = TokenLayout(n_prefix=n_prefix, prefix_names=("cls",)[:n_prefix] + ("reg",) * max(0, n_prefix - 1),
                         grid=grid, patch_size=(patch, patch), image_size=size)
    labels = np.arange(n_samples) % 3
    n_rows = n_prefix + min(store_rows, gh * gw)
    stats = HeadStatsAccumulator("self", n_layers, n_heads, n_prefix)
    w = RecordingWriter.create(
        path, family="vit", model_name="synthetic", model_class="ViTForImageClassification",
        sample_ids=[f"img_{i:03d}.png" for i in range(n_samples)],
        stacks=[StackSpec("self", n_layers, n_heads, t, t, layout, rows=n_rows if store == "rows" else 0)],
        class_names=CLASS_NAMES, labels=labels,
        thumbnail_shape=size, mask_shape=size if with_masks else None,
        attributions=[AttributionSpec("saliency", size, "pixel"), AttributionSpec("rollout", grid, "patch")],
        batch_size=batch_size, compression=compression, extraction_params={"synthetic": True}, store=store,
        per_sample=per_sample_specs(n_layers, n_heads, n_prefix) if store != "full" else (),
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
            per_sample, rows = {}, {}
            if store != "full":
                per_sample = per_sample_values(stats.add(maps.astype(np.float16)), n_prefix)  # as stored
            if store == "rows":
                pos = np.stack([np.concatenate([np.arange(n_prefix), n_prefix + np.sort(
                    np.random.default_rng(i).choice(gh * gw, n_rows - n_prefix, replace=False))]) for i in idx])
                rows["self"] = (pos, np.stack([maps[j][:, :, pos[j]] for j in range(b)]))
            w.write(SampleBatch(start=start, attention={"self": maps} if store == "full" else {}, predictions=preds,
                                logits=logits, thumbnails=thumbs, masks=masks if with_masks else None,
                                attributions={"saliency": rng.standard_normal((b, *size)).astype(np.float32),
                                              "rollout": rng.random((b, *grid)).astype(np.float32)},
                                per_sample=per_sample, rows=rows))
        path = w.finish()
    if store != "full":
        import h5py

        with h5py.File(path, "r+") as f:
            write_head_stats(f, stats.result())
    return Path(path)


def make_qk_recording(path: str | Path, *, n_samples: int = 4, n_layers: int = 2, n_heads: int = 2,
                      grid: tuple[int, int] = (3, 3), dim: int = 4, seed: int = 0) -> Path:
    """A synthetic backbone recording whose maps are softmax(q k^T / sqrt(d)) of stored query/key vectors
    (every position), with patch (0, 0) as every image's object mask."""
    rng = np.random.default_rng(seed)
    t = 1 + grid[0] * grid[1]
    size = (grid[0] * 8, grid[1] * 8)
    lay = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=grid, patch_size=(8, 8), image_size=size)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    w = RecordingWriter.create(path, family="vit", model_name="synthetic", model_class="ViTModel",
                               sample_ids=[f"s{i}" for i in range(n_samples)],
                               stacks=[StackSpec("self", n_layers, n_heads, t, t, lay, qk_tokens=t, head_dim=dim,
                                                 qk_fraction=1.0)],
                               class_names=[], thumbnail_shape=size, mask_shape=size, batch_size=n_samples)
    q = rng.normal(size=(n_samples, n_layers, n_heads, t, dim)) * 2
    k = rng.normal(size=(n_samples, n_layers, n_heads, t, dim)) * 2
    maps = softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(dim))
    masks = np.zeros((n_samples, *size), np.uint8)
    masks[:, :8, :8] = 1  # patch (0, 0) is the object
    with w:
        w.write(SampleBatch(start=0, attention={"self": maps}, predictions=np.full(n_samples, -1),
                            logits=np.full((n_samples, 1), np.nan),
                            thumbnails=rng.integers(0, 255, (n_samples, *size, 3), dtype=np.uint8),
                            masks=masks, qk={"self": (np.tile(np.arange(t), (n_samples, 1)), q, k)}))
        w.finish()
    return Path(path)


# -- tiny models and images for extractor tests (torch/transformers imported lazily) ------------

#: tiny classifiers (the original four) and every other class of the architecture table
TINY_ARCHS = ("vit", "deit", "deit_teacher", "dinov2_registers")
TINY_CLASSIFIERS = TINY_ARCHS + ("dinov2", "clip_classifier", "siglip_classifier")
TINY_BACKBONES = ("vit_model", "deit_model", "dinov2_model", "dinov2_registers_model", "clip_vision",
                  "clip_vision_projection", "siglip_vision")
TINY_ALL = TINY_CLASSIFIERS + TINY_BACKBONES
#: arch -> (transformers class, config kind, processor kind); configs built in save_tiny_model
_TINY = {
    "vit": ("ViTForImageClassification", "vit", "vit"),
    "deit": ("DeiTForImageClassification", "deit", "vit"),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "deit", "vit"),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification", "dinov2_registers", "vit"),
    "dinov2": ("Dinov2ForImageClassification", "dinov2", "bit"),
    "clip_classifier": ("CLIPForImageClassification", "clip", "clip"),
    "siglip_classifier": ("SiglipForImageClassification", "siglip", "siglip"),
    "vit_model": ("ViTModel", "vit", "vit"),
    "deit_model": ("DeiTModel", "deit", "vit"),
    "dinov2_model": ("Dinov2Model", "dinov2", "bit"),
    "dinov2_registers_model": ("Dinov2WithRegistersModel", "dinov2_registers", "bit"),
    "clip_vision": ("CLIPVisionModel", "clip_vision", "clip"),
    "clip_vision_projection": ("CLIPVisionModelWithProjection", "clip_vision", "clip"),
    "siglip_vision": ("SiglipVisionModel", "siglip_vision", "siglip"),
}
#: prefix tokens each tiny model has (n_registers=2)
TINY_PREFIX = {
    "vit": ("cls",), "deit": ("cls", "distillation"), "deit_teacher": ("cls", "distillation"),
    "dinov2_registers": ("cls", "register_0", "register_1"), "dinov2": ("cls",), "clip_classifier": ("cls",),
    "siglip_classifier": (), "vit_model": ("cls",), "deit_model": ("cls", "distillation"), "dinov2_model": ("cls",),
    "dinov2_registers_model": ("cls", "register_0", "register_1"), "clip_vision": ("cls",),
    "clip_vision_projection": ("cls",), "siglip_vision": (),
}


def save_tiny_model(path: str | Path, arch: str = "vit", *, image_size: int | tuple[int, int] = 32, patch: int = 8,
                    layers: int = 2, heads: int = 4, hidden: int = 32, class_names: tuple[str, ...] = CLASS_NAMES,
                    processor: bool = True, seed: int = 0, n_registers: int = 2) -> Path:
    """Save a tiny randomly initialised vision transformer with ``save_pretrained`` (safetensors).

    Args:
        arch: one of :data:`TINY_ALL` (classifiers get ``class_names``; backbones have no head).
        processor: also save a ``preprocessor_config.json`` of the kind real checkpoints of that class
            carry: ViT-style (resize to the size; mean = std = 0.5), DINOv2's BitImageProcessor (resize the
            shortest edge to 8/7 of the size, centre-crop the size, ImageNet statistics), CLIP's
            (shortest edge = crop = size, CLIP statistics), SigLIP's (resize to the size).

    ``initializer_range=0.2`` gives attention maps far from uniform, so wrong maps are visible.
    """
    import torch
    import transformers as T

    path = Path(path)
    if arch not in _TINY:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {TINY_ALL}")
    cls_name, cfg_kind, proc_kind = _TINY[arch]
    labels = {i: n for i, n in enumerate(class_names)}
    head = dict(num_labels=len(class_names), id2label=labels, label2id={n: i for i, n in labels.items()})
    is_classifier = arch in TINY_CLASSIFIERS
    tower = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                 image_size=image_size, patch_size=patch, initializer_range=0.2)
    text = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=2 * hidden,
                vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    extra = head if is_classifier else {}
    if cfg_kind == "vit":
        cfg = T.ViTConfig(**tower, **extra)
    elif cfg_kind == "deit":
        cfg = T.DeiTConfig(**tower, **extra)
    elif cfg_kind == "dinov2":
        cfg = T.Dinov2Config(**tower, **extra)
    elif cfg_kind == "dinov2_registers":
        cfg = T.Dinov2WithRegistersConfig(**tower, num_register_tokens=n_registers, **extra)
    elif cfg_kind == "clip_vision":
        cfg = T.CLIPVisionConfig(**tower, projection_dim=16)
    elif cfg_kind == "siglip_vision":
        cfg = T.SiglipVisionConfig(**tower)
    elif cfg_kind == "clip":
        cfg = T.CLIPConfig(vision_config=tower, text_config=text, projection_dim=16, initializer_range=0.2, **extra)
    elif cfg_kind == "siglip":
        cfg = T.SiglipConfig(vision_config=tower, text_config=text, initializer_range=0.2, **extra)
    else:  # pragma: no cover
        raise AssertionError(cfg_kind)
    torch.manual_seed(seed)
    model = getattr(T, cls_name)._from_config(cfg).eval()
    with torch.no_grad():
        if cfg_kind in ("clip", "siglip"):  # classifiers: the tower's weights are drawn with the tower's range
            for n, prm in model.named_parameters():
                if prm.ndim == 2 and "vision_model" in n:
                    prm.normal_(0.0, 0.2)
        # layer norms as a trained model has them (scale and shift away from 1 and 0): with the default
        # init, a norm right before the output makes the embedding's length constant
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
    model.save_pretrained(path)
    if processor:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if proc_kind == "vit":
            T.ViTImageProcessorPil(size={"height": h, "width": w}).save_pretrained(path)
        elif proc_kind == "bit":
            T.BitImageProcessorPil(size={"shortest_edge": round(min(h, w) * 8 / 7)}, crop_size={"height": h, "width": w},
                                   do_center_crop=True, image_mean=list(IMAGENET_MEAN),
                                   image_std=list(IMAGENET_STD)).save_pretrained(path)
        elif proc_kind == "clip":
            T.CLIPImageProcessorPil(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w}
                                    ).save_pretrained(path)
        else:
            T.SiglipImageProcessorPil(size={"height": h, "width": w}).save_pretrained(path)
    return path


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# -- tiny LLaVA (vision-language) models and question manifests -------------------------------------

#: words of the tiny LLaVA's tokenizer: the five specials (pad, bos, eos, image, unk) first
TINY_LLAVA_WORDS = ("<pad>", "<s>", "</s>", "<image>", "<unk>", "user", "assistant", ":", "what", "colour", "is",
                    "it", "?", "where", "shape", "the", "red", "blue", "green", "left", "right", "circle", "square")


def save_tiny_llava(path: str | Path, *, image_size: int = 32, patch: int = 8, vision_layers: int = 2,
                    text_layers: int = 2, heads: int = 4, hidden: int = 32, max_positions: int = 64,
                    chat_template: bool = True, num_additional_image_tokens: int = 1, seed: int = 0) -> Path:
    """Save a tiny random ``LlavaForConditionalGeneration`` (CLIP tower + Llama language model) and its
    ``LlavaProcessor`` (CLIP image processor, word-level tokenizer, the demo's chat template) with
    ``save_pretrained``, as users have LLaVA checkpoints. Image tokens: ``(image_size // patch) ** 2``.

    Args:
        chat_template: save the chat template (without it a prompt must hold ``<image>`` itself).
        num_additional_image_tokens: the processor's count of tokens besides the patches (CLS = 1); 0
            makes a processor whose image-token count disagrees with the tower.
    """
    import sys

    import torch
    import transformers as T

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_demo_llava import build_processor, build_tokenizer

    path = Path(path)
    vision = T.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=patch,
                                projection_dim=hidden, initializer_range=0.2)
    text = T.LlamaConfig(vocab_size=len(TINY_LLAVA_WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2, tie_word_embeddings=False)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=3, vision_feature_layer=-1,
                        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms as a trained model has them, so maps and head outputs are far from uniform
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
            elif type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    model.generation_config = T.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=4)
    model.save_pretrained(path)
    processor = build_processor(build_tokenizer(list(TINY_LLAVA_WORDS)), image_size=image_size, patch=patch)
    processor.num_additional_image_tokens = num_additional_image_tokens
    processor.tokenizer.model_max_length = max_positions
    if not chat_template:
        processor.chat_template = None
    processor.save_pretrained(path)
    if not chat_template:
        (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def write_vqa_manifest(folder: str | Path, rows: list[dict], *, size: tuple[int, int] = (40, 48), seed: int = 0,
                       masks: bool = False) -> Path:
    """Write ``questions.jsonl`` under ``folder`` with one random RGB image per distinct ``image`` name of
    ``rows`` (each row: ``image``, ``prompt``, optional ``answer``); with ``masks`` a mask per image too."""
    import json

    from PIL import Image

    folder = Path(folder)
    images = sorted({r["image"] for r in rows})
    write_images(folder, images, size=size, seed=seed)
    out = []
    for r in rows:
        r = dict(r)
        if masks:
            m = np.zeros(size, np.uint8)
            m[: size[0] // 2, : size[1] // 2] = 255
            name = f"masks/{Path(r['image']).stem}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(folder / name)
            r["mask"] = name
        out.append(json.dumps(r))
    manifest = folder / "questions.jsonl"
    manifest.write_text("\n".join(out) + "\n")
    return manifest


#: the questions of the shared tiny lvlm recording (:func:`make_lvlm_run`)
LVLM_QUESTIONS = [
    {"image": "a.png", "prompt": "what colour is it?", "answer": "red"},
    {"image": "b.png", "prompt": "where is the shape?", "answer": "left"},
    {"image": "a.png", "prompt": "what shape is it?", "answer": "circle"},
    {"image": "c.png", "prompt": "what colour is the shape?"},
    {"image": "b.png", "prompt": "what is it?", "answer": "blue"},
]
#: sink tau of the shared recording (hidden size 32: phi <= sqrt(32))
LVLM_TAU = 3.0


def make_lvlm_run(root: str | Path) -> dict:
    """A tiny LLaVA, a manifest of :data:`LVLM_QUESTIONS` (with masks) and two recordings of it through
    ``extract``: ``full`` (every row, VHD, sinks at :data:`LVLM_TAU`, reinforcement alpha 3) and ``rows``
    (``answer_rows_only``). Returns paths and the loaded adapter of ``full``."""
    from extractor.pipeline import ExtractOptions, extract

    root = Path(root)
    model = save_tiny_llava(root / "llava")
    manifest = write_vqa_manifest(root / "data", LVLM_QUESTIONS, masks=True)
    opts = dict(model=str(model), input=str(manifest), batch_size=2, progress=False)
    full = extract(ExtractOptions(out=str(root / "full.h5"), **opts,
                                  family_options={"max_new_tokens": 3, "sink_tau": LVLM_TAU, "reinforce": 3.0}))
    rows = extract(ExtractOptions(out=str(root / "rows.h5"), **opts,
                                  family_options={"max_new_tokens": 3, "sink_tau": LVLM_TAU, "answer_rows_only": True}))
    return {"root": root, "model": model, "manifest": manifest, "full": full.path, "rows": rows.path,
            "adapter": full.adapter}


@contextlib.contextmanager
def interrupted_at_batch(monkeypatch, n: int = 2) -> Iterator[None]:
    """Inside the block, the ViT adapter's forward raises KeyboardInterrupt (a Ctrl-C) at its ``n``-th batch;
    the real forward is back afterwards."""
    from extractor.adapters.vit import VitAdapter

    real_run = VitAdapter.run
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_run(self, batch)

    monkeypatch.setattr(VitAdapter, "run", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(VitAdapter, "run", real_run)
