"""``attnviz extract --family s2t`` and ``attnviz analyze`` end to end on a tiny Whisper saved with save_pretrained,
and the speech family's bad inputs: one ``error:`` line, exit code 2, no traceback, nothing on disk lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import attnviz
from tests.helpers_s2t import save_tiny_whisper, tone, write_clip, write_word_clips
from tests.test_cli_extract import cli


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_s2t")
    save_tiny_whisper(root / "whisper", "plain", text_only=True)
    write_word_clips(root / "data", 2)
    write_clip(root / "long" / "a.wav", tone(1.6))
    (root / "data" / "manifest_bad.jsonl").write_text(
        json.dumps({"audio": "clips/00.wav", "words": [{"word": "one", "start": 0.1, "end": 2.5}]}) + "\n")
    return root


def test_extract_and_analyze_a_speech_model(env, tmp_path, capsys):
    out = tmp_path / "asr.h5"
    code, stdout, err = cli(capsys, "extract", "--model", env / "whisper", "--input", env / "data" / "manifest.jsonl",
                            "--out", out, "--family", "s2t", "--attributions", "perturbation,gradient", "--n-masks", "8",
                            "--deletion-steps", "2", "--max-new-tokens", "3", "--beam", "1", "--alignment-heads", "1:1",
                            "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err and f"wrote {out}: 2 clips" in stdout
    assert "s/clip)" in stdout or "clip/s)" in stdout
    with attnviz.open(out) as rec:
        assert rec.family == "s2t" and rec.attribution_methods() == ["gradient", "perturbation"]
        fam = rec.extraction_params["family"]
        assert fam["alignment_heads"] == [[1, 1]] and fam["deletion"]["fractions"] == [0.0, 0.5, 1.0]
        assert rec.extraction_params["family_options"]["n_masks"] == 8
    code, stdout, err = cli(capsys, "analyze", out)
    assert code == 0, err
    assert "word error rate" in stdout and "cross-attention vs perturbation saliency" in stdout
    assert "word timestamps by DTW over L1H1 (extraction --alignment-heads" in stdout
    code, stdout, err = cli(capsys, "analyze", out, "--alignment-heads", "0:0")
    assert code == 0 and "over L0H0 (--alignment-heads" in stdout
    code, stdout, _ = cli(capsys, "info", out)
    assert "a generative model" in stdout and "attributions  gradient, perturbation" in stdout


@pytest.mark.parametrize("args,message", [
    (["--input", "{data}/manifest_bad.jsonl"], "ends at 2.5 s but the clip is"),
    (["--input", "{long}"], "none of the 1 clip(s)"),
    (["--image-size", "32"], "--image-size does not apply to a speech model"),
    (["--store-qk", "0.5"], "--store-qk does not apply to a s2t model"),
    (["--n-masks", "0"], "--n-masks must be at least 1"),
    (["--stacks", "cross,vision"], "unknown attention kind(s) vision"),
    (["--attributions", "occlusion"], "do not apply to audio inputs"),
    (["--gradient-method", "gradcam"], "--gradient-method must be one of"),
    (["--importance"], "--importance (head importance by pruning) is measured for image models"),
    (["--family", "vit"], "not a vit model"),
])
def test_bad_speech_inputs_are_one_line_and_overwrite_nothing(env, tmp_path, capsys, args, message):
    out = tmp_path / "asr.h5"
    out.write_bytes(b"an earlier recording")
    args = [a.format(data=env / "data", long=env / "long") for a in args]
    base = ["extract", "--model", env / "whisper", "--out", out, "--overwrite", "--no-progress"]
    if "--input" not in args:
        base += ["--input", env / "data" / "manifest.jsonl"]
    code, stdout, err = cli(capsys, *base, *args)
    assert code == 2, (stdout, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: skipped")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert out.read_bytes() == b"an earlier recording" and not (tmp_path / "asr.h5.partial").exists()
