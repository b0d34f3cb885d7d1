"""Derived results in the file: head metrics and the analyses cache keyed by parameters."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.errors import RecordingError
from attnviz.store import HeadMetricInfo, load_analysis, partial_path, save_analysis, write_head_metric
from tests.store._synth import Written, create_vit, f16, vit_batch, vit_data, write_vit

PARAMS = {"bins": 8, "kind": "self", "layers": [0, 1], "normalise": True, "sigma": 0.5}


def _arrays() -> dict[str, np.ndarray]:
    return {
        "profile": np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4),
        "big": np.arange(5000, dtype=np.float64),  # compressed (> 1024 elements)
        "labels": np.array(["near", "far", "cls"]),
        "flags": np.array([True, False]),
        "clusters/centres": np.eye(3),
        "count": np.int64(7),
    }


def test_save_then_load_with_equal_params(vit: Written) -> None:
    save_analysis(vit.path, "spatial", PARAMS, _arrays(), attrs={"note": "test", "extra": {"a": [1, 2]}})
    with attnviz.open(vit.path) as rec:
        # equal parameters in another order, tuples for lists: the same key
        same = {"sigma": 0.5, "normalise": True, "layers": (0, 1), "kind": "self", "bins": 8}
        got = load_analysis(rec, "spatial", same)
        assert got is not None
        want = _arrays()
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
            assert got[k].shape == np.shape(v)
        assert got["labels"].dtype.kind == "U"
        g = rec.analysis_group("spatial")
        assert g.attrs["note"] == "test" and g.attrs["extra"] == '{"a": [1, 2]}'
        assert rec.analyses() == ["spatial"]


@pytest.mark.parametrize("other", [
    {**PARAMS, "bins": 9},
    {**PARAMS, "sigma": 0.50001},
    {k: v for k, v in PARAMS.items() if k != "sigma"},
    {**PARAMS, "extra": None},
    {**PARAMS, "layers": [1, 0]},
])
def test_other_params_give_none(vit: Written, other: dict) -> None:
    save_analysis(vit.path, "spatial", PARAMS, _arrays())
    with attnviz.open(vit.path) as rec:
        assert load_analysis(rec, "spatial", other) is None
        assert load_analysis(rec, "missing", PARAMS) is None


def test_save_replaces(vit: Written) -> None:
    save_analysis(vit.path, "spatial", PARAMS, {"a": np.arange(3), "b": np.ones(2)})
    save_analysis(vit.path, "spatial", {**PARAMS, "bins": 4}, {"a": np.arange(5)})
    with attnviz.open(vit.path) as rec:
        assert load_analysis(rec, "spatial", PARAMS) is None
        got = load_analysis(rec, "spatial", {**PARAMS, "bins": 4})
        assert got is not None and set(got) == {"a"}
        np.testing.assert_array_equal(got["a"], np.arange(5))


def test_failed_save_leaves_no_matching_cache(vit: Written) -> None:
    save_analysis(vit.path, "spatial", PARAMS, {"a": np.arange(3)})
    ragged = [[1, 2], [3]]
    with pytest.raises(ValueError):
        save_analysis(vit.path, "spatial", PARAMS, {"a": np.arange(3), "b": ragged})  # type: ignore[dict-item]
    with attnviz.open(vit.path) as rec:
        assert load_analysis(rec, "spatial", PARAMS) is None


def test_group_without_params_never_matches(vit: Written) -> None:
    """What an interrupted save leaves behind (arrays but no params yet) is never taken for a result."""
    with h5py.File(vit.path, "r+") as f:
        f.create_dataset("analyses/spatial/a", data=np.arange(3))
    with attnviz.open(vit.path) as rec:
        assert load_analysis(rec, "spatial", {}) is None


def test_save_through_an_open_recording(vit: Written) -> None:
    """The dashboard holds the file open read-only: saving by path says what to do, saving through the
    Recording works and the Recording keeps reading."""
    with attnviz.open(vit.path) as rec:
        rec.attention(0, 0, 0)  # handles cached before the update must not be used after it
        with pytest.raises(RecordingError, match="pass the open Recording instead of the path"):
            save_analysis(vit.path, "spatial", PARAMS, {"a": np.arange(3)})
        save_analysis(rec, "spatial", PARAMS, {"a": np.arange(3)})
        write_head_metric(rec, HeadMetricInfo("score"), np.ones((2, 3)))
        np.testing.assert_array_equal(load_analysis(rec, "spatial", PARAMS)["a"], np.arange(3))
        assert rec.head_metrics() == ["score"]
        np.testing.assert_array_equal(rec.attention(2, 1, 0), f16(vit.maps["self"][2, 1, 0]))
        assert rec.h5.mode == "r"


def test_write_head_metric_checks_the_stack_shape(vit: Written) -> None:
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*\(2, 3\)"):
        write_head_metric(vit.path, HeadMetricInfo("score"), np.ones((3, 2)))
    with pytest.raises(ValueError, match="no 'cross' attention"):
        write_head_metric(vit.path, HeadMetricInfo("score", kind="cross"), np.ones((2, 3)))
    with attnviz.open(vit.path) as rec:
        assert rec.head_metrics() == []


def test_head_metric_of_another_stack(s2t: Written) -> None:
    info = HeadMetricInfo("encoder_entropy", kind="self", units="nats")
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_head_metric(s2t.path, info, values)
    write_head_metric(s2t.path, HeadMetricInfo("cross_score", kind="cross"), np.zeros((2, 3)))
    with attnviz.open(s2t.path) as rec:
        np.testing.assert_array_equal(rec.head_metric("encoder_entropy"), values)
        assert rec.head_metric_info("encoder_entropy").kind == "self"
        assert rec.head_metric("cross_score").shape == (rec.n_layers, rec.n_heads)
        assert rec.head_metrics() == ["cross_score", "encoder_entropy"]


def test_head_metric_replaces(vit: Written) -> None:
    write_head_metric(vit.path, HeadMetricInfo("score", definition="v1"), np.zeros((2, 3)))
    write_head_metric(vit.path, HeadMetricInfo("score", definition="v2"), np.ones((2, 3)))
    with attnviz.open(vit.path) as rec:
        np.testing.assert_array_equal(rec.head_metric("score"), np.ones((2, 3)))
        assert rec.head_metric_info("score").definition == "v2"


def test_head_metric_through_the_writer_during_extraction(tmp_path: Path) -> None:
    d = vit_data(3)
    w = create_vit(tmp_path / "run.h5", d, batch_size=3)
    w.write(vit_batch(d, 0, 3))
    w.drain()
    write_head_metric(w.h5, HeadMetricInfo("importance", params={"samples": 3}), np.full((2, 3), 0.25))
    w.finish()
    with attnviz.open(tmp_path / "run.h5") as rec:
        np.testing.assert_array_equal(rec.head_metric("importance"), np.full((2, 3), 0.25, np.float32))
        assert rec.head_metric_info("importance").params == {"samples": 3}


def test_incomplete_recording_refuses_updates(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    write_vit(out, n=6, batch_size=3, stop_after=1)
    part = partial_path(out)
    with pytest.raises(RecordingError, match="incomplete.*--resume"):
        save_analysis(part, "spatial", PARAMS, {"a": np.arange(3)})
    with pytest.raises(RecordingError, match="incomplete"):
        write_head_metric(part, HeadMetricInfo("score"), np.ones((2, 3)))
    with attnviz.open(part) as rec:
        with pytest.raises(RecordingError, match="incomplete"):
            save_analysis(rec, "spatial", PARAMS, {"a": np.arange(3)})
        assert rec.analyses() == [] and rec.head_metrics() == []


def test_replacing_an_analysis_reuses_file_space(vit: Written) -> None:
    """Recomputing a cached analysis again and again must not grow the file each time."""
    big = {"a": np.random.default_rng(0).random(200_000)}  # 1.6 MB, incompressible
    save_analysis(vit.path, "spatial", PARAMS, big)
    write_head_metric(vit.path, HeadMetricInfo("after"), np.ones((2, 3)))  # something behind it
    size = os.path.getsize(vit.path)
    for i in range(4):
        save_analysis(vit.path, "spatial", {**PARAMS, "run": i}, big)
    assert os.path.getsize(vit.path) < size + 1_000_000


def test_reserved_attribute_names(vit: Written) -> None:
    with pytest.raises(ValueError, match="params"):
        save_analysis(vit.path, "spatial", PARAMS, {}, attrs={"params": "x"})
