"""Attribution registry: each method against an independent computation on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnviz.errors import InputError
from attnviz.analysis.rollout import attention_rollout, rollout_to_grid
from attnviz.store import AttributionSpec, TokenLayout
from extractor import attributions as A

IMAGE = (16, 24)  # not square, so a transposed map would have the wrong shape
PATCH = 8
GRID = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
LAYOUT = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=GRID, patch_size=(PATCH, PATCH), image_size=IMAGE)
METHODS = ["saliency", "integrated_gradients", "occlusion", "rollout"]


@pytest.fixture(scope="module")
def vit():
    from transformers import ViTConfig, ViTForImageClassification

    # initializer_range 0.1 (not 0.02) so that logits differ visibly between inputs.
    cfg = ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=3, initializer_range=0.1)
    torch.manual_seed(0)
    return ViTForImageClassification._from_config(cfg, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch(vit):
    torch.manual_seed(1)
    px = torch.randn(3, 3, *IMAGE)
    with torch.no_grad():
        out = vit(pixel_values=px, output_attentions=True)
    attentions = torch.stack(out.attentions, dim=1).numpy()  # [batch, layer, head, tokens, tokens]
    return px, out.logits.argmax(-1), attentions


def forward_of(model):
    return lambda px: model(pixel_values=px).logits


def run(name, model, batch, **params):
    px, targets, attentions = batch
    return A.compute(name, forward=forward_of(model), pixel_values=px, targets=targets, attentions=attentions,
                     layout=LAYOUT, **params)


def test_registry_names_and_entries():
    assert A.available("image") == METHODS
    assert {A.get(n).resolution for n in METHODS} == {"pixel", "patch"}
    assert A.get("rollout").resolution == "patch" and not A.get("rollout").needs_grad
    assert A.get("saliency").needs_grad and A.get("integrated_gradients").needs_grad
    assert not A.get("occlusion").needs_grad


@pytest.mark.parametrize("name", METHODS)
def test_spec_shape_matches_compute(name, vit, batch):
    spec = A.spec(name, layout=LAYOUT, target="label")
    assert isinstance(spec, AttributionSpec)
    assert spec.name == name and spec.target == "label" and spec.description
    assert spec.shape == (IMAGE if spec.resolution == "pixel" else GRID)
    out = run(name, vit, batch)
    assert out.dtype == np.float32 and out.shape == (3, *spec.shape)
    assert np.isfinite(out).all() and np.abs(out).max() > 0


def test_unknown_name_and_target_raise_input_error(batch):
    with pytest.raises(InputError) as err:
        A.spec("gradcam", layout=LAYOUT, target="predicted")
    assert "gradcam" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)
    with pytest.raises(InputError, match="gradcam"):
        A.compute("gradcam", forward=None, pixel_values=None, targets=None, attentions=None, layout=LAYOUT)
    with pytest.raises(InputError, match="predicted, label"):
        A.spec("saliency", layout=LAYOUT, target="truth")
    with pytest.raises(InputError, match="n_step"):
        A.compute("integrated_gradients", forward=None, pixel_values=None, targets=None, attentions=None,
                  layout=LAYOUT, n_step=3)


def test_pixel_method_without_image_size_raises():
    with pytest.raises(InputError, match="image size"):
        A.spec("occlusion", layout=TokenLayout(n_prefix=1, grid=GRID), target="predicted")


def test_saliency_equals_autograd_max_over_channels(vit, batch):
    px, targets, _ = batch
    x = px.clone().requires_grad_(True)
    logits = vit(pixel_values=x).logits
    # Samples do not interact in a ViT in eval mode, so the gradient of the sum of each sample's
    # target logit gives every sample's own gradient.
    (grad,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), x)
    expected = grad.abs().amax(dim=1).numpy()
    np.testing.assert_allclose(run("saliency", vit, batch), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(run("saliency", vit, batch, channel_reduction="sum"),
                               grad.abs().sum(dim=1).numpy(), rtol=1e-5, atol=1e-8)


def test_integrated_gradients_completeness(vit, batch):
    px, targets, _ = batch
    with torch.no_grad():
        rows = torch.arange(len(targets))
        delta = (vit(pixel_values=px).logits - vit(pixel_values=torch.zeros_like(px)).logits)[rows, targets].numpy()
    assert np.abs(delta).max() > 0.1  # a real difference to explain
    sums = run("integrated_gradients", vit, batch).sum(axis=(1, 2))
    np.testing.assert_allclose(sums, delta, rtol=1e-2, atol=1e-3)
    # The tolerance is tight enough to notice a crude integral: 2 steps miss it.
    crude = run("integrated_gradients", vit, batch, n_steps=2).sum(axis=(1, 2))
    assert not np.allclose(crude, delta, rtol=1e-2, atol=1e-3)
    # Chunks of 6 examples (2 steps of the 3 images) give the same result as one chunk.
    one_chunk = run("integrated_gradients", vit, batch, n_steps=8)
    np.testing.assert_allclose(run("integrated_gradients", vit, batch, n_steps=8, internal_batch_size=6),
                               one_chunk, rtol=1e-4, atol=1e-6)


class OnePatchModel(torch.nn.Module):
    """Logit c = w_c * sum of the pixels of patch (1, 2) (rows 8:16, columns 16:24), for 3 classes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))

    def forward(self, px):
        return px[:, :, 8:16, 16:24].sum(dim=(1, 2, 3))[:, None] * self.w


def test_occlusion_only_in_the_patch_the_logit_depends_on():
    model = OnePatchModel()
    torch.manual_seed(2)
    px = torch.rand(2, 3, *IMAGE) + 0.5
    targets = torch.tensor([2, 1])
    out = A.compute("occlusion", forward=model, pixel_values=px, targets=targets, attentions=None, layout=LAYOUT)
    patch_sums = px[:, :, 8:16, 16:24].sum(dim=(1, 2, 3))
    # Hiding the patch (baseline 0) removes the whole logit: drop = w_t * patch sum, on every pixel of it.
    expected = np.zeros((2, *IMAGE), np.float32)
    expected[:, 8:16, 16:24] = (model.w.detach()[targets] * patch_sums).numpy()[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert (out[:, :8] == 0).all() and (out[:, :, :16] == 0).all()


def test_occlusion_equals_manual_patch_occlusion(vit, batch):
    px, targets, _ = batch
    rows = torch.arange(len(targets))
    expected = np.zeros((len(targets), *IMAGE), np.float32)
    with torch.no_grad():
        full = vit(pixel_values=px).logits[rows, targets]
        for i in range(GRID[0]):
            for j in range(GRID[1]):
                hidden = px.clone()
                hidden[:, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH] = 0
                drop = full - vit(pixel_values=hidden).logits[rows, targets]
                expected[:, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH] = drop.numpy()[:, None, None]
    np.testing.assert_allclose(run("occlusion", vit, batch), expected, rtol=1e-4, atol=1e-6)
    # One occluded copy per forward pass gives the same map.
    np.testing.assert_allclose(run("occlusion", vit, batch, internal_batch_size=1), expected, rtol=1e-4, atol=1e-6)


def test_rollout_entry_wraps_the_analysis(vit, batch):
    _, _, attentions = batch
    out = run("rollout", vit, batch)
    for i in range(len(attentions)):
        expected = rollout_to_grid(attention_rollout(attentions[i]), n_prefix=1, grid=GRID)
        np.testing.assert_allclose(out[i], expected, rtol=1e-6)
    # Hand case: every head attends to patch (0, 1) = token 2 -> CLS row 0.75 there after 2 layers.
    focused = np.zeros((1, 2, 2, 7, 7), np.float32)
    focused[..., 2] = 1.0
    hand = np.zeros((1, *GRID), np.float32)
    hand[0, 0, 1] = 0.75
    got = A.compute("rollout", forward=None, pixel_values=None, targets=torch.tensor([0]), attentions=focused,
                    layout=LAYOUT)
    np.testing.assert_allclose(got, hand, atol=1e-7)


def _hooks(model):
    """Every hook on every module (transformers 5 keeps its own output-capturing hooks: compare, don't
    expect none)."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            for key in getattr(m, kind)}


@pytest.mark.parametrize("name", METHODS)
def test_leaves_no_gradients_hooks_or_changed_input(name, vit, batch):
    px, targets, attentions = batch
    before = px.clone()
    training = vit.training
    hooks = _hooks(vit)
    with torch.no_grad():  # the extractor may call from inside its no_grad forward loop
        out = run(name, vit, batch)
    assert np.abs(out).max() > 0  # gradients were computed despite the caller's no_grad
    assert all(p.grad is None for p in vit.parameters())
    assert _hooks(vit) == hooks
    assert vit.training == training
    assert not px.requires_grad and px.grad is None
    assert torch.equal(px, before)


@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "occlusion"])
def test_no_gradients_or_hooks_left_when_forward_raises(name, vit, batch):
    px, targets, attentions = batch
    calls = []
    hooks = _hooks(vit)

    def failing_forward(x):
        calls.append(1)
        if len(calls) > 1 or name != "occlusion":
            raise RuntimeError("boom")
        return vit(pixel_values=x).logits

    with pytest.raises(RuntimeError, match="boom"):
        A.compute(name, forward=failing_forward, pixel_values=px, targets=targets, attentions=attentions,
                  layout=LAYOUT)
    assert all(p.grad is None for p in vit.parameters())
    assert _hooks(vit) == hooks
    assert not px.requires_grad
