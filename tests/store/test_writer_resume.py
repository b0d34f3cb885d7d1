"""The writer: temporary name, complete flag, exact resume, refusing to clobber, background errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.errors import InputError, RecordingError
from attnviz.store import RecordingWriter, SampleBatch, StackSpec, check_output_path, partial_path
from tests.store._synth import create_vit, f16, vit_batch, vit_data, write_vit


def _all_values(path: Path) -> dict[str, object]:
    """Every dataset's values and every attribute, except the creation time."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            for k, v in obj.attrs.items():  # type: ignore[attr-defined]
                if k != "created":
                    out[f"{name}@{k}"] = v
        f.visititems(visit)
        out.update({f"@{k}": v for k, v in f.attrs.items() if k != "created"})
    return out


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_partial_name_until_finish(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(5)
    w = create_vit(out, d, batch_size=2)
    part = partial_path(out)
    assert part == tmp_path / "run.h5.partial"
    assert part.exists() and not out.exists()
    for start in range(0, 5, 2):
        w.write(vit_batch(d, start, min(start + 2, 5)))
    w.drain()
    assert part.exists() and not out.exists()
    assert not w.h5.attrs["complete"]
    assert w.finish() == out
    assert out.exists() and not part.exists()
    with attnviz.open(out) as rec:
        assert rec.complete and rec.n_samples == 5


def test_interrupted_writer_leaves_partial_with_done_flags_of_written_batches(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    w = write_vit(out, n=8, batch_size=3, stop_after=2)  # batches [0,3) and [3,6) of [0,3) [3,6) [6,8)
    part = partial_path(out)
    assert part.exists() and not out.exists()
    with h5py.File(part, "r") as f:
        np.testing.assert_array_equal(f["samples/done"][()], [True] * 6 + [False] * 2)
        assert not f.attrs["complete"]
    with attnviz.open(part) as rec:
        assert not rec.complete
        assert (rec.n_samples, rec.n_planned) == (6, 8)
        assert rec.sample_ids() == w.ids[:6]
        assert len(rec.labels()) == len(rec.predictions()) == len(rec.logits()) == 6
        np.testing.assert_array_equal(rec.attention(5, 1, 2), f16(w.maps["self"][5, 1, 2]))
        with pytest.raises(IndexError):
            rec.attention(6, 0, 0)
        assert [i for idx, _ in rec.iter_attention() for i in idx] == list(range(6))
        assert "incomplete 6/8" in repr(rec)


def test_done_flags_with_a_hole_count_only_the_leading_run(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(7)
    with create_vit(out, d, batch_size=3) as w:
        w.write(vit_batch(d, 0, 3))
        w.write(vit_batch(d, 6, 7))  # batch [3,6) missing
    with attnviz.open(partial_path(out)) as rec:
        assert rec.n_samples == 3 and rec.n_planned == 7


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = write_vit(tmp_path / "full.h5", n=8, batch_size=3)
    out = tmp_path / "cut.h5"
    write_vit(out, n=8, batch_size=3, stop_after=1)
    check_output_path(out, resume=True)
    d = vit_data(8)
    w = RecordingWriter.resume(out, sample_ids=full.ids)
    assert w.batch_size == 3
    assert w.pending_batches() == [(3, 6), (6, 8)]
    assert w.params == {"seed": 0, "note": "synthetic"}
    for start, stop in w.pending_batches():
        w.write(vit_batch(d, start, stop))
    w.finish()
    assert not partial_path(out).exists()
    _assert_same(_all_values(out), _all_values(full.path))


def test_resume_refuses_other_inputs(tmp_path: Path) -> None:
    out = tmp_path / "cut.h5"
    w = write_vit(out, n=6, batch_size=3, stop_after=1)
    with pytest.raises(InputError, match="other inputs"):
        RecordingWriter.resume(out, sample_ids=w.ids[:5])
    with pytest.raises(InputError, match="other inputs"):
        RecordingWriter.resume(out, sample_ids=list(reversed(w.ids)))
    # the refusal closed the file: resuming with the right inputs works
    RecordingWriter.resume(out, sample_ids=w.ids, background=False).close()


def test_resume_of_a_damaged_partial(tmp_path: Path) -> None:
    out = tmp_path / "cut.h5"
    write_vit(out, n=6, batch_size=3, stop_after=1)
    part = partial_path(out)
    part.write_bytes(part.read_bytes()[:2000])
    with pytest.raises(RecordingError, match=r"cut.h5.partial: cannot be resumed.*--overwrite"):
        RecordingWriter.resume(out)


def test_finish_with_missing_samples_keeps_the_partial(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(6)
    w = create_vit(out, d, batch_size=3)
    w.write(vit_batch(d, 0, 3))
    with pytest.raises(RecordingError, match="3 samples were not written; run again with --resume"):
        w.finish()
    assert partial_path(out).exists() and not out.exists()


def test_exception_inside_with_block_flushes_and_keeps_partial(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(6)
    with pytest.raises(KeyboardInterrupt):
        with create_vit(out, d, batch_size=3) as w:
            w.write(vit_batch(d, 0, 3))
            raise KeyboardInterrupt
    with attnviz.open(partial_path(out)) as rec:
        assert rec.n_samples == 3 and not rec.complete


def test_error_in_background_thread_surfaces_on_next_write(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(9)
    w = create_vit(out, d, batch_size=3)
    bad = vit_batch(d, 3, 6)
    bad.meta = [{"x": object()}] * 3  # not JSON-able: fails in the writer thread, not in write()
    w.write(vit_batch(d, 0, 3))
    w.write(bad)
    w._queue.join()  # the thread has met the error
    with pytest.raises(TypeError, match="cannot store object as JSON"):
        w.write(vit_batch(d, 6, 9))
    w.close()
    with h5py.File(partial_path(out), "r") as f:
        np.testing.assert_array_equal(f["samples/done"][()], [True] * 3 + [False] * 6)


def test_error_in_background_thread_surfaces_on_finish(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    d = vit_data(6)
    bad = vit_batch(d, 3, 6)
    bad.meta = [{"x": object()}] * 3
    with pytest.raises(TypeError):
        with create_vit(out, d, batch_size=3) as w:
            w.write(vit_batch(d, 0, 3))
            w.write(bad)
            w.finish()
    assert partial_path(out).exists() and not out.exists()
    with attnviz.open(partial_path(out)) as rec:
        assert rec.n_samples == 3


def test_write_checks_the_batch_in_the_callers_thread(tmp_path: Path) -> None:
    d = vit_data(6)
    w = create_vit(tmp_path / "run.h5", d, batch_size=3)
    good = vit_batch(d, 0, 3)
    cases = {
        "does not fit samples": SampleBatch(start=5, attention=good.attention, predictions=good.predictions,
                                            logits=good.logits),
        "attention 'self': shape": SampleBatch(start=0, attention={"self": good.attention["self"][:, :1]},
                                               predictions=good.predictions, logits=good.logits),
        "kind 'cross' is not in this file": SampleBatch(start=0, attention={"cross": good.attention["self"]},
                                                        predictions=good.predictions, logits=good.logits),
        "logits: per-sample shape": SampleBatch(start=0, attention=good.attention, predictions=good.predictions,
                                                logits=good.logits[:, :2]),
        "attribution 'occlusion' was not declared": SampleBatch(
            start=0, attention=good.attention, predictions=good.predictions, logits=good.logits,
            attributions={"occlusion": np.zeros((3, 12, 12))}),
        "thumbnails: 2 rows": SampleBatch(start=0, attention=good.attention, predictions=good.predictions,
                                          logits=good.logits, thumbnails=good.thumbnails[:2]),
    }
    for words, batch in cases.items():
        with pytest.raises(ValueError, match=words):
            w.write(batch)
    w.close()
    with h5py.File(partial_path(tmp_path / "run.h5"), "r") as f:
        assert not f["samples/done"][()].any()


@pytest.mark.parametrize("change, words", [
    ({"stacks": []}, "needs the 'self' attention stack"),
    ({"stacks": [StackSpec("cross", 2, 3, 10, 10)]}, "has no 'cross' attention"),
    ({"thumbnail_shape": None}, "needs thumbnails"),
    ({"labels": [0, 1]}, "labels have shape"),
    ({"family": "text"}, "unknown family"),
    ({"compression": "zstd"}, "unknown compression"),
    ({"sample_ids": []}, "no samples"),
    ({"batch_size": 0}, "batch size"),
    ({"target_source": "truth"}, "target_source"),
])
def test_create_refuses_bad_arguments_and_leaves_nothing(tmp_path: Path, change: dict, words: str) -> None:
    d = vit_data(4)
    T = d["maps"]["self"].shape[-1]
    args = dict(family="vit", model_name="m", model_class="c", sample_ids=[f"{i}" for i in range(4)],
                stacks=[StackSpec("self", 2, 3, T, T)], class_names=["a", "b"], labels=None,
                thumbnail_shape=(8, 8))
    args.update(change)
    with pytest.raises(InputError, match=words):
        RecordingWriter.create(tmp_path / "x.h5", **args)
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_existing_partial_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    write_vit(out, n=4, stop_after=1)
    with pytest.raises(InputError, match="--resume or --overwrite"):
        write_vit(out, n=4)
    d = vit_data(4)
    create_vit(out, d, overwrite=True, background=False).close()
    with h5py.File(partial_path(out), "r") as f:
        assert not f["samples/done"][()].any()


# -- check_output_path -----------------------------------------------------------------------

def test_check_output_path_fresh(tmp_path: Path) -> None:
    check_output_path(tmp_path / "new.h5")
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing


def test_check_output_path_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    out.write_bytes(b"x")
    with pytest.raises(InputError, match="exists: pass --overwrite"):
        check_output_path(out)
    check_output_path(out, overwrite=True)
    with pytest.raises(InputError, match="already complete: nothing to resume"):
        check_output_path(out, resume=True)


def test_check_output_path_partial(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    with pytest.raises(InputError, match="nothing to resume"):
        check_output_path(out, resume=True)
    partial_path(out).write_bytes(b"x")
    with pytest.raises(InputError, match="interrupted run.*--resume"):
        check_output_path(out)
    check_output_path(out, resume=True)
    check_output_path(out, overwrite=True)
    with pytest.raises(InputError, match="cannot be used together"):
        check_output_path(out, overwrite=True, resume=True)


def test_check_output_path_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "run.h5")


def test_check_output_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "run.h5").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path / "run.h5", overwrite=True)


def _unwritable_directory(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d
    # root ignores permission bits; sysfs refuses new files even to root
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(name)
    pytest.skip("no directory here is unwritable for this user")


def test_check_output_path_unwritable_directory(tmp_path: Path) -> None:
    d = _unwritable_directory(tmp_path)
    try:
        with pytest.raises(InputError, match="is not writable"):
            check_output_path(d / "run.h5")
    finally:
        if d.is_relative_to(tmp_path):
            d.chmod(0o700)


def test_write_after_finish_or_close_is_refused(tmp_path: Path) -> None:
    d = vit_data(3)
    for end in ("finish", "close"):
        w = create_vit(tmp_path / f"{end}.h5", d, batch_size=3)
        w.write(vit_batch(d, 0, 3))
        getattr(w, end)()
        with pytest.raises(RecordingError, match="already finished or closed"):
            w.write(vit_batch(d, 0, 3))
