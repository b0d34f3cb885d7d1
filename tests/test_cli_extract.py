"""``attnviz extract`` end to end on tiny models saved with save_pretrained, every bad input of the
issue (one ``error:`` line, exit code 2, nothing overwritten), and a real Ctrl-C + ``--resume``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import attnviz
from attnviz.cli import main
from tests.helpers import save_tiny_model, write_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "vit", "vit")
    save_tiny_model(root / "deit", "deit", seed=1)
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               vocab_size=50)).save_pretrained(root / "bert")
    write_images(root / "imgs", ["circle/a.png", "circle/b.png", "square/c.png", "triangle/d.png", "e.png"])
    (root / "imgs" / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty").mkdir()
    write_images(root / "man", ["a.png"])
    (root / "man" / "missing.jsonl").write_text('{"image": "a.png"}\n{"image": "gone.png"}\n')
    (root / "man" / "badlabel.jsonl").write_text('{"image": "a.png", "label": "hexagon"}\n')
    (root / "allbad").mkdir()
    (root / "allbad" / "x.png").write_bytes(b"nope")
    (root / "notmodel").mkdir()
    (root / "notmodel" / "readme.txt").write_text("hello")
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_end_to_end_and_info(env, tmp_path, capsys):
    out = tmp_path / "run.h5"
    code, stdout, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out,
                            "--batch-size", "2", "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err and "torchvision" not in err
    assert f"wrote {out}: 5 images, accuracy" in stdout and "1 input(s) skipped" in stdout
    assert "warning: skipped square/broken.jpg" in err
    with attnviz.open(out) as rec:
        assert rec.complete and rec.family == "vit" and rec.n_samples == 5
        assert (rec.n_layers, rec.n_heads) == (2, 4)
        assert rec.layout().prefix_names == ("cls",) and rec.layout().grid == (4, 4)
        assert rec.skipped()[0][0] == "square/broken.jpg"
        assert rec.attribution_methods() == ["rollout", "saliency"]  # the fast default
        assert rec.thumbnail(0).shape == (32, 32, 3)
        assert rec.model_name == "vit" and rec.model_class == "ViTForImageClassification"
        accuracy = rec.accuracy
    code, stdout, _ = cli(capsys, "info", out)
    assert code == 0 and f"accuracy   {accuracy:.1%}" in stdout


def test_store_rows_and_analyze_through_the_cli(env, tmp_path, capsys):
    out = tmp_path / "rows.h5"
    code, stdout, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out,
                            "--store", "rows", "--store-rows", "3", "--attributions", "rollout", "--no-progress")
    assert code == 0, err
    with attnviz.open(out) as rec:
        assert rec.store == "rows" and [len(rec.row_positions(s)) for s in range(5)] == [4] * 5
        assert "maps" not in rec.h5["attention/self"]
    code, stdout, err = cli(capsys, "analyze", out)
    assert code == 0 and "Traceback" not in err, err
    assert "head statistics entropy, confidence, cls_attention from 5 sample(s) (from the per-sample statistics " \
           "kept by --store rows)" in stdout
    assert "spatial profiles skipped: this recording stores only query rows (--store rows)" in stdout
    code, stdout, _ = cli(capsys, "info", out)
    assert code == 0


def test_dry_run_writes_nothing_and_estimates_the_size(env, tmp_path, capsys):
    out = tmp_path / "run.h5"
    code, stdout, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out,
                            "--compression", "none", "--dry-run", "--no-progress")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the partial file or its reserve
    assert "dry run: 5 input(s) in 1 batch(es) of 8, --store full; nothing written" in stdout
    assert "estimated time:" in stdout and "measured for the first batch" in stdout
    import re

    kb = float(re.search(r"estimated file size: ([\d.]+) KB uncompressed", stdout).group(1))
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out,
                       "--compression", "none", "--no-progress")
    assert code == 0, err
    real = out.stat().st_size / 1024
    assert abs(kb - real) <= 0.2 * real, (kb, real)
    # the other modes are estimated smaller; bad input still errors the usual way
    code, stdout, _ = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", tmp_path / "s.h5",
                          "--store", "summary", "--dry-run", "--compression", "lzf")
    assert code == 0 and float(re.search(r"size: ([\d.]+) KB", stdout).group(1)) < kb and "with lzf" in stdout
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out, "--dry-run")
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err


@pytest.mark.parametrize("args, message", [
    (("--store", "maps"), "error: --store must be one of full, rows, summary, got 'maps'"),
    (("--store", "rows", "--store-rows", "0"), "error: --store-rows must be at least 1 query patch per image, got 0"),
])
def test_bad_store_options_are_one_line(env, tmp_path, capsys, args, message):
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", tmp_path / "x.h5",
                       *args)
    assert code == 2 and err.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_deit_distillation_token_through_the_cli(env, tmp_path, capsys):
    out = tmp_path / "deit.h5"
    code, _, err = cli(capsys, "extract", "--model", env / "deit", "--input", env / "imgs" / "circle", "--out", out,
                       "--attributions", "rollout", "--no-progress", "--family", "vit")
    assert code == 0, err
    with attnviz.open(out) as rec:
        lay = rec.layout()
        assert lay.prefix_names == ("cls", "distillation") and lay.n_tokens == 18
        assert rec.attention(0, 1, 2).shape == (18, 18)
        # images directly in the input folder: no class folder, no label
        assert rec.labels().tolist() == [-1, -1] and rec.target_source == "prediction"


def _sys_unwritable() -> Path:
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(name)
    pytest.skip("/sys is writable here")


BAD = {
    "missing model path": (["--model", "{root}/no-such-model"], "model directory {root}/no-such-model does not exist"),
    "not a model": (["--model", "{root}/notmodel"], "not a model directory (no config.json)"),
    "unsupported architecture": (["--model", "{root}/bert"], "BertForMaskedLM is not supported by any adapter; "
                                 "supported: ViTForImageClassification, ViTModel, DeiTForImageClassification"),
    "hub id not cached": (["--model", "nobody-xyz/not-cached-vit"],
                          "not a model in the local Hugging Face cache (attnviz never downloads"),
    "empty folder": (["--input", "{root}/empty"], "holds no images"),
    "every image corrupt": (["--input", "{root}/allbad"], "none of the 1 image(s)"),
    "manifest missing file": (["--input", "{root}/man/missing.jsonl"], "line 2: image gone.png not found"),
    "manifest bad label": (["--input", "{root}/man/badlabel.jsonl"], "label 'hexagon' is not a class of the model"),
    "unknown attribution": (["--attributions", "saliency,gradcam"], "unknown attribution method 'gradcam'"),
    "bad dtype on cpu": (["--device", "cpu", "--dtype", "float16"], "--dtype float16 is for the GPU forward"),
    "bad batch size": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "unknown family": (["--family", "audio"], "unknown model family 'audio'; available: vit"),
    "unknown compression": (["--compression", "zstd"], "unknown compression 'zstd'"),
    "unknown target": (["--target", "random"], "unknown --target 'random'"),
    "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
    "target label without labels": (["--target", "label"], "--target label needs a label for every input"),
    "model family mismatch is a model error": (["--model", "{root}/bert", "--family", "vit"], "is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_error_line_exit_2_nothing_overwritten(env, tmp_path, capsys, case):
    args, message = BAD[case]
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious earlier recording")
    base = {"--model": str(env / "vit"), "--input": str(env / "imgs"), "--out": str(out)}
    extra = [a.format(root=env) for a in args]
    for key in list(base):
        if key in extra:
            del base[key]
    argv = ["extract", *[x for kv in base.items() for x in kv], *extra, "--overwrite", "--no-progress"]
    code, stdout, err = cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and message.format(root=env) in errors[0], err
    assert "Traceback" not in err
    assert out.read_bytes() == b"precious earlier recording"
    assert not (tmp_path / "run.h5.partial").exists()


def test_output_exists_needs_overwrite_or_resume(env, tmp_path, capsys):
    out = tmp_path / "run.h5"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", out, "--resume")
    assert code == 2 and "already complete: nothing to resume" in err
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out",
                       tmp_path / "other.h5", "--resume")
    assert code == 2 and "nothing to resume" in err
    assert out.read_bytes() == b"keep me"


def test_unwritable_output_directory(env, capsys):
    d = _sys_unwritable()
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out", d / "run.h5")
    assert code == 2 and err.startswith("error: output directory") and "not writable" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(env, tmp_path, capsys):
    code, _, err = cli(capsys, "extract", "--model", env / "vit", "--input", env / "imgs", "--out",
                       tmp_path / "r.h5", "--device", "cuda")
    assert code == 2 and err.strip() == "error: --device cuda: CUDA is not available on this machine " \
                                        "(use --device cpu or auto)"
    assert not (tmp_path / "r.h5.partial").exists()


def _datasets(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items() if k != "created"}
    return out, attrs


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_then_resume_equals_uninterrupted(env, tmp_path, capsys):
    """SIGINT a running `attnviz extract` (a subprocess) after its first batches, `--resume` it, and compare
    every dataset with an uninterrupted run."""
    imgs = tmp_path / "imgs"
    write_images(imgs, [f"{c}/{i:02d}.png" for c in ("circle", "square") for i in range(8)], seed=5)
    common = ["--model", str(env / "vit"), "--input", str(imgs), "--batch-size", "2", "--attributions",
              "saliency,integrated_gradients,rollout"]
    out = tmp_path / "run.h5"
    # each batch is slowed down (a sleep per attribution call) so that the interrupt lands mid-run however
    # fast the machine is; what is written does not depend on the delay
    slow_main = ("import time, extractor.attributions as A; compute = A.compute\n"
                 "def slow(*a, **k):\n    time.sleep(0.3)\n    return compute(*a, **k)\n"
                 "A.compute = slow\nfrom attnviz.cli import main; main()")
    proc = subprocess.Popen(
        [sys.executable, "-c", slow_main, "extract", *common, "--out", str(out)],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    seen: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read(1):
            seen.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        text = "".join(seen)
        if " 4/16 " in text or " 6/16 " in text:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before it could be interrupted: " + "".join(seen)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=5)
    err = "".join(seen)
    assert "error: interrupted" in err and "Traceback" not in err and "--resume" in err
    assert not out.exists() and (tmp_path / "run.h5.partial").exists()
    with attnviz.open(tmp_path / "run.h5.partial") as rec:
        assert not rec.complete and 4 <= rec.n_samples < 16

    code, stdout, err = cli(capsys, "extract", *common, "--out", out, "--resume", "--no-progress")
    assert code == 0, err
    reference = tmp_path / "ref.h5"
    code, _, err = cli(capsys, "extract", *common, "--out", reference, "--no-progress")
    assert code == 0, err
    got, got_attrs = _datasets(out)
    ref, ref_attrs = _datasets(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
    assert got_attrs == ref_attrs
