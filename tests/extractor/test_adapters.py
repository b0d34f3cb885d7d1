"""Adapter registry, architecture table, model loading and the vit adapter's per-batch work."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnviz.errors import InputError, ModelError
from extractor.adapters import (
    ARCHITECTURES,
    available_adapters,
    detect,
    find_modules,
    get_adapter,
    load_model,
    supported_architectures,
)
from extractor.adapters.vit import VitAdapter
from extractor.inputs import ImageInput
from tests.helpers import TINY_ARCHS, save_tiny_model, write_images

EXPECTED_PREFIX = {
    "vit": ("cls",),
    "deit": ("cls", "distillation"),
    "deit_teacher": ("cls", "distillation"),
    "dinov2_registers": ("cls", "register_0", "register_1"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: save_tiny_model(root / a, a) for a in TINY_ARCHS}


# -- registry and table --------------------------------------------------------------------


def test_registry_lists_vit_and_rejects_unknown_names():
    assert "vit" in available_adapters()
    assert get_adapter("vit") is VitAdapter
    with pytest.raises(InputError, match=r"unknown model family 'bert'; available: vit"):
        get_adapter("bert")


def test_detect_by_architecture_and_by_model_type():
    from transformers import BertConfig, DeiTConfig, ViTConfig

    assert detect(ViTConfig()).model_class == "ViTForImageClassification"  # no architectures: model_type
    cfg = DeiTConfig(architectures=["DeiTForImageClassificationWithTeacher"])
    assert detect(cfg).model_class == "DeiTForImageClassificationWithTeacher"
    with pytest.raises(ModelError) as e:
        detect(BertConfig(architectures=["BertForMaskedLM"]))
    msg = str(e.value)
    assert "BertForMaskedLM is not supported" in msg
    for name in supported_architectures():
        assert name in msg


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_table_module_patterns_match_each_layer(arch, model_dirs):
    """The table's regexes find exactly one attention / q / k / v / o_proj per layer, in order."""
    adapter = load_model(model_dirs[arch], device="cpu")
    n_layers = adapter.config.num_hidden_layers
    hidden = adapter.config.hidden_size
    for what in ("attention", "query", "key", "value", "output_projection"):
        found = adapter.modules(what)
        assert [layer for layer, _, _ in found] == list(range(n_layers)), what
    for _, name, mod in adapter.modules("output_projection"):
        assert name.endswith("o_proj") and isinstance(mod, torch.nn.Linear) and mod.in_features == hidden
    # find_modules is the one helper behind it
    assert len(find_modules(adapter.model, r"^(?:vit|deit|dinov2_with_registers)\.(?:encoder\.layer|layers)\.(\d+)$")) \
        == n_layers


def test_every_table_row_is_a_transformers_class():
    import transformers

    for row in ARCHITECTURES:
        assert hasattr(transformers, row.model_class), row.model_class
        assert row.family in available_adapters()


# -- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_sets_eager_layout_and_prefix_tokens(arch, model_dirs):
    adapter = load_model(model_dirs[arch], device="cpu")
    assert adapter.model.config._attn_implementation == "eager"
    assert not adapter.model.training
    (stack,) = adapter.stacks()
    lay = stack.layout
    assert lay.prefix_names == EXPECTED_PREFIX[arch]
    assert lay.grid == (4, 4) and lay.patch_size == (8, 8) and lay.image_size == (32, 32)
    assert (stack.n_layers, stack.n_heads, stack.max_query) == (2, 4, len(EXPECTED_PREFIX[arch]) + 16)
    assert adapter.class_names == ["circle", "square", "triangle"]
    assert adapter.model_name == arch


def test_missing_path_not_a_model_and_unsupported(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"not a model directory \(no config.json\)"):
        load_model(tmp_path / "empty", device="cpu")
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="BertForMaskedLM is not supported.*ViTForImageClassification"):
        load_model(tmp_path / "bert", device="cpu")


def test_hub_id_not_in_cache_says_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="not a model in the local Hugging Face cache.*never downloads"):
        load_model("nobody-here/tiny-vit-xyz", device="cpu")


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch, model_dirs):
    """A hub id resolves through the cache layout (refs/main -> snapshots/<rev>) without network."""
    import shutil

    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-vit"
    rev = "0" * 40
    shutil.copytree(model_dirs["vit"], repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = load_model("someone/tiny-vit", device="cpu")
    assert adapter.source.from_cache and adapter.model_name == "someone/tiny-vit"


def test_weights_without_safetensors_are_refused(tmp_path, model_dirs):
    import shutil

    d = tmp_path / "nosafe"
    shutil.copytree(model_dirs["vit"], d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors in the model directory"):  # extractor/loading.py
        load_model(d, device="cpu")


def test_processor_built_from_config_without_torchvision_warning(tmp_path, caplog, capsys):
    d = save_tiny_model(tmp_path / "deit", "deit", image_size=(24, 40), processor=False)
    with caplog.at_level(logging.WARNING):
        adapter = load_model(d, device="cpu")
    assert adapter.input_size == (24, 40)
    assert type(adapter.processor).__name__ == "ViTImageProcessorPil"
    # a DeiT without a saved processor is normalised with the ImageNet statistics from the table
    assert np.allclose(adapter.processor.image_mean, (0.485, 0.456, 0.406))
    logged = caplog.text + capsys.readouterr().err
    assert "torchvision" not in logged.lower()


def test_family_mismatch_and_bad_device(model_dirs):
    with pytest.raises(InputError, match="unknown model family 'tts'"):
        load_model(model_dirs["vit"], family="tts", device="cpu")
    with pytest.raises(ModelError, match=r"is a ViTForImageClassification \(vit family\), not a s2t model"):
        load_model(model_dirs["vit"], family="s2t", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_model(model_dirs["vit"], device="cuda")
    with pytest.raises(InputError, match="for the GPU forward"):
        load_model(model_dirs["vit"], device="cpu", dtype="float16")


# -- per batch -----------------------------------------------------------------------------


def test_prepare_thumbnail_is_the_model_input_unnormalised(tmp_path, model_dirs):
    adapter = load_model(model_dirs["vit"], device="cpu")
    (p,) = write_images(tmp_path, ["a.png"], size=(50, 70))
    batch = adapter.prepare([ImageInput("a.png", p)])
    assert batch.thumbnails.shape == (1, 32, 32, 3) and batch.thumbnails.dtype == np.uint8
    # independent: the same resize with PIL (bilinear, as the processor is configured)
    ref = np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.int16)
    assert np.abs(batch.thumbnails[0].astype(np.int16) - ref).max() <= 1
    assert batch.masks is None and batch.labels.tolist() == [-1]


def test_thumbnail_capped_at_224(tmp_path):
    d = save_tiny_model(tmp_path / "big", "vit", image_size=(256, 320), patch=32, layers=1, heads=2, hidden=16)
    adapter = load_model(d, device="cpu")
    assert adapter.thumbnail_size == (179, 224)
    (p,) = write_images(tmp_path, ["a.png"], size=(20, 20))
    assert adapter.prepare([ImageInput("a.png", p)]).thumbnails.shape == (1, 179, 224, 3)


def test_mask_follows_the_processor_geometry(tmp_path, model_dirs):
    adapter = load_model(model_dirs["vit"], device="cpu")
    (p,) = write_images(tmp_path, ["a.png"], size=(40, 80))
    m = np.zeros((40, 80), np.uint8)
    m[:, :20] = 7  # left quarter, any nonzero value is object
    Image.fromarray(m).save(tmp_path / "m.png")
    batch = adapter.prepare([ImageInput("a.png", p, 1, tmp_path / "m.png"), ImageInput("b.png", p, 2)])
    assert batch.masks.shape == (2, 32, 32)
    assert batch.masks[0, :, :7].all() and not batch.masks[0, :, 9:].any()
    assert not batch.masks[1].any()  # no mask given: all background
    assert batch.labels.tolist() == [1, 2]


def test_run_returns_float16_stack_and_logits(tmp_path, model_dirs):
    adapter = load_model(model_dirs["deit_teacher"], device="cpu")
    paths = write_images(tmp_path, ["a.png", "b.png", "c.png"])
    batch = adapter.prepare([ImageInput(p.name, p) for p in paths])
    with torch.no_grad():
        out = adapter.run(batch)
        ref = adapter.model(**batch.inputs, output_attentions=True)
    maps = out.attention["self"]
    assert maps.dtype == torch.float16 and tuple(maps.shape) == (3, 2, 4, 18, 18)
    assert torch.equal(maps, torch.stack(ref.attentions, 1).half())
    assert torch.allclose(out.logits, ref.logits)
    # the attribution forward is differentiable and equals the plain logits
    px = batch.inputs["pixel_values"].clone().requires_grad_(True)
    logits = adapter.logits_fn()(px)
    assert torch.allclose(logits, ref.logits, atol=1e-6)
    logits[:, 0].sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0
