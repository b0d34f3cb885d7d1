"""`attnviz info FILE [--json]` on synthetic recordings."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from attnviz.cli import main
from attnviz.store import HeadMetricInfo, partial_path, save_analysis, write_head_metric
from tests.store._synth import Written, write_vit


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        main(args)
    except SystemExit as e:  # typer may exit 0 explicitly
        assert e.code in (0, None)
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_info_json(vit: Written, capsys: pytest.CaptureFixture[str]) -> None:
    write_head_metric(vit.path, HeadMetricInfo("entropy"), np.zeros((2, 3)))
    save_analysis(vit.path, "spatial", {"bins": 4}, {"a": np.arange(3)})
    d = json.loads(_run(["info", str(vit.path), "--json"], capsys))
    known = vit.labels >= 0
    assert d["accuracy"] == pytest.approx(float(np.mean(vit.predictions[known] == vit.labels[known])))
    assert (d["samples"], d["samples_planned"], d["labelled_samples"]) == (7, 7, 6)
    assert (d["layers"], d["heads"], d["family"], d["model"]) == (2, 3, "vit", "synthetic-vit")
    assert d["format_version"] == 1 and d["complete"] is True
    assert d["stacks"]["self"] == {"layers": 2, "heads": 3, "prefix_tokens": ["cls"], "grid": [3, 3],
                                   "patch_size": [4, 4], "image_size": [12, 12]}
    assert d["attributions"] == ["rollout", "saliency"]
    assert d["head_metrics"] == ["entropy"] and d["analyses"] == ["spatial"]
    assert d["skipped_inputs"] == [{"input": "broken.png", "reason": "cannot identify image file"}]
    assert d["file_bytes"] == vit.path.stat().st_size
    by_path = {x["path"]: x for x in d["datasets"]}
    maps = by_path["attention/self/maps"]
    assert maps["shape"] == [7, 2, 3, 10, 10] and maps["dtype"] == "float16"
    with h5py.File(vit.path, "r") as f:
        for p, x in by_path.items():
            assert x["bytes_on_disk"] == f[p].id.get_storage_size()
            assert x["shape"] == list(f[p].shape)
        # compressed maps: fewer bytes than 7*2*3*10*10 float16, but not nothing
        assert 0 < maps["bytes_on_disk"] <= 7 * 2 * 3 * 100 * 2
    assert "samples/logits" in by_path and "head_metrics/entropy" in by_path


def test_info_text(vit: Written, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(["info", str(vit.path)], capsys)
    known = vit.labels >= 0
    acc = float(np.mean(vit.predictions[known] == vit.labels[known]))
    lines = out.splitlines()
    assert lines[0].startswith(str(vit.path))
    assert "  format     attnviz-recording v1, complete" in lines
    assert "  samples    7, 6 labelled" in lines
    assert "  heads      2 layers x 3 heads" in lines
    assert f"  accuracy   {acc:.1%}" in lines
    assert "  attention  self: 2x3, grid 3x3 of 4x4 px, prefix tokens cls" in lines
    assert "  attributions  rollout, saliency" in lines
    assert any(line.split()[:3] == ["attention/self/maps", "7x2x3x10x10", "float16"] for line in lines)


def test_info_incomplete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_vit(tmp_path / "run.h5", n=8, batch_size=3, stop_after=2)
    part = partial_path(tmp_path / "run.h5")
    out = _run(["info", str(part)], capsys)
    assert "INCOMPLETE (6 of 8 samples written; continue with --resume)" in out
    d = json.loads(_run(["info", str(part), "--json"], capsys))
    assert (d["complete"], d["samples"], d["samples_planned"]) == (False, 6, 8)


def test_info_without_labels_or_grid(s2t: Written, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(["info", str(s2t.path)], capsys)
    assert "  samples    5, no labels" in out.splitlines()
    assert "accuracy" not in out
    assert "  attention  cross: 2x3" in out.splitlines()
    d = json.loads(_run(["info", str(s2t.path), "--json"], capsys))
    assert d["accuracy"] is None and d["stacks"]["self"]["grid"] is None
    assert (d["layers"], d["heads"]) == (2, 3)
