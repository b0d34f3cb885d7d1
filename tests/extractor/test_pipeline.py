"""The extraction pipeline: recorded maps against an independent computation, layouts, attributions,
masks, and interrupt + resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import attnviz
from attnviz.errors import InputError
from extractor.adapters.vit import VitAdapter
from extractor.pipeline import ExtractOptions, extract, parse_attributions, resolve_compression
from tests.helpers import interrupted_at_batch, save_tiny_model, write_images

NAMES = ["circle/a.png", "circle/b.png", "square/c.png", "triangle/d.png", "e.png"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    save_tiny_model(root / "vit", "vit")
    save_tiny_model(root / "deit", "deit_teacher", image_size=(24, 40), seed=3)
    write_images(root / "imgs", NAMES, size=(37, 51))
    return root


def run(data: Path, out: Path, **kw) -> Path:
    opts = dict(model=str(data / "vit"), input=str(data / "imgs"), out=str(out), device="cpu", batch_size=2,
                attributions=(), progress=False)
    opts.update(kw)
    return extract(ExtractOptions(**opts)).path


def independent_attention(model_dir: Path, model_class: str, images: list[Path]) -> np.ndarray:
    """softmax(Q K^T / sqrt(d)) from the model's own q_proj/k_proj weights applied to each layer's
    normalised input, captured with a forward hook on ``layernorm_before``; the model runs with its
    default (SDPA) attention, so nothing here comes from ``output_attentions``.

    Returns:
        float64 ``[batch, layer, head, query_pos, key_pos]``.
    """
    import transformers

    model = getattr(transformers, model_class).from_pretrained(model_dir).eval()
    proc = transformers.ViTImageProcessorPil.from_pretrained(model_dir)
    px = proc([Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    normed: dict[int, torch.Tensor] = {}
    layers: dict[int, torch.nn.Module] = {}
    handles = []
    for name, mod in model.named_modules():
        m = re.fullmatch(r"\w+\.layers\.(\d+)", name)
        if m:
            i = int(m.group(1))
            layers[i] = mod
            handles.append(mod.layernorm_before.register_forward_hook(
                lambda _m, _inp, out, i=i: normed.__setitem__(i, out.detach().double())))
    with torch.no_grad():
        model(pixel_values=px)
    for h in handles:
        h.remove()
    heads = model.config.num_attention_heads
    maps = []
    torch.set_grad_enabled(False)
    for i in sorted(layers):
        att = layers[i].attention
        x = normed[i]  # [batch, tokens, hidden]
        q = x @ att.q_proj.weight.double().T + att.q_proj.bias.double()
        k = x @ att.k_proj.weight.double().T + att.k_proj.bias.double()
        b, t, hd = q.shape
        d = hd // heads
        q = q.view(b, t, heads, d).transpose(1, 2)
        k = k.view(b, t, heads, d).transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d), dim=-1))
    torch.set_grad_enabled(True)
    return torch.stack(maps, 1).numpy()


@pytest.mark.parametrize("model, model_class, prefix", [
    ("vit", "ViTForImageClassification", ("cls",)),
    ("deit", "DeiTForImageClassificationWithTeacher", ("cls", "distillation")),
])
def test_recorded_maps_equal_independent_softmax(data, tmp_path, model, model_class, prefix):
    out = run(data, tmp_path / "r.h5", model=str(data / model))
    expected = independent_attention(data / model, model_class, [data / "imgs" / n for n in sorted(NAMES)])
    with attnviz.open(out) as rec:
        lay = rec.layout()
        assert lay.prefix_names == prefix and lay.n_prefix == len(prefix)
        assert rec.sample_ids() == sorted(NAMES)
        L, H = rec.stack_shape()
        assert expected.shape == (5, L, H, lay.n_tokens, lay.n_tokens)
        for s in range(rec.n_samples):
            got = rec.attention_heads(s, 0)
            for layer in range(L):
                got = rec.attention_heads(s, layer)
                assert np.allclose(got.sum(-1), 1.0, atol=2e-3)
                np.testing.assert_allclose(got, expected[s, layer], atol=1e-3)
        # the maps are far from uniform, so the comparison above can tell right from wrong
        assert expected.max() > 5 / lay.n_tokens


def test_deit_layout_grid_from_a_non_square_model(data, tmp_path):
    out = run(data, tmp_path / "r.h5", model=str(data / "deit"))
    with attnviz.open(out) as rec:
        lay = rec.layout()
        assert lay.grid == (3, 5) and lay.image_size == (24, 40) and lay.n_tokens == 17
        assert rec.thumbnail(0).shape == (24, 40, 3)
        assert rec.model_class == "DeiTForImageClassificationWithTeacher"


def test_labels_predictions_logits_and_head_stats(data, tmp_path):
    out = run(data, tmp_path / "r.h5")
    expected_logits = []
    import transformers

    model = transformers.ViTForImageClassification.from_pretrained(data / "vit").eval()
    proc = transformers.ViTImageProcessorPil.from_pretrained(data / "vit")
    with torch.no_grad():
        for n in sorted(NAMES):
            px = proc(Image.open(data / "imgs" / n).convert("RGB"), return_tensors="pt")["pixel_values"]
            expected_logits.append(model(pixel_values=px).logits[0].numpy())
    with attnviz.open(out) as rec:
        assert rec.complete and rec.n_samples == 5
        # sorted ids: circle/a circle/b e.png square/c triangle/d
        assert rec.labels().tolist() == [0, 0, -1, 1, 2]
        np.testing.assert_allclose(rec.logits(), np.stack(expected_logits), atol=1e-5)
        assert rec.predictions().tolist() == np.stack(expected_logits).argmax(1).tolist()
        assert rec.class_names() == ["circle", "square", "triangle"]
        assert rec.attribution_methods() == []
        assert {"entropy", "confidence"} <= set(rec.head_metrics())
        assert rec.target_source == "label"
        assert rec.extraction_params["batch_size"] == 2


def test_default_attributions_are_the_cheap_ones(data, tmp_path):
    out = run(data, tmp_path / "r.h5", attributions=None, limit=2)
    with attnviz.open(out) as rec:
        assert rec.attribution_methods() == ["rollout", "saliency"]
        assert rec.extraction_params["attributions"] == ["rollout", "saliency"]


def test_all_attributions_are_recorded_with_their_shapes(data, tmp_path):
    from extractor import attributions as A

    out = run(data, tmp_path / "r.h5", attributions=parse_attributions("all"), limit=3)
    with attnviz.open(out) as rec:
        assert rec.attribution_methods() == sorted(A.available("image"))
        for name in A.available("image"):
            info = rec.attribution_info(name)
            assert info.shape == ((32, 32) if info.resolution == "pixel" else (4, 4))
            assert info.target == "predicted"
            values = np.stack([rec.attribution(s, name) for s in range(3)])
            assert np.isfinite(values).all() and np.abs(values).sum() > 0


def test_rollout_is_computed_from_the_recorded_maps(data, tmp_path):
    """Rollout (Abnar & Zuidema 2020) written out here from the maps as stored in the file."""
    out = run(data, tmp_path / "r.h5", attributions=("rollout",))
    with attnviz.open(out) as rec:
        lay = rec.layout()
        got = np.stack([rec.attribution(s, "rollout") for s in range(rec.n_samples)])
        for s in range(rec.n_samples):
            joint = np.eye(lay.n_tokens)
            for layer in range(rec.n_layers):
                a = 0.5 * rec.attention_heads(s, layer).astype(np.float64).mean(0) + 0.5 * np.eye(lay.n_tokens)
                a /= a.sum(-1, keepdims=True)
                joint = a @ joint
            expected = joint[0, lay.n_prefix:].reshape(lay.grid)
            np.testing.assert_allclose(got[s], expected, rtol=1e-4, atol=1e-6)


def test_target_label_uses_labels_and_needs_them(data, tmp_path):
    with pytest.raises(InputError, match="--target label needs a label for every input; 1 have none"):
        run(data, tmp_path / "r.h5", target="label", attributions=("saliency",))
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "r.h5.partial").exists()
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"image": str(data / "imgs" / n), "label": i % 3}) + "\n"
                           for i, n in enumerate(NAMES)))
    out = run(data, tmp_path / "r.h5", input=str(man), target="label", attributions=("saliency",))
    with attnviz.open(out) as rec:
        assert rec.attribution_info("saliency").target == "label"
        assert rec.labels().tolist() == [0, 1, 2, 0, 1]


def test_manifest_masks_are_recorded(data, tmp_path):
    m = np.zeros((37, 51), np.uint8)
    m[:, :25] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"image": str(data / "imgs" / "e.png"), "mask": "mask.png"}) + "\n"
                   + json.dumps({"image": str(data / "imgs" / "circle/a.png")}) + "\n")
    out = run(data, tmp_path / "r.h5", input=str(man))
    with attnviz.open(out) as rec:
        assert rec.has_masks
        m0, m1 = rec.mask(0), rec.mask(1)
        assert m0.shape == (32, 32) and m0[:, :15].all() and not m0[:, 17:].any()
        assert not m1.any()


def test_parse_attributions():
    from extractor import attributions as A

    assert parse_attributions("default") is None and parse_attributions(None) is None
    assert parse_attributions("all") == "all"  # every method of the model's input kind
    assert parse_attributions("none") == ()
    assert parse_attributions("rollout, saliency,rollout") == ("rollout", "saliency")
    with pytest.raises(InputError, match="unknown attribution method 'gradcam'; available: " + ", ".join(A.available())):
        parse_attributions("saliency,gradcam")
    with pytest.raises(InputError, match="cannot be combined"):
        parse_attributions("none,saliency")
    with pytest.raises(InputError, match="cannot be combined"):
        parse_attributions("all,saliency")


def test_parse_image_size_and_format_rate():
    from extractor.pipeline import format_rate, parse_image_size

    assert parse_image_size("224") == (224, 224) and parse_image_size("448x336") == (448, 336)
    assert parse_image_size(None) is None
    for bad in ("big", "0", "1x2x3", "-4x8"):
        with pytest.raises(InputError, match="--image-size"):
            parse_image_size(bad)
    assert format_rate(30, 10.0) == "3.0 img/s"
    assert format_rate(3, 12.0) == "4.0 s/img"  # not "0.2 img/s" (or, rounded, "0.0 img/s")
    assert format_rate(2, 3000.0) == "25.0 min/img"
    assert format_rate(0, 1.0) == "no imgs recorded"


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items() if k != "created"}
    return out, attrs


def test_interrupt_then_resume_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    # (saliency and integrated gradients are resumed in tests/test_cli_extract.py's real Ctrl-C test)
    kw = dict(attributions=("occlusion", "rollout"), batch_size=2)
    reference = run(data, tmp_path / "ref.h5", **kw)

    out = tmp_path / "r.h5"
    with interrupted_at_batch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run(data, out, **kw)
    assert not out.exists() and (tmp_path / "r.h5.partial").exists()
    with attnviz.open(tmp_path / "r.h5.partial") as rec:
        assert not rec.complete and rec.n_samples == 2 and rec.n_planned == 5

    # resuming with other options is refused and leaves the partial file as it was
    with pytest.raises(InputError, match="recorded with attributions="):
        run(data, out, resume=True, attributions=("rollout",))
    with pytest.raises(InputError, match="recorded from other inputs"):
        run(data, out, resume=True, attributions=("occlusion", "rollout"), limit=4)

    counted = {"n": 0}
    real_run = VitAdapter.run

    def counting(self, batch):
        counted["n"] += 1
        return real_run(self, batch)

    monkeypatch.setattr(VitAdapter, "run", counting)
    result = extract(ExtractOptions(model=str(data / "vit"), input=str(data / "imgs"), out=str(out), device="cpu",
                                    batch_size=2, attributions=("occlusion", "rollout"), progress=False, resume=True))
    assert counted["n"] == 2 and result.n_recorded == 3  # only the two batches not done
    got, got_attrs = _datasets(out)
    ref, ref_attrs = _datasets(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
    assert got_attrs == ref_attrs


def test_auto_compression_is_lzf_on_gpu_and_none_on_cpu(data, tmp_path):
    assert resolve_compression("auto", torch.device("cuda")) == "lzf"
    assert resolve_compression("auto", torch.device("cpu")) == "none"
    assert resolve_compression("gzip", torch.device("cpu")) == "gzip"
    out = run(data, tmp_path / "r.h5", compression="auto")
    with h5py.File(out, "r") as f:
        assert f["attention/self/maps"].compression is None
        assert json.loads(f.attrs["extraction_params"])["compression"] == "none"
    out = run(data, tmp_path / "g.h5", compression="gzip")
    with h5py.File(out, "r") as f:
        assert f["attention/self/maps"].compression == "gzip"
