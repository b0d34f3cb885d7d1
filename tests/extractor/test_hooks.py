"""Head hooks at the output-projection input: capture, ablate, scale, partial pruning; no hook left behind."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from attnviz.errors import ModelError
from extractor.hooks import (
    PARTIAL_ATTENTION_NAME,
    ablate_heads,
    attnviz_hooks,
    capture_head_outputs,
    count_hooks,
    expand_batch,
    find_output_projections,
    partial_attention,
    scale_heads,
)

PATTERN = r"layers\.(\d+)\.attention\.o_proj$"
L, H, D = 2, 3, 4  # layers, heads, head_dim


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A fixed-seed ViT small enough for exact checks; initializer_range 0.3 so heads change the logits."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=(8, 12), patch_size=4, hidden_size=H * D, num_hidden_layers=L, num_attention_heads=H,
                    intermediate_size=24, num_labels=5, initializer_range=0.3)
    torch.manual_seed(seed)
    return ViTForImageClassification._from_config(cfg, attn_implementation="eager").eval().to(dtype)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def px():
    torch.manual_seed(1)
    return torch.randn(4, 3, 8, 12)


def logits(model, px):
    with torch.no_grad():
        return model(pixel_values=px).logits


def without_head(model, layer: int, head: int):
    """Independent ablation: a copy whose W_O columns of that head are zero (same as a zero head output)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.vit.layers[layer].attention.o_proj.weight[:, head * D:(head + 1) * D] = 0
    return m


def test_find_output_projections_vit_and_deit():
    from transformers import DeiTConfig, DeiTForImageClassification

    sites = find_output_projections(tiny_vit(), PATTERN)
    assert sites.names == ("vit.layers.0.attention.o_proj", "vit.layers.1.attention.o_proj")
    assert (sites.n_layers, sites.n_heads, sites.head_dim) == (L, H, D)
    deit = DeiTForImageClassification(DeiTConfig(image_size=8, patch_size=4, hidden_size=12, num_hidden_layers=3,
                                                 num_attention_heads=2, intermediate_size=8))
    s2 = find_output_projections(deit, PATTERN)
    assert s2.names == tuple(f"deit.layers.{i}.attention.o_proj" for i in range(3)) and s2.shape == (3, 2)


def test_missing_projection_names_the_pattern(vit):
    with pytest.raises(ModelError, match=re.escape('ViTForImageClassification: no module name matches the pattern '
                                                   r'"self_attn\.out_proj$"')):
        find_output_projections(vit, r"self_attn\.out_proj$")


def test_capture_equals_independent_attention(vit, px):
    """Layer 0's captured head outputs = softmax(QK^T/sqrt(d)) V from the layer's own projections."""
    sites = find_output_projections(vit, PATTERN)
    with torch.no_grad(), capture_head_outputs(sites) as out:
        vit(pixel_values=px)
        layer = vit.vit.layers[0]
        x = layer.layernorm_before(vit.vit.embeddings(px))  # [batch, tokens, hidden]
        att = layer.attention
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, H, D).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        manual = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v).transpose(1, 2)
    assert out[0].shape == (b, t, H, D)
    torch.testing.assert_close(out[0], manual, rtol=1e-5, atol=1e-6)
    assert attnviz_hooks(vit) == []


def test_ablation_changes_logits_and_equals_zeroed_weights(vit, px):
    sites = find_output_projections(vit, PATTERN)
    before = count_hooks(vit)
    base = logits(vit, px)
    mask = torch.zeros(L, H, dtype=torch.bool)
    mask[1, 2] = True
    with ablate_heads(sites, mask):
        ablated = logits(vit, px)
    assert (ablated - base).abs().max() > 1e-2  # the head matters
    torch.testing.assert_close(ablated, logits(without_head(vit, 1, 2), px), rtol=1e-5, atol=1e-6)
    assert attnviz_hooks(vit) == [] and count_hooks(vit) == before
    assert torch.equal(logits(vit, px), base)  # nothing left behind


def test_no_hook_left_when_forward_raises(vit, px):
    sites = find_output_projections(vit, PATTERN)
    before = count_hooks(vit)
    base = logits(vit, px)
    per_row = torch.zeros(3, L, H, dtype=torch.bool)  # 3 rows, but the forward has 4: the hook raises
    for ctx in (ablate_heads(sites, per_row), scale_heads(sites, torch.ones(3, L, H)),
                capture_head_outputs(sites)):
        with pytest.raises((ValueError, RuntimeError)):
            with ctx:
                with torch.no_grad():
                    vit(pixel_values=px)
                raise RuntimeError("after the forward")  # capture does not raise by itself
        assert attnviz_hooks(vit) == [] and count_hooks(vit) == before
    with pytest.raises(ValueError, match="3 rows"):
        with partial_attention(vit, sites, torch.full((3, L, H), 0.5)):
            vit(pixel_values=px)
    assert vit.config._attn_implementation == "eager"
    assert torch.equal(logits(vit, px), base)


def test_per_row_mask_equals_separate_forwards(vit, px):
    """K different ablations in one replicated batch = K forwards with one mask each."""
    sites = find_output_projections(vit, PATTERN)
    masks = torch.zeros(3, L, H, dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[1, 1, 0] = masks[1, 0, 2] = True  # row 2: nothing ablated
    b = px.shape[0]
    with ablate_heads(sites, masks.repeat_interleave(b, 0)):
        batched = logits(vit, px.repeat(3, 1, 1, 1)).view(3, b, -1)
    for k in range(3):
        with ablate_heads(sites, masks[k]):
            torch.testing.assert_close(batched[k], logits(vit, px), rtol=1e-5, atol=1e-6)


def test_mean_replacement(vit, px):
    """Replacing a head by its own captured output changes nothing; by a constant = that constant through W_O."""
    sites = find_output_projections(vit, PATTERN)
    with torch.no_grad(), capture_head_outputs(sites) as out:
        base = vit(pixel_values=px).logits
    own = out[1][0].permute(1, 0, 2)  # sample 0's outputs of layer 1: [head, seq, head_dim]
    repl = torch.zeros(L, H, *own.shape[1:])
    repl[1] = own
    mask = torch.zeros(L, H, dtype=torch.bool)
    mask[1] = True
    with ablate_heads(sites, mask, repl):
        got = logits(vit, px[:1])
    torch.testing.assert_close(got, base[:1], rtol=1e-5, atol=1e-6)

    const = torch.zeros(L, H, D)
    const[0, 1] = 0.7
    mask = torch.zeros(L, H, dtype=torch.bool)
    mask[0, 1] = True
    m = without_head(vit, 0, 1)
    with torch.no_grad():  # a constant head output = a bias of W_O[:, head] @ const
        o = vit.vit.layers[0].attention.o_proj
        m.vit.layers[0].attention.o_proj.bias += o.weight[:, D:2 * D] @ const[0, 1]
    with ablate_heads(sites, mask, const):
        torch.testing.assert_close(logits(vit, px), logits(m, px), rtol=1e-5, atol=1e-5)


def test_scale_heads(vit, px):
    sites = find_output_projections(vit, PATTERN)
    base = logits(vit, px)
    with scale_heads(sites, torch.ones(L, H)):
        assert torch.equal(logits(vit, px), base)
    gates = torch.ones(L, H)
    gates[1, 2] = 0.0
    with scale_heads(sites, gates):
        torch.testing.assert_close(logits(vit, px), logits(without_head(vit, 1, 2), px), rtol=1e-5, atol=1e-6)


def test_partial_attention_keep_one_is_exact_and_restores(vit, px):
    sites = find_output_projections(vit, PATTERN)
    base = logits(vit, px)
    with partial_attention(vit, sites, torch.ones(L, H)):
        assert vit.config._attn_implementation == PARTIAL_ATTENTION_NAME
        same = logits(vit, px)
    assert torch.equal(same, base)
    assert vit.config._attn_implementation == "eager"


def test_partial_attention_keeps_top_p_and_renormalises(vit, px):
    sites = find_output_projections(vit, PATTERN)
    with torch.no_grad():
        eager = vit(pixel_values=px, output_attentions=True).attentions[0]  # [batch, head, q, k]
    keep = torch.ones(L, H)
    keep[0, 1] = 0.3
    with torch.no_grad(), partial_attention(vit, sites, keep):
        pruned = vit(pixel_values=px, output_attentions=True).attentions[0]
    n_keys = eager.shape[-1]
    n_keep = math.ceil(0.3 * n_keys)
    # independent: zero all but the n_keep largest entries of each row of head 1, renormalise
    top = eager[:, 1].topk(n_keep, dim=-1)
    expect = torch.zeros_like(eager[:, 1]).scatter(-1, top.indices, top.values)
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(pruned[:, 1], expect, rtol=1e-5, atol=1e-7)
    assert ((pruned[:, 1] > 0).sum(-1) == n_keep).all()
    torch.testing.assert_close(pruned[:, 1].sum(-1), torch.ones_like(pruned[:, 1, :, 0]))
    assert torch.equal(pruned[:, [0, 2]], eager[:, [0, 2]])  # other heads untouched


def test_shape_errors(vit):
    sites = find_output_projections(vit, PATTERN)
    with pytest.raises(ValueError, match="layer, head"):
        with ablate_heads(sites, torch.zeros(H, L, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        with partial_attention(vit, sites, torch.zeros(L, H)):
            pass
    assert attnviz_hooks(vit) == []


def test_expand_batch_equals_replicated_inputs(vit, px):
    """Copying the batch at layer 1 (layer 0 runs once) = running 3 copies of the inputs from the start."""
    sites = find_output_projections(vit, PATTERN)
    assert len(sites.layer_modules) == L and sites.layer_modules[1] is vit.vit.layers[1]
    b = px.shape[0]
    masks = torch.zeros(3, L, H, dtype=torch.bool)
    masks[0, 1, 0] = masks[2, 1, 2] = True
    rows = masks.repeat_interleave(b, 0)
    with ablate_heads(sites, rows):
        replicated = logits(vit, px.repeat(3, 1, 1, 1))
        with expand_batch(sites, 1, 3):
            expanded = logits(vit, px)
    torch.testing.assert_close(expanded, replicated, rtol=1e-5, atol=1e-6)
    assert attnviz_hooks(vit) == []
    with expand_batch(sites, 0, 2):  # a second forward with another batch size inside one context
        logits(vit, px)
        assert logits(vit, px[:1]).shape == (2, 5)
    with pytest.raises(ValueError):
        with expand_batch(sites, L, 2):
            pass
