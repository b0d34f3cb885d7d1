"""Every vision class of the architecture table, as users have them (``save_pretrained`` dirs of tiny random
models): the recorded maps equal the model's own ``output_attentions`` at its own size and at another
resolution; backbones without a classification head record no predictions; their attribution targets
equal an independent computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnviz
from attnviz.errors import InputError
from extractor.adapters import ARCHITECTURES, load_model, supported_architectures
from extractor.pipeline import ExtractOptions, extract
from tests.helpers import TINY_ALL, TINY_BACKBONES, TINY_CLASSIFIERS, TINY_PREFIX, _TINY, save_tiny_model, write_images

NAMES = ["cat/a.png", "cat/b.png", "d.png", "dog/c.png"]  # the recording's order: sorted paths


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backbones")
    for arch in TINY_ALL:
        save_tiny_model(root / arch, arch)
    write_images(root / "imgs", NAMES, size=(37, 51))
    return root


def _run(root: Path, arch: str, out: Path, **kw) -> Path:
    opts = dict(model=str(root / arch), input=str(root / "imgs"), out=str(out), device="cpu", batch_size=3,
                attributions=(), progress=False)
    opts.update(kw)
    return extract(ExtractOptions(**opts)).path


def _independent_pixels(model_dir: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """The inputs as the checkpoint's own processor makes them, resized by hand for another size:
    ViT/SigLIP processors resize to (h, w); DINOv2's and CLIP's resize the shortest edge and centre-crop."""
    import transformers

    proc = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    kwargs = {}
    if size is not None:
        h, w = size
        if getattr(proc, "do_center_crop", False):
            ratio = proc.size["shortest_edge"] / proc.crop_size["height"]
            kwargs = {"size": {"shortest_edge": round(min(h, w) * ratio)}, "crop_size": {"height": h, "width": w}}
        else:
            kwargs = {"size": {"height": h, "width": w}}
    images = [Image.open(model_dir.parent / "imgs" / n).convert("RGB") for n in NAMES]
    return proc(images, return_tensors="pt", **kwargs)["pixel_values"]


def _own_attentions(model_dir: Path, arch: str, px: torch.Tensor, interpolate: bool) -> np.ndarray:
    """``output_attentions`` of the model loaded straight from transformers: [batch, layer, head, q, k]."""
    import transformers

    cls = getattr(transformers, _TINY[arch][0])
    model = cls.from_pretrained(model_dir, attn_implementation="eager").eval()
    kw = {"interpolate_pos_encoding": True} if interpolate and not arch.startswith("dinov2") else {}
    with torch.no_grad():
        out = model(pixel_values=px, output_attentions=True, **kw)
    return torch.stack(out.attentions, 1).numpy()


def test_every_class_users_bring_is_a_row_of_the_table():
    wanted = {"Dinov2ForImageClassification", "Dinov2Model", "Dinov2WithRegistersModel", "ViTModel", "DeiTModel",
              "CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "CLIPForImageClassification",
              "SiglipForImageClassification", "ViTForImageClassification", "DeiTForImageClassification"}
    assert wanted <= set(supported_architectures())
    # every vit row is tested below (the lvlm row in test_lvlm.py)
    assert {_TINY[a][0] for a in TINY_ALL} == set(supported_architectures("vit"))
    assert {r.model_class for r in ARCHITECTURES if not r.has_classifier and r.family == "vit"} == {_TINY[a][0] for a in TINY_BACKBONES}


@pytest.mark.parametrize("arch", TINY_ALL)
def test_module_patterns_find_one_projection_per_layer(arch, root):
    adapter = load_model(root / arch, device="cpu")
    for what in ("attention", "query", "key", "value", "output_projection"):
        assert [layer for layer, _, _ in adapter.modules(what)] == [0, 1], what
    for _, name, mod in adapter.modules("output_projection"):
        assert isinstance(mod, torch.nn.Linear) and mod.in_features == 32 and not name.startswith("head.")
    assert adapter.model.config._attn_implementation == "eager"
    assert adapter.main_layout.prefix_names == TINY_PREFIX[arch]
    assert adapter.has_classifier == (arch in TINY_CLASSIFIERS)
    assert adapter.class_names == (["circle", "square", "triangle"] if arch in TINY_CLASSIFIERS else [])


@pytest.mark.parametrize("arch", TINY_ALL)
@pytest.mark.parametrize("size", [None, (48, 40)], ids=["own-size", "48x40"])
def test_recorded_maps_equal_the_models_own_attentions(arch, size, root, tmp_path):
    out = _run(root, arch, tmp_path / "r.h5", image_size=size)
    px = _independent_pixels(root / arch, size)
    ref = _own_attentions(root / arch, arch, px, interpolate=size is not None)
    h, w = size or (32, 32)
    with attnviz.open(out) as rec:
        lay = rec.layout()
        assert lay.grid == (h // 8, w // 8) and lay.image_size == (h, w)
        assert lay.prefix_names == TINY_PREFIX[arch]
        assert ref.shape[-1] == lay.n_prefix + (h // 8) * (w // 8) and rec.sample_ids() == NAMES
        got = np.stack([[rec.attention_heads(s, layer) for layer in range(rec.n_layers)] for s in range(4)])
        assert np.abs(got - ref).max() <= 1e-3  # float16 storage of probabilities
        assert rec.thumbnail(0).shape == (h, w, 3)


@pytest.mark.parametrize("arch", TINY_BACKBONES)
def test_backbone_records_no_predictions_and_keeps_the_input_labels(arch, root, tmp_path):
    out = _run(root, arch, tmp_path / "r.h5", attributions=("rollout",))
    with attnviz.open(out) as rec:
        assert not rec.has_predictions and rec.accuracy is None
        assert (rec.predictions() == -1).all() and np.isnan(rec.logits()).all()
        assert rec.class_names() == ["cat", "dog"]  # from the subfolders: the model has no classes
        assert rec.sample_ids() == NAMES
        assert rec.labels().tolist() == [0, 0, -1, 1]
        assert rec.attribution_info("rollout").target == "embedding_norm"
        assert rec.extraction_params["output"] != "logits"


def test_label_targets_and_class_names_refused_for_backbones(root, tmp_path):
    with pytest.raises(InputError, match="no classification head.*embedding_norm or embedding_similarity"):
        _run(root, "dinov2_model", tmp_path / "a.h5", target="predicted")
    with pytest.raises(InputError, match="has a classification head; use predicted or label"):
        _run(root, "vit", tmp_path / "b.h5", target="embedding_norm")
    with pytest.raises(InputError, match="saliency of --target embedding_similarity is zero"):
        _run(root, "dinov2_model", tmp_path / "c.h5", target="embedding_similarity", attributions=("saliency",))
    assert not list(tmp_path.iterdir())


def test_image_size_must_fit_the_patch_grid(root, tmp_path):
    with pytest.raises(attnviz.AttnvizError, match="not a multiple of the patch size 8x8"):
        _run(root, "vit", tmp_path / "a.h5", image_size=(50, 40))


def _embedding(arch: str, model_dir: Path, px: torch.Tensor) -> torch.Tensor:
    import transformers

    model = getattr(transformers, _TINY[arch][0]).from_pretrained(model_dir).eval()
    out = model(pixel_values=px)
    if arch == "clip_vision_projection":
        return out.image_embeds
    if arch in ("clip_vision", "siglip_vision"):
        return out.pooler_output
    return out.last_hidden_state[:, 0]


@pytest.mark.parametrize("arch", ["dinov2_model", "siglip_vision", "clip_vision_projection"])
def test_embedding_norm_saliency_is_the_gradient_of_the_norm(arch, root, tmp_path):
    out = _run(root, arch, tmp_path / "r.h5", attributions=("saliency",), limit=2)
    px = _independent_pixels(root / arch, None)[:2].clone().requires_grad_(True)
    norm = _embedding(arch, root / arch, px).norm(dim=-1).sum()
    (grad,) = torch.autograd.grad(norm, px)
    expected = grad.abs().amax(dim=1).numpy()
    with attnviz.open(out) as rec:
        got = np.stack([rec.attribution(s, "saliency") for s in range(2)])
        assert "||e(x)||_2" in rec.attribution_info("saliency").description
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


def test_embedding_similarity_occlusion_is_one_minus_the_cosine_of_the_occluded_image(root, tmp_path):
    arch = "dinov2_model"
    out = _run(root, arch, tmp_path / "r.h5", attributions=("occlusion",), target="embedding_similarity", limit=2)
    px = _independent_pixels(root / arch, None)[:2]
    with torch.no_grad():
        e = _embedding(arch, root / arch, px)
        for (r, c) in [(0, 0), (2, 3)]:
            hidden = px.clone()
            hidden[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0.0  # the occlusion baseline
            cos = torch.nn.functional.cosine_similarity(_embedding(arch, root / arch, hidden), e, dim=-1)
            with attnviz.open(out) as rec:
                for s in range(2):
                    got = rec.attribution(s, "occlusion")[r * 8 + 3, c * 8 + 3]
                    assert got == pytest.approx(1.0 - float(cos[s]), abs=1e-5)


def test_backbone_head_importance_is_retrieval_of_each_inputs_own_embedding(root, tmp_path):
    """Head importance of a model without classes: scores cos(e(x_i), r_j) / 0.1 against the unablated
    embeddings r of every input, target i; checked here for one head written out by hand."""
    from attnviz.analysis.importance import RETRIEVAL_TEMPERATURE, accuracy_name
    from extractor.importance import ImportanceOptions, run_importance

    arch = "dinov2_model"
    out = _run(root, arch, tmp_path / "r.h5")
    adapter = load_model(root / arch, device="cpu")
    res = run_importance(adapter, str(root / "imgs"), out, ImportanceOptions(
        progress=False, random_seeds=1, prune_steps=2, partial_fractions=(1.0, 0.5)), batch_size=2)
    assert res.curves.target_source == "embedding" and accuracy_name("embedding") == "retrieval accuracy"
    assert res.curves.base_accuracy == 1.0  # every intact embedding is nearest itself

    import transformers

    model = transformers.Dinov2Model.from_pretrained(root / arch).eval()
    px = _independent_pixels(root / arch, None)
    layer, head, d = 1, 2, 8

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0.0
        return (x,)

    with torch.no_grad():
        e = torch.nn.functional.normalize(model(pixel_values=px).last_hidden_state[:, 0], dim=-1)
        handle = model.encoder.layer[layer].attention.o_proj.register_forward_pre_hook(zero_head)
        try:
            e_abl = torch.nn.functional.normalize(model(pixel_values=px).last_hidden_state[:, 0], dim=-1)
        finally:
            handle.remove()
    logp = torch.log_softmax(e @ e.T / RETRIEVAL_TEMPERATURE, -1).double()
    logq = torch.log_softmax(e_abl @ e.T / RETRIEVAL_TEMPERATURE, -1).double()
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    loss = float(-logq.diagonal().mean() + logp.diagonal().mean())
    assert kl > 1e-3  # the head matters enough for the check to mean something
    assert res.metrics["kl_divergence"][layer, head] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert res.metrics["loss_increase"][layer, head] == pytest.approx(loss, rel=1e-4, abs=1e-7)
    with attnviz.open(out) as rec:
        assert rec.head_metric_info("kl_divergence").params["target_source"] == "embedding"


@pytest.mark.parametrize("arch", ["vit", "clip_vision", "siglip_vision"])
def test_stored_queries_and_keys_give_back_the_recorded_maps(arch, root, tmp_path):
    out = _run(root, arch, tmp_path / "r.h5", store_qk=1.0, limit=2)
    with attnviz.open(out) as rec:
        assert rec.has_qk() and rec.qk_fraction() == 1.0
        for s in range(2):
            for layer in range(2):
                for head in range(4):
                    pos, q, k = rec.queries_keys(s, layer, head)
                    assert pos.tolist() == list(range(rec.lengths(s)[0]))
                    logits = q.astype(np.float64) @ k.T.astype(np.float64) / np.sqrt(q.shape[1])
                    soft = np.exp(logits - logits.max(1, keepdims=True))
                    soft /= soft.sum(1, keepdims=True)
                    assert np.abs(soft - rec.attention(s, layer, head)).max() < 2e-2  # float16 q, k at scale 0.2


def test_a_fraction_of_the_tokens_keeps_cls_and_the_same_draw_on_every_run(root, tmp_path):
    from extractor.pipeline import qk_positions, qk_token_count

    a = _run(root, "vit", tmp_path / "a.h5", store_qk=0.25, batch_size=1)
    b = _run(root, "vit", tmp_path / "b.h5", store_qk=0.25, batch_size=3)
    n_keep = qk_token_count(17, 1, 0.25)
    assert n_keep == 1 + 4
    with attnviz.open(a) as ra, attnviz.open(b) as rb:
        for s in range(4):
            pos = ra.qk_positions(s)
            assert len(pos) == n_keep and pos[0] == 0 and (np.diff(pos) > 0).all()
            assert pos.tolist() == rb.qk_positions(s).tolist() == qk_positions(s, 17, 1, n_keep).tolist()
            assert np.array_equal(ra.queries_keys(s, 1, 2)[1], rb.queries_keys(s, 1, 2)[1])
    with pytest.raises(InputError, match="--store-qk"):
        _run(root, "vit", tmp_path / "c.h5", store_qk=1.5)
