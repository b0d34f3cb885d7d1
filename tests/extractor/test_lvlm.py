"""The lvlm adapter on a tiny random LLaVA saved with save_pretrained: recorded attention against the model's
own for the same tokens, the image span, VHD against two hand-run forwards, sinks (planted and absent),
image + text attention ratio = 1, answer-rows-only, reinforcement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import attnviz
from attnviz.analysis.lvlm import attention_ratios, generation_rows, image_span, sample_view
from extractor.adapters.lvlm import (
    head_divergence,
    massive_dimensions,
    reinforcement_gates,
    rms_normalized,
    sink_phi,
    token_vhd,
)
from tests.helpers import LVLM_QUESTIONS as QUESTIONS

N_NEW = 3


@pytest.fixture(scope="module")
def run(lvlm_run) -> dict:
    return lvlm_run


def _independent_inputs(model_dir: Path, image: Path, prompt: str, generated: list[int]):
    """The model's input for one question, made here without the adapter: the demo template written out,
    the processor's own expansion of <image>, the recorded answer appended."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir, backend="pil")
    enc = proc(text=[f"user: <image> {prompt} assistant:"], images=[Image.open(image).convert("RGB")],
               return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([generated])], 1)
    return ids, enc["pixel_values"], enc["input_ids"].shape[1]


def _model(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()


def test_recorded_attention_equals_the_models_own_and_the_image_span_is_right(run) -> None:
    model = _model(run["model"])
    data = run["manifest"].parent
    with attnviz.open(run["full"]) as rec, attnviz.open(run["rows"]) as rows_rec:
        assert rec.family == "lvlm" and rec.kinds() == ("self", "vision")
        assert rec.stack_shape("self") == (2, 4) and rec.stack_shape("vision") == (2, 4)
        vis = rec.layout("vision")
        assert vis.grid == (4, 4) and vis.prefix_names == ("cls",) and vis.n_tokens == 17
        for s, q in enumerate(QUESTIONS):
            meta = rec.meta(s)
            ids, px, n_prompt = _independent_inputs(run["model"], data / q["image"], q["prompt"], meta["generated_ids"])
            with torch.no_grad():
                out = model(input_ids=ids, pixel_values=px, output_attentions=True, use_cache=False)
            where = np.flatnonzero(ids[0].numpy() == 3)
            span = (int(where[0]), int(where[-1]) + 1)
            assert span == (2, 18) and len(where) == 16
            assert image_span(rec, s) == span and tuple(meta["image_span"]) == span
            assert rec.layout("self").image_span == span
            assert meta["answer_span"] == [n_prompt, ids.shape[1]]
            assert rec.lengths(s, "self") == (ids.shape[1], ids.shape[1])
            for layer in range(2):
                mine = out.attentions[layer][0].numpy()  # [head, seq, seq]
                for head in range(4):
                    np.testing.assert_allclose(rec.attention(s, layer, head, "self"), mine[head], atol=2e-3)
                # answer rows only: the generation steps' rows of the same maps
                steps = np.arange(n_prompt - 1, ids.shape[1] - 1)
                assert rows_rec.lengths(s, "self") == (len(steps), ids.shape[1])
                np.testing.assert_allclose(rows_rec.attention_heads(s, layer, "self"), mine[:, steps], atol=2e-3)
                np.testing.assert_allclose(rec.attention_heads(s, layer, "vision"),
                                           out.image_outputs.attentions[layer][0].numpy(), atol=2e-3)
            # the teacher-forced pass reproduces the greedy answer (the rows it records generate it)
            assert out.logits[0, n_prompt - 1:-1].argmax(-1).tolist() == meta["generated_ids"]
        assert rows_rec.layout("self").query_axis == "answer_steps"
        assert [generation_rows(rows_rec, s).tolist() for s in range(2)] == [
            list(range(len(rows_rec.meta(s)["generated_ids"]))) for s in range(2)]


def test_vhd_equals_a_manual_computation_with_two_forwards(run) -> None:
    model = _model(run["model"])
    data = run["manifest"].parent
    s, layer, head = 1, 1, 2
    with attnviz.open(run["full"]) as rec:
        meta = rec.meta(s)
        stored = rec.per_sample("vhd", s)
        t_vhd = rec.per_sample("t_vhd", s)
    ids, px, n_prompt = _independent_inputs(run["model"], data / QUESTIONS[s]["image"], QUESTIONS[s]["prompt"],
                                            meta["generated_ids"])
    seen = {}
    o_proj = model.model.language_model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__(len(seen), args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px, use_cache=False)
            text_only = ids[:, torch.as_tensor(ids[0] != 3)]
            model(input_ids=text_only, use_cache=False)
    finally:
        handle.remove()
    d = 32 // 4
    with_img, without = seen[0][0, :, head * d:(head + 1) * d], seen[1][0, :, head * d:(head + 1) * d]
    for j in range(len(meta["generated_ids"])):
        t = n_prompt - 1 + j
        manual = float(torch.linalg.norm(with_img[t] - without[t - 16]))
        assert stored[layer, head, j] == pytest.approx(manual, rel=1e-4, abs=1e-5)
    assert stored[layer, head, 0] > 0
    # T-VHD: the two largest of each layer, summed
    g = len(meta["generated_ids"])
    manual_t = np.sort(stored[:, :, :g], axis=1)[:, -2:].sum((0, 1))
    np.testing.assert_allclose(t_vhd[:g], manual_t, rtol=1e-5)
    assert meta["t_vhd"] == pytest.approx(manual_t.tolist(), rel=1e-4)


def test_vhd_and_tvhd_functions_on_hand_built_numbers() -> None:
    a = torch.zeros(2, 3, 4)
    b = torch.zeros(2, 3, 4)
    b[0, 1] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    np.testing.assert_allclose(head_divergence(a, b).numpy(), [[0, 5, 0], [0, 0, 0]])
    vhd = np.array([[[1.0], [5.0], [3.0]], [[2.0], [0.0], [7.0]]])  # [layer 2, head 3, token 1]
    assert token_vhd(vhd, 1).tolist() == [12.0] and token_vhd(vhd, 2).tolist() == [17.0]
    gates = reinforcement_gates(np.array([[1.0, 5.0, 3.0], [2.0, 0.0, 7.0]]), 2.0)
    assert gates.tolist() == [[1, 2, 1], [1, 1, 2]]  # above the median only: 5 > 3, 7 > 2


def test_sink_detection_finds_a_planted_massive_activation_and_nothing_without() -> None:
    rng = np.random.default_rng(0)
    hidden = torch.from_numpy(rng.standard_normal((3, 60, 1024)).astype(np.float32))  # [layer, token, dim]
    tau = 20.0

    def found(h: torch.Tensor) -> list[int]:
        big = (rms_normalized(h).abs() > tau).sum(1).numpy()  # [layer, dim]
        return massive_dimensions(big, np.full(3, h.shape[1]))

    assert found(hidden) == []
    assert (sink_phi(hidden, []) == 0).all()
    planted = hidden.clone()
    planted[1:, 7, 300] = 800.0  # token 7 in layers 1-2, one dimension: |x_d / rms(x)| ~ 30 > 20
    dims = found(planted)
    assert dims == [300]
    phi = sink_phi(planted, dims)
    assert (phi[1:, 7] > tau).all() and (phi[0] < tau).all() and (np.delete(phi[1:].numpy(), 7, 1) < 5).all()
    # a dimension large for every token is an offset, not a massive activation
    offset = hidden.clone()
    offset[:, :, 11] = 800.0
    assert found(offset) == []


def test_sinks_end_to_end_with_a_planted_activation(run) -> None:
    """The adapter finds a massive activation planted into one image token of the language model, and none
    on the same model without it; the stored phi equals phi of the model's own hidden states."""
    from extractor.inputs import InputSet  # noqa: F401  (the collector's type)
    from extractor.vqa_inputs import collect_vqa

    adapter = run["adapter"]
    items = collect_vqa(run["manifest"]).items
    tau = 4.0  # hidden size 32: phi <= sqrt(32) = 5.7
    adapter.options = type(adapter.options)(**{**adapter.options.__dict__, "sink_tau": tau, "reinforce": None})
    adapter.plan(items)
    clean_dims = adapter.extra_params()["sink_dims"]
    layer0 = adapter.model.model.language_model.layers[0]

    def plant(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.shape[1] > 5:  # not the one-token steps of cached generation
            out[:, 5, 9] = 500.0  # image token 3 (position 5) gets a massive dimension 9 from layer 1 on
        return output

    handle = layer0.register_forward_hook(plant)
    try:
        adapter.plan(items)
        facts = adapter.extra_params()
        with torch.no_grad():
            out = adapter.run(adapter.prepare(items[:2]))
    finally:
        handle.remove()
    assert 9 in facts["sink_dims"] and 9 not in clean_dims
    phi = out.per_sample["sink_phi"]  # [b, layer, tokens]
    assert (phi[:, 1, 5] > tau).all() and (phi[:, 0, 5] < tau).all()
    assert phi[:, 1].argmax(-1).tolist() == [5, 5]
    # the clean model: nothing over tau at all
    adapter.plan(items)
    with torch.no_grad():
        clean = adapter.run(adapter.prepare(items[:2]))
    assert clean_dims == adapter.extra_params()["sink_dims"]
    assert not (clean.per_sample["sink_phi"][:, :, 2:18] > tau).any()


def test_stored_phi_is_phi_of_the_models_hidden_states(run) -> None:
    model = _model(run["model"])
    data = run["manifest"].parent
    with attnviz.open(run["full"]) as rec:
        dims = rec.extraction_params["family"]["sink_dims"]
        s = 0
        meta = rec.meta(s)
        stored = rec.per_sample("sink_phi", s)
    ids, px, _ = _independent_inputs(run["model"], data / QUESTIONS[s]["image"], QUESTIONS[s]["prompt"],
                                     meta["generated_ids"])
    with torch.no_grad():
        hs = model(input_ids=ids, pixel_values=px, output_hidden_states=True, use_cache=False).hidden_states
    for layer in range(2):
        x = hs[layer][0].numpy().astype(np.float64)
        normed = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
        manual = np.abs(normed[:, dims]).max(-1) if dims else np.zeros(len(x))
        np.testing.assert_allclose(stored[layer, : len(x)], manual, rtol=2e-3, atol=2e-3)


def test_image_and_text_attention_ratios_add_up_to_one_for_every_head_and_token(run) -> None:
    for path in (run["full"], run["rows"]):
        with attnviz.open(path) as rec:
            for s in range(rec.n_samples):
                v = sample_view(rec, s)
                assert v.image_ratio.shape == (2, 4, len(rec.meta(s)["generated_ids"]))
                np.testing.assert_allclose(v.image_ratio + v.text_ratio, 1.0, atol=3e-3)
                assert (v.image_ratio > 0).all() and (v.text_ratio > 0).all()
    # by hand: a row of 6 keys with the image at [1, 4)
    row = np.array([[0.1, 0.2, 0.3, 0.1, 0.25, 0.05]])
    image, text = attention_ratios(row, (1, 4))
    assert image.tolist() == pytest.approx([0.6]) and text.tolist() == pytest.approx([0.4])


def test_meta_answers_predictions_and_reinforcement(run) -> None:
    with attnviz.open(run["full"]) as rec:
        assert rec.class_names() == ["blue", "circle", "left", "red"]
        assert rec.labels().tolist() == [3, 2, 1, -1, 0]
        for s in range(rec.n_samples):
            m = rec.meta(s)
            assert m["prompt"] == QUESTIONS[s]["prompt"] and m["text"].startswith("user: <image>")
            assert len(m["generated_ids"]) <= N_NEW and 3 not in m["generated_ids"]  # never an image token
            assert m["tokens"][2:18] == ["<image>"] * 16
            r = m["reinforced"]
            assert r["alpha"] == 3.0 and len(r["heads"]) > 0
            vhd0 = rec.per_sample("vhd", s)[:, :, 0]
            chosen = {tuple(h) for h in r["heads"]}
            assert chosen == {(l, h) for l in range(2) for h in range(4) if vhd0[l, h] > np.median(vhd0[l])}
            assert r["changed"] == (r["generated"] != m["generated"])
        names = set(rec.head_metrics())
        assert {"image_attention_ratio", "vhd", "visual_non_sink_ratio", "image_centric", "entropy"} <= names
        # the head metric is the mean over questions and generation steps
        views = [sample_view(rec, s) for s in range(rec.n_samples)]
        ratio = np.concatenate([v.image_ratio for v in views], -1).mean(-1)
        np.testing.assert_allclose(rec.head_metric("image_attention_ratio"), ratio, rtol=1e-5)
        vhd = np.concatenate([v.vhd for v in views], -1).mean(-1)
        np.testing.assert_allclose(rec.head_metric("vhd"), vhd, rtol=1e-5)
        assert rec.has_masks and rec.thumbnail(0).shape == (32, 32, 3)


def test_hooks_are_removed(run) -> None:
    from extractor.hooks import attnviz_hooks

    assert attnviz_hooks(run["adapter"].model) == []


def test_the_table_row_finds_one_module_per_layer_in_both_stacks(run) -> None:
    adapter = run["adapter"]
    assert adapter.arch.model_class == "LlavaForConditionalGeneration" and adapter.arch.family == "lvlm"
    for kind in ("self", "vision"):
        for what in ("attention", "query", "key", "value", "output_projection"):
            assert [layer for layer, _, _ in adapter.modules(what, kind)] == [0, 1], (kind, what)
    assert adapter.modules("output_projection", "self")[0][1] == "model.language_model.layers.0.self_attn.o_proj"
    assert adapter.modules("output_projection", "vision")[1][1] == "model.vision_tower.encoder.layers.1.self_attn.out_proj"
    assert adapter.model.config.text_config._attn_implementation == "eager"
    assert adapter.model.config.vision_config._attn_implementation == "eager"
