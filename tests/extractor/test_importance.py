"""Head importance on a tiny fixed-seed ViT, each metric against an independent computation."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

from attnviz.analysis import importance as A
from extractor.hooks import attnviz_hooks, find_output_projections, partial_attention
from extractor.importance import (
    ImportanceOptions,
    compute_importance,
    evaluate_ablations,
    evaluate_ablations_loop,
    evaluate_partial,
    gradient_importance,
    mean_head_outputs,
    prepare_eval_data,
    single_head_masks,
)
from tests.extractor.test_hooks import PATTERN, D, H, L, tiny_vit

N_CLASSES = 5


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(seed=3)


@pytest.fixture(scope="module")
def sites(vit):
    return find_output_projections(vit, PATTERN)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(4)
    return torch.randn(10, 3, 8, 12)


@pytest.fixture(scope="module")
def labels(vit, images):
    """The model's predictions with two changed: base accuracy 0.8, so ablations can lower it."""
    with torch.no_grad():
        lab = vit(pixel_values=images).logits.argmax(-1).numpy().copy()
    lab[[2, 7]] = (lab[[2, 7]] + 1) % N_CLASSES
    return lab


def batches(px, size=4):
    return [{"pixel_values": px[i:i + size]} for i in range(0, len(px), size)]


@pytest.fixture(scope="module")
def data(vit, images, labels):
    return prepare_eval_data(vit, batches(images), [labels[i:i + 4] for i in range(0, 10, 4)])


@pytest.fixture(scope="module")
def result(vit, sites, data):
    """One full run shared by the tests that check its parts (3 pruning steps, 3 random orders)."""
    return compute_importance(vit, sites, data, ImportanceOptions(progress=False, random_seeds=3, prune_steps=3))


def zero_weights(model, heads):
    """Independent ablation: W_O columns of every (layer, head) in ``heads`` set to zero."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer, head in heads:
            m.vit.layers[layer].attention.o_proj.weight[:, head * D:(head + 1) * D] = 0
    return m


def outcome(model, px, labels):
    """(accuracy, mean CE, log-probs) computed by hand in float64 numpy."""
    with torch.no_grad():
        z = model(pixel_values=px).logits.double().numpy()
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float((z.argmax(1) == labels).mean()), float(-logp[np.arange(len(labels)), labels].mean()), logp


def test_single_head_metrics_equal_manual_ablation(vit, data, images, labels, result):
    res = result
    acc0, loss0, logp0 = outcome(vit, images, labels)
    assert data.target_source == "label"
    assert res.curves.base_accuracy == pytest.approx(acc0) and res.curves.base_loss == pytest.approx(loss0, rel=1e-5)
    drops = []
    for layer in range(L):
        for head in range(H):
            acc, loss, logp = outcome(zero_weights(vit, [(layer, head)]), images, labels)
            kl = float((np.exp(logp0) * (logp0 - logp)).sum(1).mean())
            assert res.metrics["accuracy_drop"][layer, head] == pytest.approx(acc0 - acc, abs=1e-12)
            assert res.metrics["loss_increase"][layer, head] == pytest.approx(loss - loss0, rel=1e-4, abs=1e-6)
            assert res.metrics["kl_divergence"][layer, head] == pytest.approx(kl, rel=1e-4, abs=1e-7)
            drops.append(acc0 - acc)
    assert any(d != 0 for d in drops) and res.metrics["kl_divergence"].min() > 0  # the heads do matter here
    assert attnviz_hooks(vit) == [] and vit.config._attn_implementation == "eager"


def test_mean_ablation_equals_manual_mean_replacement(vit, sites, data, images, labels):
    """--ablation mean: the head's output is its mean over the data (per position), put in by hand."""
    mean = mean_head_outputs(vit, sites, data)  # [layer, head, seq, head_dim]
    # independent mean: the o_proj inputs collected with a hand-written hook
    seen = []
    o = vit.vit.layers[1].attention.o_proj
    handle = o.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            vit(pixel_values=images)
    finally:
        handle.remove()
    mu = seen[0].view(10, -1, H, D).mean(0)  # [seq, head, head_dim]
    torch.testing.assert_close(mean[1], mu.permute(1, 0, 2), rtol=1e-5, atol=1e-6)

    def replace(m, a):
        x = a[0].clone().view(a[0].shape[0], -1, H, D)
        x[:, :, 2] = mu[:, 2]
        return (x.view(a[0].shape),)

    handle = o.register_forward_pre_hook(replace)
    try:
        acc, loss, _ = outcome(vit, images, labels)
    finally:
        handle.remove()
    masks = np.zeros((1, L, H), bool)
    masks[0, 1, 2] = True
    got = evaluate_ablations(vit, sites, data, masks, replacement=mean)
    assert got.accuracy[0] == pytest.approx(acc) and got.loss[0] == pytest.approx(loss, rel=1e-5)


def test_gradient_importance_is_the_finite_difference_gate_derivative(images, labels):
    """d loss / d gate of a head (gate = a scalar on that head's W_O columns), by central differences, float64."""
    vit64 = tiny_vit(seed=3, dtype=torch.float64)
    sites = find_output_projections(vit64, PATTERN)
    px = images[:5].double()
    lab = labels[:5]
    data = prepare_eval_data(vit64, batches(px, 3), [lab[:3], lab[3:]])
    raw = gradient_importance(vit64, sites, data)
    # transformers' eager attention runs its softmax in float32 even in a float64 model, so a tiny
    # step drowns in rounding; 1e-3 keeps both rounding and truncation error ~1e-6
    eps = 1e-3

    def losses(gate_layer, gate_head, g):
        m = copy.deepcopy(vit64)
        with torch.no_grad():
            m.vit.layers[gate_layer].attention.o_proj.weight[:, gate_head * D:(gate_head + 1) * D] *= g
            z = m(pixel_values=px).logits
        return torch.nn.functional.cross_entropy(z, torch.as_tensor(lab), reduction="none").numpy()  # per sample

    fd = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            fd[layer, head] = np.abs((losses(layer, head, 1 + eps) - losses(layer, head, 1 - eps)) / (2 * eps)).mean()
    np.testing.assert_allclose(raw, fd, rtol=1e-4, atol=1e-6)
    assert fd.min() > 0
    normed = A.l2_normalize_per_layer(raw)
    np.testing.assert_allclose(normed, fd / np.linalg.norm(fd, axis=1, keepdims=True), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0)
    assert attnviz_hooks(vit64) == [] and all(p.requires_grad for p in vit64.parameters())


def test_pruning_curves_start_unablated_and_end_all_ablated(vit, images, labels, result):
    res = result
    c = res.curves
    acc0, _, _ = outcome(vit, images, labels)
    acc_all, _, _ = outcome(zero_weights(vit, [(l, h) for l in range(L) for h in range(H)]), images, labels)
    assert acc0 != acc_all
    np.testing.assert_array_equal(c.pruning_fractions, [0, 1 / 3, 2 / 3, 1])
    assert c.pruning_metrics == ("accuracy_drop", "loss_increase", "kl_divergence", "gradient_importance")
    curves = np.concatenate([c.pruning_accuracy, c.random_accuracy])
    np.testing.assert_allclose(curves[:, 0], acc0)
    np.testing.assert_allclose(curves[:, -1], acc_all)
    # a middle step: the first 2 of the 6 heads in the gradient order, ablated by hand
    order = c.pruning_order[3]
    np.testing.assert_array_equal(order, A.pruning_order(res.metrics["gradient_importance"]))
    first = [divmod(int(i), H) for i in order[:2]]
    assert c.curve("gradient_importance")[1] == pytest.approx(outcome(zero_weights(vit, first), images, labels)[0])
    auc = A.curve_auc(c.pruning_fractions, c.curve("gradient_importance"))
    assert c.auc["gradient_importance"] == pytest.approx(auc)


def test_partial_pruning_keep_one_reproduces_the_output_exactly(vit, sites, images):
    with torch.no_grad():
        base = vit(pixel_values=images).logits
        for layer in range(L):
            for head in range(H):
                keep = torch.ones(L, H)
                keep[layer, head] = 1.0  # explicitly "this head at p = 1.0"
                with partial_attention(vit, sites, keep):
                    assert torch.equal(vit(pixel_values=images).logits, base)


def test_partial_pruning_curve(vit, sites, data, images, labels, result):
    res = result
    c = res.curves
    np.testing.assert_allclose(c.partial_fractions, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert c.partial_accuracy.shape == (L, H, 10)
    np.testing.assert_allclose(c.partial_accuracy[..., 0], c.base_accuracy)
    np.testing.assert_allclose(c.partial_kl[..., 0], 0.0)
    # one entry against a separate evaluation of that keep setting
    keep = np.ones((1, L, H), np.float32)
    keep[0, 1, 0] = 0.2
    one = evaluate_partial(vit, sites, data, keep)
    assert c.partial_accuracy[1, 0, 8] == pytest.approx(one.accuracy[0])
    assert c.partial_kl[1, 0, 8] == pytest.approx(one.kl[0], rel=1e-5)
    # and by hand: one plain forward over all images with that head pruned
    with partial_attention(vit, sites, torch.as_tensor(keep[0])):
        acc, loss, _ = outcome(vit, images, labels)
    assert one.accuracy[0] == pytest.approx(acc) and one.loss[0] == pytest.approx(loss, rel=1e-5)
    assert c.partial_kl[..., -1].max() > 0  # keeping 10% of the keys changes the output


def test_batched_ablation_equals_the_per_head_loop(vit, sites, data):
    rng = np.random.default_rng(0)
    masks = np.concatenate([single_head_masks((L, H)), rng.random((5, L, H)) < 0.5])
    masks[3] = False  # an ablation of nothing: the unablated model
    loop = evaluate_ablations_loop(vit, sites, data, masks)
    replicating = dataclasses.replace(sites, layer_modules=())  # copy the inputs, not the hidden states
    for s, max_rows in ((sites, 4), (sites, 12), (sites, 1000), (replicating, 12)):  # 1, 3 (uneven), all
        batched = evaluate_ablations(vit, s, data, masks, max_rows=max_rows)
        np.testing.assert_allclose(batched.accuracy, loop.accuracy)
        np.testing.assert_allclose(batched.loss, loop.loss, rtol=1e-5)
        np.testing.assert_allclose(batched.kl, loop.kl, rtol=1e-4, atol=1e-8)
    mean = mean_head_outputs(vit, sites, data)
    np.testing.assert_allclose(evaluate_ablations(vit, sites, data, masks, replacement=mean).loss,
                               evaluate_ablations_loop(vit, sites, data, masks, replacement=mean).loss, rtol=1e-5)


def test_without_labels_predictions_are_the_targets(vit, sites, images):
    data = prepare_eval_data(vit, batches(images), None)
    assert data.target_source == "prediction" and data.base_accuracy == 1.0
    partly = prepare_eval_data(vit, batches(images), [np.array([1, -1, 2, 0]), np.zeros(4), np.zeros(2)])
    assert partly.target_source == "prediction"
    res = compute_importance(vit, sites, data, ImportanceOptions(progress=False, random_seeds=1, prune_steps=2))
    assert res.curves.target_source == "prediction" and res.params["target_source"] == "prediction"
    assert (res.metrics["accuracy_drop"] >= 0).all()  # nothing beats agreeing with itself


# -- the command end to end ------------------------------------------------------------------------


def cli(capsys, *args) -> tuple[int, str, str]:
    from attnviz.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.helpers import save_tiny_model, write_images

    root = tmp_path_factory.mktemp("imp")
    save_tiny_model(root / "vit", "vit", image_size=16, patch=8, layers=2, heads=2, hidden=16)
    write_images(root / "imgs", ["circle/a.png", "circle/b.png", "square/c.png", "triangle/d.png", "square/e.png"])
    write_images(root / "unlabelled", ["a.png", "b.png", "c.png"], seed=1)
    return root


def test_cli_extract_with_importance_then_importance_command(env, tmp_path, capsys):
    out = tmp_path / "run.h5"
    code, stdout, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out,
                            "--attributions", "none", "--batch-size", "2", "--no-progress", "--importance")
    assert code == 0, err
    assert f"{out}: head importance of 5 input(s), targets = labels, zero ablation" in stdout
    with attnviz_open(out) as rec:
        names = set(rec.head_metrics())
        assert {"accuracy_drop", "loss_increase", "kl_divergence", "gradient_importance", "entropy",
                "confidence"} <= names
        info = rec.head_metric_info("gradient_importance")
        assert "Michel" in info.citation and "dL" in info.definition and info.params["target_source"] == "label"
        assert rec.head_metric("accuracy_drop").shape == (2, 2)
        c = A.read_importance(rec)
        assert c.target_source == "label" and c.n_samples == 5 and c.ablation == "zero"
        assert c.pruning_metrics == ("accuracy_drop", "loss_increase", "kl_divergence", "gradient_importance",
                                     "entropy", "confidence")
        assert c.random_accuracy.shape == (5, 11) and c.partial_accuracy.shape == (2, 2, 10)
        assert c.base_accuracy == pytest.approx(rec.accuracy)
        # the entropy curve prunes the highest-entropy heads first (low entropy = important)
        np.testing.assert_array_equal(c.pruning_order[4], A.pruning_order(rec.head_metric("entropy"), False))

    # same parameters: cached
    args = ["importance", "--model", env / "vit", "--input", env / "imgs", "--into", out, "--batch-size", "2",
            "--no-progress"]
    code, stdout, err = cli(capsys, *args)
    assert code == 0 and "up to date" in stdout, err
    # mean ablation: recomputed, stored with its parameters
    code, stdout, err = cli(capsys, *args, "--ablation", "mean", "--seeds", "2")
    assert code == 0 and "mean ablation" in stdout and "base accuracy" in stdout, err
    with attnviz_open(out) as rec:
        assert A.read_importance(rec).ablation == "mean"
        assert rec.head_metric_info("accuracy_drop").params["ablation"] == "mean"


def test_cli_without_labels_uses_predictions(env, tmp_path, capsys):
    out = tmp_path / "u.h5"
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "unlabelled", "--out", out,
                       "--attributions", "none", "--no-progress")
    assert code == 0, err
    code, stdout, err = cli(capsys, "importance", "--model", env / "vit", "--input", env / "unlabelled", "--into", out,
                            "--no-progress", "--seeds", "1")
    assert code == 0, err
    assert "targets = predictions" in stdout and "predictions serve as targets" in err
    with attnviz_open(out) as rec:
        c = A.read_importance(rec)
        assert c.target_source == "prediction" and c.base_accuracy == 1.0
        assert rec.head_metric_info("kl_divergence").params["target_source"] == "prediction"


def test_cli_bad_input(env, tmp_path, capsys):
    code, _, err = cli(capsys, "importance", "--model", env / "vit", "--input", env / "imgs", "--into",
                       tmp_path / "none.h5")
    assert code == 2 and err.startswith("error: ") and "no such recording" in err and "Traceback" not in err
    other = tmp_path / "other.h5"
    from tests.helpers import make_recording

    make_recording(other, n_layers=3, n_heads=2)
    code, _, err = cli(capsys, "importance", "--model", env / "vit", "--input", env / "imgs", "--into", other,
                       "--no-progress")
    assert code == 2 and "3x2 heads" in err
    code, _, err = cli(capsys, "importance", "--model", env / "vit", "--input", env / "imgs", "--into", other,
                       "--ablation", "median")
    assert code == 2 and "unknown ablation 'median'" in err


def test_output_projection_not_found_names_the_pattern(env, tmp_path):
    """A model whose architecture row points at a module that is not there: ModelError naming the pattern."""
    import dataclasses

    from attnviz.errors import ModelError
    from extractor.adapters import load_model
    from extractor.importance import run_importance

    adapter = load_model(env / "vit", device="cpu")
    stack = dataclasses.replace(adapter.arch.stacks[0], output_projection="attention.out_proj")
    adapter.arch = dataclasses.replace(adapter.arch, stacks=(stack,))
    with pytest.raises(ModelError, match=re.escape(r'matches the pattern "^vit\.layers\.(\d+)\.attention\.out_proj$"')):
        run_importance(adapter, str(env / "imgs"), tmp_path / "unused.h5")


def attnviz_open(path):
    import attnviz

    return attnviz.open(path)
