from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attnviz.errors import InputError
from attnviz.report import collect_figures, parse_samples, write_report
from attnviz.store.reader import Recording
from tests.helpers import make_recording


def test_parse_samples():
    assert parse_samples("0,3,10-12", 20) == [0, 3, 10, 11, 12]
    assert parse_samples(None, 2) == [0, 1]
    assert parse_samples("all", 3) == [0, 1, 2]
    for bad in ("x", "3-1", "25"):
        with pytest.raises(InputError):
            parse_samples(bad, 20)


def test_report_writes_pngs_of_the_expected_size_and_an_index_linking_each(tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=4, grid=(3, 3))
    out = tmp_path / "report"
    with Recording(path) as rec:
        expected = {it.stem: it.figure for it in collect_figures(rec, samples=[2])}
    index = write_report(path, out, samples="2", width=700, height=500)
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == set(expected)
    assert {"model_card", "inputs", "all_heads_entropy", "all_heads_confidence", "all_heads_cls_attention"} <= set(expected)
    assert any(s.startswith("explorer_s2_query") for s in expected)
    assert any(s.startswith("explorer_s2_attributions") for s in expected)
    links = re.findall(r'<a href="([^"]+)">', index.read_text())
    assert sorted(links) == sorted(p.name for p in pngs)
    for p in pngs:
        fig = expected[p.stem]
        img = np.asarray(Image.open(p))
        assert img.shape[1] == (fig.layout.width or 700) and img.shape[0] == (fig.layout.height or 500), p.name
        assert img[..., :3].std() > 5, f"{p.name} is blank"  # something is drawn


def test_report_svg_and_unknown_view(tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=2, grid=(2, 2))
    write_report(path, tmp_path / "svg", fmt="svg", views="all_heads")
    svgs = sorted((tmp_path / "svg").glob("*.svg"))
    assert svgs and all(p.read_text().lstrip().startswith("<svg") for p in svgs)
    with pytest.raises(InputError, match="unknown view"):
        write_report(path, tmp_path / "x", views="nope")
    with pytest.raises(InputError, match="png or svg"):
        write_report(path, tmp_path / "x", fmt="gif")


def test_no_chromium_gives_one_line_and_exit_2(tmp_path):
    path = make_recording(tmp_path / "run.h5", n_samples=2, grid=(2, 2))
    code = "import sys; from attnviz.cli import main; main(sys.argv[1:])"
    env = {"BROWSER_PATH": str(tmp_path / "no-chrome"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, "report", str(path), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: image export needs Chromium")
