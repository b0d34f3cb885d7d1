"""``attnviz extract`` / ``analyze`` / ``report`` on a tiny LLaVA, and every bad input of the issue: one
``error:`` line, exit code 2, no traceback, nothing on disk overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import attnviz
from tests.helpers import save_tiny_llava, save_tiny_model, write_images
from tests.test_cli_extract import cli  # the in-process `attnviz` runner: (exit code, stdout, stderr)


@pytest.fixture(scope="module")
def env(lvlm_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli-lvlm")
    data = lvlm_run["manifest"].parent
    models = {
        "llava": lvlm_run["model"],
        "no_template": save_tiny_llava(root / "no-template", chat_template=False),
        "mismatch": save_tiny_llava(root / "mismatch", num_additional_image_tokens=0),
        "short": save_tiny_llava(root / "short", max_positions=28),
        "vit": save_tiny_model(root / "vit", "vit"),
    }

    def manifest(name: str, rows: list[dict]) -> Path:
        path = data / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    manifests = {
        "ok": lvlm_run["manifest"],
        "missing": manifest("missing.jsonl", [{"image": "a.png", "prompt": "what is it?"},
                                              {"image": "gone.png", "prompt": "what is it?"}]),
        "two_images": manifest("two.jsonl", [{"image": "a.png", "prompt": "<image> <image> what colour is it?"}]),
        "placeholder": manifest("placeholder.jsonl", [{"image": "a.png", "prompt": "user: <image> what is it? assistant:"}]),
        "long": manifest("long.jsonl", [{"image": "a.png", "prompt": "what colour is it? " * 3}]),
        "no_prompt": manifest("noprompt.jsonl", [{"image": "a.png", "answer": "red"}]),
    }
    write_images(root / "imgs", ["x.png"])
    return {"root": root, "models": models, "manifests": manifests, "imgs": root / "imgs"}


def test_extract_analyze_info_report_end_to_end(env, tmp_path, capsys) -> None:
    out = tmp_path / "vqa.h5"
    code, text, err = cli(capsys, "extract", "--model", env["models"]["llava"], "--input", env["manifests"]["ok"],
                          "--out", out, "--family", "lvlm", "--max-new-tokens", "2", "--answer-rows-only",
                          "--sink-tau", "3", "--reinforce", "2", "--vhd-top-k", "1", "--no-progress")
    assert code == 0, err
    assert "5 questions" in text and "wrote" in text
    with attnviz.open(out) as rec:
        p = rec.extraction_params
        assert p["family_options"] == {"max_new_tokens": 2, "answer_rows_only": True, "sink_tau": 3.0,
                                       "reinforce": 2.0, "vhd_top_k": 1}
        assert rec.layout("self").query_axis == "answer_steps" and rec.stack_shape("self") == (2, 4)
        assert all(len(rec.meta(s)["generated_ids"]) <= 2 for s in range(rec.n_samples))
        assert "reinforced" in rec.meta(0) and "image_attention_ratio" in rec.head_metrics()
    code, text, err = cli(capsys, "analyze", out, "--no-spatial", "--sink-tau", "2.5", "--centric-rho", "0.4")
    assert code == 0, err
    assert "vision-language heads (5 questions" in text and "tau 2.5" in text and "rho 0.4" in text
    code, text, err = cli(capsys, "info", out)
    assert code == 0 and "lvlm" in text
    code, text, err = cli(capsys, "report", out, "--out", tmp_path / "report", "--views", "vlm_heads,vlm_answer",
                          "--samples", "0")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert "index.html" in names and any(n.startswith("vlm_heads") for n in names)
    assert any(n.startswith("vlm_answer") for n in names)


BAD = [
    # (model, manifest, extra args, what the one error line says)
    ("mismatch", "ok", [], "the processor expands the image placeholder into 15 image tokens, the vision tower gives 16"),
    ("llava", "two_images", [], "2 <image> placeholder"),
    ("no_template", "ok", [], "has no chat template to add one"),
    ("llava", "missing", [], "line 2: image gone.png not found"),
    ("short", "long", [], "exceeds the language model's 28 positions"),
    ("llava", "no_prompt", [], "line 1: no 'prompt'"),
    ("llava", "ok", ["--image-size", "64"], "--image-size does not apply to a lvlm model"),
    ("llava", "ok", ["--store-qk", "0.5"], "--store-qk does not apply to a lvlm model"),
    ("llava", "ok", ["--attributions", "saliency"], "do not apply to image+prompt inputs"),
    ("llava", "ok", ["--importance"], "--importance (head importance by pruning) is measured for image models; a lvlm"),
    ("llava", "ok", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("llava", "ok", ["--reinforce", "2", "--no-vhd"], "--reinforce chooses heads by their VHD"),
    ("vit", "imgs", ["--max-new-tokens", "4"], "max_new_tokens do not apply to a vit model"),
    ("vit", "imgs", ["--family", "lvlm"], "not a lvlm model"),
    ("llava", "imgs", [], "takes a manifest of questions"),
]


@pytest.mark.parametrize("model,manifest,extra,says", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_is_one_error_line_and_nothing_is_overwritten(env, tmp_path, capsys, model, manifest, extra,
                                                                says) -> None:
    out = tmp_path / "kept.h5"
    out.write_bytes(b"an earlier recording")
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    source = env["imgs"] if manifest == "imgs" else env["manifests"][manifest]
    code, text, err = cli(capsys, "extract", "--model", env["models"][model], "--input", source, "--out", out,
                          "--overwrite", "--no-progress", *extra)
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert code == 2, (text, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert "Traceback" not in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert not Path(str(out) + ".partial").exists()


def test_a_prompt_with_its_own_placeholder_is_used_as_written(env, tmp_path, capsys) -> None:
    out = tmp_path / "own.h5"
    code, _, err = cli(capsys, "extract", "--model", env["models"]["no_template"], "--input",
                       env["manifests"]["placeholder"], "--out", out, "--max-new-tokens", "1", "--no-progress")
    assert code == 0, err
    with attnviz.open(out) as rec:
        assert rec.meta(0)["text"] == "user: <image> what is it? assistant:"
        assert rec.meta(0)["image_span"] == [2, 18]
