"""Distributed extraction (torchrun, 2 CPU ranks, gloo) and ``attnviz merge``: the merged recording equals a
one-process run sample for sample, as virtual datasets over the shards or as a copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.errors import InputError
from attnviz.store.merge import merge_shards, shard_path
from tests.helpers import save_tiny_model, write_images

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("samples/id", "samples/label", "samples/prediction", "samples/logits", "samples/thumbnail",
            "samples/done", "attention/self/maps", "attention/self/lengths", "attributions/rollout")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    save_tiny_model(root / "vit", "vit")
    save_tiny_model(root / "vit_b", "vit", seed=5)
    write_images(root / "imgs", [f"{c}/{i}.png" for c in ("circle", "square") for i in range(4)] + ["x.png"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(root / "vit"), "--input", str(root / "imgs"), "--attributions", "rollout",
              "--batch-size", "1", "--no-progress", "--device", "cpu"]
    single = root / "single.h5"
    subprocess.run([sys.executable, "-m", "attnviz", "extract", "--out", str(single), *common], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    dist = root / "dist" / "run.h5"
    dist.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "attnviz",
                           "extract", "--out", str(dist), *common], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "single": single, "dist": dist}


def _same(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in COMPARED:
            assert np.array_equal(fa[name][()], fb[name][()]), name
        assert fa.attrs["n_samples"] == fb.attrs["n_samples"] == 9


def test_torchrun_shards_merge_into_the_one_process_recording(runs):
    dist = runs["dist"]
    shards = [shard_path(dist, r, 2) for r in range(2)]
    assert all(p.is_file() for p in shards)
    with attnviz.open(shards[1]) as rec:
        assert rec.h5.attrs["shard_index"] == 1 and rec.h5.attrs["shard_offset"] == 5 and rec.n_samples == 4
    _same(dist, runs["single"])  # rank 0 merged them (virtual) at the end of the run
    with attnviz.open(dist) as rec, attnviz.open(runs["single"]) as ref:
        assert rec.h5["attention/self/maps"].is_virtual
        assert rec.complete and rec.sample_ids() == ref.sample_ids()
        assert np.allclose(rec.head_metric("entropy"), ref.head_metric("entropy"), rtol=1e-5)  # exact merge of means
        assert np.array_equal(rec.attention(6, 1, 2), ref.attention(6, 1, 2))
        assert rec.accuracy == ref.accuracy


def test_merge_copy_is_independent_of_the_shards(runs, tmp_path):
    shards = [shard_path(runs["dist"], r, 2) for r in range(2)]
    copied = tmp_path / "copied.h5"
    merge_shards(copied, list(reversed(shards)), copy=True)  # order comes from shard_index
    _same(copied, runs["single"])
    with h5py.File(copied, "r") as f:
        assert not f["attention/self/maps"].is_virtual
        assert f["attention/self/maps"].chunks == (1, 1, 1, 17, 17)


def test_merge_refuses_mixed_or_incomplete_shards(runs, tmp_path, capsys):
    from attnviz.cli import main

    root = runs["root"]
    other = tmp_path / "other.h5"
    subprocess.run([sys.executable, "-m", "attnviz", "extract", "--model", str(root / "vit_b"), "--input",
                    str(root / "imgs" / "circle"), "--out", str(other), "--no-progress", "--attributions", "rollout"],
                   check=True, cwd=ROOT, capture_output=True)
    shard0 = shard_path(runs["dist"], 0, 2)
    with pytest.raises(InputError, match="another model"):
        merge_shards(tmp_path / "m.h5", [shard0, other])
    with pytest.raises(InputError, match="share samples"):
        merge_shards(tmp_path / "m.h5", [shard0, shard0])
    with pytest.raises(InputError, match="exists"):
        merge_shards(runs["single"], [shard0])
    with pytest.raises(SystemExit) as e:
        main(["merge", str(tmp_path / "m.h5"), str(tmp_path / "missing.h5")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()
