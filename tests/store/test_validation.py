"""Every damaged or foreign file gives one RecordingError naming the file and the problem; the CLI
turns it into one `error:` line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.cli import main
from attnviz.errors import RecordingError
from tests.store._synth import Written


def _copy(src: Path, dst: Path, edit: Callable[[h5py.File], None]) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _set(name: str, value: object) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[name] = value
    return edit


def _delete_attr(name: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f.attrs[name]
    return edit


def _delete(name: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
    return edit


def _replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def _bad_lengths(f: h5py.File) -> None:
    f["attention/self/lengths"][2] = (11, 10)


def _bad_stack_attrs(f: h5py.File) -> None:
    f["attention/self"].attrs["n_heads"] = 4


# name -> (how to make the file from a good recording, words the message must contain)
CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "text file": (lambda good, p: (p.write_text("layer,head,score\n0,1,0.5\n"), p)[1], "not an HDF5 file"),
    "empty file": (lambda good, p: (p.write_bytes(b""), p)[1], "not an HDF5 file"),
    "truncated to half": (lambda good, p: _truncate(good, p, 0.5), "truncated"),
    "truncated to 90%": (lambda good, p: _truncate(good, p, 0.9), "truncated"),
    "truncated by one byte": (lambda good, p: _truncate(good, p, 1 - 1e-6), "truncated"),
    "other format": (lambda good, p: _copy(good, p, _set("format", "anndata")), "not an attnviz recording"),
    "plain HDF5": (lambda good, p: (h5py.File(p, "w").close(), p)[1], "not an attnviz recording"),
    "format version 2": (lambda good, p: _copy(good, p, _set("format_version", 2)),
                         "format version 2, this attnviz reads version 1; written by a newer attnviz; upgrade"),
    "format version 0": (lambda good, p: _copy(good, p, _set("format_version", 0)),
                         "format version 0, this attnviz reads version 1; record it again"),
    "version not a number": (lambda good, p: _copy(good, p, _set("format_version", "one")), "not an integer"),
    "version missing": (lambda good, p: _copy(good, p, _delete_attr("format_version")),
                        "'format_version' is missing"),
    "root attribute missing": (lambda good, p: _copy(good, p, _delete_attr("n_heads")),
                               "missing root attribute(s) n_heads"),
    "unknown family": (lambda good, p: _copy(good, p, _set("family", "audio")), "unknown family 'audio'"),
    "logits missing": (lambda good, p: _copy(good, p, _delete("samples/logits")),
                       "required dataset /samples/logits is missing"),
    "maps missing": (lambda good, p: _copy(good, p, _delete("attention/self/maps")),
                     "required dataset /attention/self/maps is missing"),
    "thumbnails missing": (lambda good, p: _copy(good, p, _delete("samples/thumbnail")),
                           "required dataset /samples/thumbnail is missing"),
    "mismatched rows": (lambda good, p: _copy(good, p, _replace("samples/label", np.zeros(5, np.int32))),
                        "/samples/label has 5 rows, expected 7"),
    "mismatched attribution rows": (lambda good, p: _copy(good, p, _replace("attributions/rollout",
                                                                            np.zeros((6, 3, 3), np.float32))),
                                    "/attributions/rollout has 6 rows, expected 7"),
    "logits columns": (lambda good, p: _copy(good, p, _replace("samples/logits", np.zeros((7, 3), np.float32))),
                       "/samples/logits has shape (7, 3), expected (7, 4) for 4 class names"),
    "maps shape": (lambda good, p: _copy(good, p, _replace("attention/self/maps",
                                                           np.zeros((7, 2, 2, 10, 10), np.float16))),
                   "/attention/self/maps has shape (7, 2, 2, 10, 10), expected (7, 2, 3, Q, K)"),
    "stack attributes": (lambda good, p: _copy(good, p, _bad_stack_attrs), "expected (7, 2, 4, Q, K)"),
    "lengths out of range": (lambda good, p: _copy(good, p, _bad_lengths), "lengths outside the maps' 10x10"),
    "main kind": (lambda good, p: _copy(good, p, _set("main_kind", "cross")), "main kind is 'self'"),
    "missing file": (lambda good, p: p, "no such file"),
    "directory": (lambda good, p: (p.mkdir(), p)[1], "is a directory"),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def bad_file(request: pytest.FixtureRequest, vit: Written, tmp_path: Path) -> tuple[Path, str]:
    make, words = CASES[request.param]
    return make(vit.path, tmp_path / "bad.h5"), words


def test_open_gives_one_clear_error(bad_file: tuple[Path, str]) -> None:
    path, words = bad_file
    with pytest.raises(RecordingError) as e:
        attnviz.open(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert words in msg
    assert "\n" not in msg


def test_cli_info_prints_one_error_line(bad_file: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    path, words = bad_file
    with pytest.raises(SystemExit) as e:
        main(["info", str(path)])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and words in lines[0]


def test_cli_process_no_traceback(vit: Written, tmp_path: Path) -> None:
    """The real console entry point in its own process: one line on stderr, exit code 2."""
    bad = _truncate(vit.path, tmp_path / "cut.h5", 0.5)
    proc = subprocess.run([sys.executable, "-c", "from attnviz.cli import main; main()", "info", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: cannot be read: truncated (an interrupted copy or write?)"]


def test_good_file_still_opens(vit: Written) -> None:
    """The edits above are what break the files: the original is valid."""
    with attnviz.open(vit.path) as rec:
        assert rec.n_samples == 7


def test_unknown_groups_and_attributes_are_ignored(vit: Written, tmp_path: Path) -> None:
    """Additions that a later v1 writer may make (new groups, attributes, layout keys) must not break reading."""
    def add(f: h5py.File) -> None:
        f.attrs["new_root_attribute"] = "x"
        f.create_dataset("future/thing", data=np.arange(3))
        lay = f["attention/self"].attrs["layout"]
        f["attention/self"].attrs["layout"] = lay[:-1] + ', "new_key": 3}'
    path = _copy(vit.path, tmp_path / "more.h5", add)
    with attnviz.open(path) as rec:
        assert rec.layout().grid == (3, 3)
        np.testing.assert_array_equal(rec.attention(0, 0, 0).shape, (10, 10))
